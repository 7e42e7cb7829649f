"""Suite-wide guard: a compiled kernel that falls back to the eager code fails the test in
which it happened. The fallback is right for users (a missing compiler), but in the suite it
hides a broken compile path: every later test would pass on the eager code alone."""
import pytest

from commpress.codecs import kernels


@pytest.fixture(autouse=True)
def no_kernel_falls_back_to_eager():
    before = dict(kernels._broken)
    yield
    fell_back = {key: reason for key, reason in kernels._broken.items() if key not in before}
    if fell_back:
        pytest.fail(f"compiled kernels fell back to the eager code: {fell_back}", pytrace=False)
