"""Native serial coders for the CPU, compiled once per machine and loaded with ``ctypes``.

Variable-length payloads are written bit by bit in order; as torch operations that takes some
twenty passes over int64 tensors per non-zero (:mod:`.elias`'s vectorised coder, which stays
the reference, the accelerator path and the fallback). The same work as one C++ loop
(``elias_coder.cpp``) reads the codes once and writes each bit once.

The source is compiled with the C++ compiler ``torch.compile``'s CPU backend uses (``CXX``, or
``c++``/``g++``/``clang++`` on the path) into a per-user cache (``COMMPRESS_CACHE_DIR``, else
``$XDG_CACHE_HOME/commpress`` or ``~/.cache/commpress``), keyed by the source, the compiler
and the machine, and renamed into place atomically, so concurrent ranks share one build. No
ninja and no torch headers: about a second, once. The native coder is not used when the
compiled kernels are switched off (``COMMPRESS_COMPILE=0``) or it is (:func:`set_enabled`),
on a big-endian machine, or when no compiler works (logged once; the vectorised coder from
then on).
"""
from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from typing import Optional

from . import kernels

logger = logging.getLogger("commpress.native")

SOURCE = Path(__file__).with_name("elias_coder.cpp")
#: no -ffast-math and no fused multiply-add: the fp32 products must round as torch's do
FLAGS = ["-O3", "-std=c++17", "-shared", "-fPIC", "-ffp-contract=off", "-fno-fast-math"]

#: The fewest codes the encoder gives a thread of its own (up to ``torch.get_num_threads()``),
#: and the fewest for which the decoder zeros its output on a second thread: starting one
#: costs tens of microseconds, coding a million values a few milliseconds.
THREAD_CODES = 1 << 20

_lock = threading.Lock()
_library: Optional[ctypes.CDLL] = None
_failure: Optional[str] = None
_override: Optional[bool] = None

_i64, _i32, _f32 = ctypes.c_int64, ctypes.c_int32, ctypes.c_float
_ptr = ctypes.c_void_p


def compiler() -> Optional[str]:
    """The C++ compiler to build with: ``CXX``, else the first of c++, g++, clang++ found."""
    named = os.environ.get("CXX")
    if named:
        return named
    for candidate in ("c++", "g++", "clang++"):
        found = shutil.which(candidate)
        if found:
            return found
    return None


def cache_dir() -> Path:
    explicit = os.environ.get("COMMPRESS_CACHE_DIR")
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "commpress"


def _cpu_identity() -> Optional[str]:
    """This CPU's model and instruction set extensions (Linux), or None where unknown."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return None
    wanted = [line for line in lines if line.split(":")[0].strip() in ("model name", "flags")]
    return "\n".join(sorted(set(wanted))) or None


def _flags() -> list:
    """The flag sets to try, best first: :data:`FLAGS` with ``-fopenmp`` (the threads of
    torch's OpenMP pool, which the process has loaded), and with ``-march=native`` (as
    Inductor compiles; 15-25% faster here, with the bit-count instructions) where the cache
    key can name the CPU, so that a shared cache holds one build per kind of CPU, never one a
    node cannot run; then without OpenMP (one thread) for a compiler that lacks it."""
    native_cpu = ["-march=native"] if _cpu_identity() else []
    return [FLAGS + native_cpu + ["-fopenmp"], FLAGS + native_cpu]


def _build(cxx: str) -> Path:
    """The shared library for this source and compiler, from the first flag set that builds."""
    failures = []
    for flags in _flags():
        try:
            return _build_with(cxx, flags)
        except RuntimeError as error:
            failures.append(str(error))
    raise RuntimeError("; ".join(failures))


def _build_with(cxx: str, flags: list) -> Path:
    """The shared library for this source, compiler, flags and machine, built if not cached."""
    source = SOURCE.read_bytes()
    key = hashlib.sha256(b"\0".join([source, cxx.encode(), " ".join(flags).encode(),
                                     platform.machine().encode(),
                                     (_cpu_identity() or "").encode()])).hexdigest()[:16]
    target = cache_dir() / f"elias_coder-{key}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, partial = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(handle)
    try:
        result = subprocess.run([cxx, *flags, str(SOURCE), "-o", partial], capture_output=True,
                                text=True, timeout=120)
        if result.returncode:
            raise RuntimeError(f"{cxx} failed: {result.stderr.strip()[-500:]}")
        os.replace(partial, target)  # atomic: another rank's build of the same key is identical
    finally:
        if os.path.exists(partial):
            os.unlink(partial)
    return target


def _load() -> ctypes.CDLL:
    cxx = compiler()
    if cxx is None:
        raise RuntimeError("no C++ compiler found (set CXX)")
    library = ctypes.CDLL(str(_build(cxx)))
    library.commpress_elias_encode.argtypes = [_ptr, _i64, _i32, _ptr, _i64, _i32, _i64, _ptr]
    library.commpress_elias_encode.restype = None
    library.commpress_elias_decode.argtypes = [_ptr, _i64, _ptr, _i64, _i64, _i32, _i64, _i64,
                                               _ptr, _ptr, _ptr, _i32, _f32, _ptr, _ptr, _i32,
                                               _i64]
    library.commpress_elias_decode.restype = _i32
    return library


def set_enabled(flag: Optional[bool]) -> None:
    """Force the native coder on (True: where it can be built) or off (False) in this
    process; None: back to following the compiled kernels' switch (:func:`kernels.enabled`)."""
    global _override
    _override = flag


def library() -> Optional[ctypes.CDLL]:
    """The loaded coder, or None where it is switched off or could not be built."""
    global _library, _failure
    wanted = kernels.enabled() if _override is None else _override
    if not wanted or sys.byteorder != "little":
        return None
    if _library is not None or _failure is not None:
        return _library
    with _lock:
        if _library is None and _failure is None:
            try:
                _library = _load()
            except Exception as error:  # no compiler, a read-only cache, a failed build
                _failure = str(error) or type(error).__name__
                logger.warning("commpress: native coder unavailable (%s); using the vectorised "
                               "torch coder", _failure)
    return _library
