#!/usr/bin/env bash
# Build and install Horovod (PyTorch + Gloo, no TensorFlow/MXNet) against the installed torch.
#
#   bash launch/install_horovod.sh            # ~3 minutes on 2 cores; needs cmake, g++
#
# Horovod 0.28.1 (the latest release) declares C++14, which torch >= 2.1 headers reject, and
# its build isolation would pull another torch: so the sdist is patched to C++17 and built
# with --no-build-isolation. The built wheel is cached in HOROVOD_WHEEL_CACHE/torch-VERSION
# (default ~/.cache/commpress-horovod) and reused for the same torch.
set -euo pipefail
VERSION=${HOROVOD_VERSION:-0.28.1}
CACHE=${HOROVOD_WHEEL_CACHE:-$HOME/.cache/commpress-horovod}
TORCH=$(python -c 'import torch; print(torch.__version__.replace("+", "_"))')
CACHE="$CACHE/torch-$TORCH"
mkdir -p "$CACHE"
wheel=$(ls "$CACHE"/horovod-"$VERSION"-*.whl 2>/dev/null | head -n 1 || true)
if [ -z "$wheel" ]; then
  command -v cmake >/dev/null || pip install cmake
  work=$(mktemp -d)
  trap 'rm -rf "$work"' EXIT
  pip download --no-deps --no-binary :all: "horovod==$VERSION" -d "$work"
  tar -xzf "$work"/horovod-"$VERSION".tar.gz -C "$work"
  src="$work/horovod-$VERSION"
  sed -i 's/CMAKE_CXX_STANDARD 14/CMAKE_CXX_STANDARD 17/' "$src/CMakeLists.txt" "$src/horovod/torch/CMakeLists.txt"
  pip install wheel packaging cloudpickle psutil pyyaml >/dev/null  # setup.py imports some
  HOROVOD_WITH_PYTORCH=1 HOROVOD_WITH_GLOO=1 HOROVOD_WITHOUT_TENSORFLOW=1 \
    HOROVOD_WITHOUT_MXNET=1 HOROVOD_WITHOUT_MPI=${HOROVOD_WITHOUT_MPI:-1} \
    pip wheel --no-build-isolation --no-deps -w "$work/dist" "$src"
  built=$(ls "$work"/dist/horovod-*.whl)
  wheel="$CACHE/$(basename "$built")"
  cp "$built" "$wheel"
fi
# Horovod's own dependencies (cloudpickle, psutil, pyyaml, packaging) come with the wheel;
# it does not depend on torch, so the installed torch is kept.
pip install "$wheel"
python -c 'import horovod.torch as hvd; print("horovod", __import__("horovod").__version__, "gloo built:", hvd.gloo_built())'
