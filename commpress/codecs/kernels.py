"""Fused codec kernels: the codecs' own torch code, compiled once per process by
``torch.compile`` (Inductor: C++/OpenMP on CPU, Triton on CUDA) into one or two loops.

The eager code stays the reference and the fallback. A kernel is not used when compilation
is switched off (``COMMPRESS_COMPILE=0`` or :func:`set_enabled`), when ``torch.compile``
is missing, or when compiling or running it failed once (logged once; eager from then on).

Randomness inside a kernel is counter-based: counter ``i`` of a call draws
``hash(i, key)``, with the two 32-bit key words drawn from the caller's generator. So the
stream is reproducible from the generator's state (which checkpoints already hold), and
independent across ranks and steps as the generators are; no separate pass writes random
numbers to memory. The scaled-level codecs split each 32-bit hash into two 16-bit uniforms
(:func:`hashed_uniforms`): half the hashing per value.
"""
from __future__ import annotations

import contextlib
import logging
import os
import threading
import types
from typing import Callable, Dict, Hashable, Optional

import torch

logger = logging.getLogger("commpress.kernels")

#: Below this many elements (1 MiB of fp32, DDP's first bucket) the eager code runs: a fused
#: call saves about 1 ms there, while the first compiled call of a process costs about 3 s
#: (8 s with a cold compile cache), which small models would take thousands of steps to repay.
MIN_NUMEL = 1 << 18
#: Pieces of a vector of at least MIN_NUMEL (see :func:`reducing`) take the kernels down to
#: this size: a reduce-scatter chunk is a pipeline piece over the world size (under MIN_NUMEL
#: from 32 ranks on a 25 MB bucket), and the eager code runs 3-9x slower at 64K-256K values.
PIECE_MIN_NUMEL = 1 << 15
ENV_SWITCH = "COMMPRESS_COMPILE"

_lock = threading.Lock()
_kernels: Dict[Hashable, Callable] = {}
_broken: Dict[Hashable, str] = {}
_override: Optional[bool] = None
_reduction = threading.local()  # the size of the vector this thread is reducing


def set_enabled(flag: Optional[bool]) -> None:
    """Force the fused kernels on (True) or off (False) in this process; None: back to the
    environment (``COMMPRESS_COMPILE``, on unless ``0``/``false``/``off``)."""
    global _override
    _override = flag


def enabled() -> bool:
    if _override is not None:
        return _override
    return os.environ.get(ENV_SWITCH, "1").strip().lower() not in ("0", "false", "off", "no")


@contextlib.contextmanager
def reducing(numel: int):
    """Within it, this thread encodes and decodes pieces of a vector of ``numel`` elements:
    when the vector is worth compiling for, pieces down to ``PIECE_MIN_NUMEL`` take the
    kernels. The choice depends on sizes alone, never on what this process compiled before,
    so a resumed run draws the same rounding noise as the uninterrupted one."""
    outer = getattr(_reduction, "numel", 0)
    _reduction.numel = numel
    try:
        yield
    finally:
        _reduction.numel = outer


def usable(device: torch.device, numel: int) -> bool:
    """Whether a fused kernel should run for ``numel`` elements on ``device``."""
    floor = PIECE_MIN_NUMEL if getattr(_reduction, "numel", 0) >= MIN_NUMEL else MIN_NUMEL
    if numel < floor or not enabled() or not hasattr(torch, "compile"):
        return False
    return device.type == "cpu" or (device.type == "cuda" and _triton_available())


def _triton_available() -> bool:
    try:
        from torch.utils._triton import has_triton
        return has_triton()
    except ImportError:
        return False


def run(key: Hashable, build: Callable[[], Callable], *args):
    """The result of the kernel cached under ``key`` (compiled from ``build()`` on first
    use) on ``args``, whose first dimensions may vary between calls without recompiling.
    None when the kernel is unavailable: the caller then does the work eagerly (a kernel
    writes only into output tensors among ``args``, which the eager path overwrites)."""
    if key in _broken:
        return None
    try:
        kernel = _kernels.get(key)
        if kernel is None:
            with _lock:
                kernel = _kernels.get(key)
                if kernel is None:
                    kernel = _kernels[key] = torch.compile(_own_code(build()), dynamic=False)
        for arg in args:
            if isinstance(arg, torch.Tensor) and arg.dim() > 0:
                torch._dynamo.maybe_mark_dynamic(arg, 0)
        return kernel(*args)
    except Exception as error:  # a compiler missing or failing: eager from now on
        _broken[key] = repr(error)
        message = str(error).strip().splitlines()
        logger.warning("commpress: compiled kernel %s failed (%s); using the eager code",
                       key, message[-1] if message else type(error).__name__)
        return None


def _own_code(fn: Callable) -> Callable:
    """``fn`` with a code object of its own. Dynamo keeps compiled graphs, and counts them
    against its recompile limit (8), per code object; the kernels of every QSGD width, norm
    and output layout are closures of one function, so past the eighth it silently ran the
    uncompiled Python (~10x slower)."""
    return types.FunctionType(fn.__code__.replace(), fn.__globals__, fn.__name__,
                              fn.__defaults__, fn.__closure__)


def _mix(h: torch.Tensor) -> torch.Tensor:
    """Chris Wellons' ``lowbias32`` integer hash on int32 (wrapping multiplies; logical
    shifts by masking the arithmetic ones)."""
    h = h ^ ((h >> 16) & 0xFFFF)
    h = h * 0x7FEB352D
    h = h ^ ((h >> 15) & 0x1FFFF)
    h = h * (0x846CA68B - (1 << 32))
    return h ^ ((h >> 16) & 0xFFFF)


def _keyed(counter: torch.Tensor, key: torch.Tensor, stream: int = 0) -> torch.Tensor:
    """32 random bits (int32) per ``counter``, from the key words ``key[2*stream]`` and
    ``key[2*stream + 1]``."""
    return _mix(_mix(counter ^ key[2 * stream]) ^ key[2 * stream + 1])


def hashed_bits(key: torch.Tensor, groups: int, device: torch.device, stream: int = 0) -> list:
    """Four columns of ``groups`` uniform 23-bit integers (int32) each, from three hashes per
    group (counters ``3g, 3g + 1, 3g + 2`` under the key words ``key[2*stream]`` and
    ``key[2*stream + 1]``): the first three take the top 23 bits of one hash each, the fourth
    23 of the 27 bits the three leave. Disjoint bits: a quarter less hashing than a hash per
    value, with all 23 bits random."""
    first = torch.arange(groups, dtype=torch.int32, device=device) * 3
    words = [_keyed(first + k, key, stream) for k in range(3)]
    columns = [(word >> 9) & 0x7FFFFF for word in words]
    columns.append((words[0] & 0x1FF) | ((words[1] & 0x1FF) << 9) | ((words[2] & 0x1F) << 18))
    return columns


def hashed_uniforms(key: torch.Tensor, groups: int, per_group: int, device: torch.device) -> list:
    """``per_group`` columns of ``groups`` uniforms in ``(1, 2)`` each (fp32), on the grid
    ``1 + (k + 1/2) / 2**16``: value ``c`` of group ``g`` is the low (even ``c``) or high half
    of the hash of counter ``g * ceil(per_group / 2) + c // 2``. Rounding up with
    ``P(u - 1 < p)`` then misses ``p`` by at most ``2**-17``, below the fp32 rounding of the
    codecs' own arithmetic at 8 bits."""
    words = -(-per_group // 2)
    group = torch.arange(groups, dtype=torch.int32, device=device) * words
    columns = []
    for k in range(per_group):
        if k % 2 == 0:
            word = _keyed(group + k // 2, key)
        half = (word >> (16 * (k % 2))) & 0xFFFF
        columns.append(half.float() * 2.0 ** -16 + (1.0 + 2.0 ** -17))
    return columns


def draw_key(generator: Optional[torch.Generator], device: torch.device, streams: int = 1) -> torch.Tensor:
    """The key words of :func:`hashed_bits` and :func:`hashed_uniforms` for ``streams``
    streams, drawn from ``generator`` on ``device`` (no host round trip on accelerators)."""
    words = torch.empty(2 * streams, dtype=torch.int32, device=device)
    return words.random_(-(1 << 31), (1 << 31) - 1, generator=generator)
