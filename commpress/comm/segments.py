"""A vector made of views of one buffer, reduced piece by piece without being concatenated.

A DDP bucket interleaves large gradients (compressed) with small ones (biases, norms: sent in
fp32), so its large gradients are not one contiguous vector. Concatenating them and copying
the mean back costs two passes over the bucket and a bucket-sized temporary; the pipelined
collectives only ever touch one piece of about a million values at a time, so they read and
write the parts in place instead, copying only the few pieces that straddle two parts.
"""
from __future__ import annotations

import bisect
from typing import Callable, List, Sequence, Tuple

import torch

from ..codecs import saturating_cast


def _nothing() -> None:
    pass


def window(x, lo: int, hi: int, read: bool = True) -> Tuple[torch.Tensor, Callable[[], None]]:
    """Values ``[lo:hi]`` of ``x`` (a tensor or :class:`Segments`) to update, and what to call
    once they are updated (see :meth:`Segments.window`)."""
    return x.window(lo, hi, read) if isinstance(x, Segments) else (x[lo:hi], _nothing)


def destination(out, lo: int, hi: int) -> Tuple[torch.Tensor, Callable[[], None]]:
    """Where values ``[lo:hi]`` of ``out`` are written (their old values unread), and what to
    call once they are."""
    return window(out, lo, hi, read=False)


class Segments:
    """The concatenation of ``parts`` (1-D tensors of one dtype and device), without copying.

    Example::

        >>> bucket = torch.arange(10.0)
        >>> weights = Segments([bucket[0:4], bucket[6:10]])   # a bias at 4:6 left out
        >>> weights[2:6]                                      # a piece across both parts
        tensor([2., 3., 6., 7.])
    """

    def __init__(self, parts: Sequence[torch.Tensor]):
        if not parts or any(p.dim() != 1 for p in parts):
            raise ValueError("Segments needs at least one part, each 1-D")
        if len({(p.dtype, p.device) for p in parts}) != 1:
            raise ValueError("Segments' parts must share one dtype and device")
        self.parts: List[torch.Tensor] = list(parts)
        self.starts = [0]
        for part in self.parts:
            self.starts.append(self.starts[-1] + part.numel())
        self.shape = torch.Size([self.starts[-1]])
        self.dtype, self.device = self.parts[0].dtype, self.parts[0].device

    def numel(self) -> int:
        return self.shape[0]

    def dim(self) -> int:
        return 1

    def _spans(self, lo: int, hi: int) -> List[Tuple[int, int, int]]:
        """``(part, start, stop)`` of the parts' slices covering ``[lo, hi)``."""
        spans, index = [], max(bisect.bisect_right(self.starts, lo) - 1, 0)
        while index < len(self.parts) and self.starts[index] < hi:
            base = self.starts[index]
            spans.append((index, max(lo, base) - base, min(hi, self.starts[index + 1]) - base))
            index += 1
        return spans or [(0, 0, 0)]

    def __getitem__(self, window: slice) -> torch.Tensor:
        """Values ``[lo:hi]`` to read: a view inside one part, else a copy."""
        lo, hi, _ = window.indices(self.numel())
        spans = self._spans(lo, hi)
        if len(spans) == 1:
            index, start, stop = spans[0]
            return self.parts[index][start:stop]
        return torch.cat([self.parts[i][a:b] for i, a, b in spans])

    def window(self, lo: int, hi: int, read: bool = True) -> Tuple[torch.Tensor, Callable[[], None]]:
        """Values ``[lo:hi]`` to update in place, and what to call once they are: a view and
        nothing inside one part, else a temporary (holding their values when ``read``, else
        to be overwritten) and its write-back into the parts."""
        spans = self._spans(lo, hi)
        if len(spans) == 1:
            index, start, stop = spans[0]
            return self.parts[index][start:stop], _nothing
        values = (torch.cat([self.parts[i][a:b] for i, a, b in spans]) if read else
                  torch.empty(hi - lo, dtype=self.dtype, device=self.device))
        return values, lambda: self._copy_in(spans, values)

    def _copy_in(self, spans, values: torch.Tensor) -> None:
        """Write consecutive ``values`` into the parts' slices ``spans`` (saturating into a
        narrower dtype, see :func:`~commpress.codecs.saturating_cast`)."""
        values = saturating_cast(values, self.dtype)
        offset = 0
        for i, a, b in spans:
            self.parts[i][a:b].copy_(values[offset: offset + b - a])
            offset += b - a

    def split(self, sizes: Sequence[int]) -> List[torch.Tensor]:
        """The parts themselves, for writers that go part by part (error feedback's
        memories); only along the parts, so nothing written is lost in a copy."""
        if list(sizes) != [p.numel() for p in self.parts]:
            raise ValueError(f"Segments split only along their parts "
                             f"{[p.numel() for p in self.parts]}, not {list(sizes)}")
        return list(self.parts)

    def concatenated(self) -> torch.Tensor:
        """All values as one tensor (the single part itself when there is one)."""
        return self.parts[0] if len(self.parts) == 1 else torch.cat(self.parts)

    def assign(self, values: torch.Tensor) -> None:
        """Write ``values`` (as many as this holds) into the parts."""
        if len(self.parts) == 1 and values.data_ptr() == self.parts[0].data_ptr():
            return  # already there
        self._copy_in(self._spans(0, self.numel()), values)
