import re
from pathlib import Path

from setuptools import find_packages, setup

VERSION = re.search(r'__version__ = "([^"]+)"',
                    Path(__file__).with_name("commpress").joinpath("__init__.py").read_text()).group(1)

setup(
    name="commpress",
    version=VERSION,
    license="BSD-3-Clause",
    description="Communication compression (QSGD, natural compression, AC/DC) for PyTorch "
                "data-parallel training",
    long_description=open("README.md").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.9",
    packages=find_packages(include=["commpress", "commpress.*"]),
    package_data={"commpress.codecs": ["elias_coder.cpp"]},  # compiled at first use (native.py)
    install_requires=["torch>=2.2", "numpy", "tqdm"],
    extras_require={
        "train": ["scikit-learn"],
        "test": ["pytest>=7", "scikit-learn", "pytorch-lightning>=2.0", "accelerate>=0.26"],
        "lightning": ["pytorch-lightning>=2.0"],
        "accelerate": ["accelerate>=0.26"],
        "mpi": ["mpi4py>=3.1"],
        "horovod": ["horovod>=0.28"],
        "bench": ["matplotlib", "scikit-learn"],
        "docs": ["pdoc>=14"],
    },
    entry_points={"console_scripts": ["commpress=commpress.cli:main"]},
)
