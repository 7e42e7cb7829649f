"""Where a parameter's gradient lies in a flat vector such as a DDP bucket: how many values
it takes and in which order (its strides', a complex value as two reals)."""
from __future__ import annotations

import torch


def flat_numel(param: torch.Tensor) -> int:
    """How many values ``param``'s gradient takes in a flat real vector such as a DDP bucket,
    which holds a complex value as its two reals (``torch.view_as_real``)."""
    return param.numel() * (2 if param.is_complex() else 1)


def _memory_order(param: torch.Tensor) -> list:
    """``param``'s dimensions, outermost in memory first: DDP lays a dense parameter's gradient
    out in the bucket with the parameter's strides (a channels_last weight is not row-major)."""
    order = sorted(range(param.dim()), key=lambda d: -param.stride(d))
    return order if param.permute(order).is_contiguous() else list(range(param.dim()))


def _real_layout(param: torch.Tensor):
    """``(shape, order)`` of ``param``'s values as reals (a complex value is its two reals,
    adjacent): the logical shape and the bucket's order of its dimensions."""
    extra = [2] if param.is_complex() else []
    return list(param.shape) + extra, _memory_order(param) + ([param.dim()] if extra else [])


def to_bucket_order(param: torch.Tensor, flat: torch.Tensor) -> torch.Tensor:
    """``flat`` (``param``'s values, row-major) in the order the bucket holds them."""
    shape, order = _real_layout(param)
    return flat.reshape(shape).permute(order).reshape(-1)


def to_row_major(param: torch.Tensor, flat: torch.Tensor) -> torch.Tensor:
    """The inverse of :func:`to_bucket_order`: checkpoints hold memories row-major, so that
    one saved from a channels_last model resumes into a contiguous one (or back)."""
    shape, order = _real_layout(param)
    inverse = sorted(range(len(order)), key=order.__getitem__)
    return flat.reshape([shape[d] for d in order]).permute(inverse).reshape(-1)
