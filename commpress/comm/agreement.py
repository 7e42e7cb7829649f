"""Ranks agree on what they are about to reduce, before any collective whose sizes depend on it.

A rank configured differently (another codec, collective, bucket layout, step, AC/DC phase,
array length or dtype) would otherwise issue a collective of another size than its peers: gloo
aborts the process, MPI truncates or waits forever, and a format mix-up can even "succeed"
with a wrong mean. :func:`agree` is the one check every front end uses.

Every call has the same wire shape whatever it checks: one all-gather of an 8-byte digest, and
only when digests differ, one all-gather of a fixed-size description. So two *different*
checks issued by two ranks at the same point (one rank starting an AC/DC phase, the other the
next step) still pair up and fail with the differing fields named, instead of hanging.
"""
from __future__ import annotations

import hashlib
import json
from typing import Dict

import torch

from .transport import Transport

#: bytes of the description exchanged after a digest mismatch
DESCRIPTION_BYTES = 4096


class ConfigurationMismatch(RuntimeError):
    """Ranks of a group were about to reduce differently configured data."""


def _digest(fields: Dict) -> int:
    raw = json.dumps(fields, sort_keys=True, default=str).encode()
    return int.from_bytes(hashlib.blake2b(raw, digest_size=8).digest(), "little", signed=True)


def _describe(fields: Dict) -> torch.Tensor:
    raw = json.dumps(fields, sort_keys=True, default=str).encode()
    if len(raw) > DESCRIPTION_BYTES:  # keep it valid JSON: replace long values by their digest
        raw = json.dumps({k: (v if len(json.dumps(v, default=str)) < 64 else f"#{_digest(v):x}")
                          for k, v in fields.items()}, sort_keys=True, default=str).encode()
        if len(raw) > DESCRIPTION_BYTES:
            raw = b"{}"
    out = torch.zeros(DESCRIPTION_BYTES, dtype=torch.uint8)
    out[:len(raw)] = torch.frombuffer(bytearray(raw), dtype=torch.uint8)
    return out


def agree(transport: Transport, fields: Dict, device: torch.device = torch.device("cpu")) -> None:
    """Return when every rank of ``transport`` passed equal ``fields`` (a JSON-able dict); else
    raise :class:`ConfigurationMismatch` on every rank, naming each differing field and its
    value on each rank. ``device``: where the transport wants tensors (CUDA for NCCL)."""
    if transport.world_size == 1:
        return
    mine = torch.tensor([_digest(fields)], dtype=torch.int64, device=device)
    digests = transport.all_gather(mine)
    if bool((digests == digests[0]).all()):
        return
    rows = transport.all_gather(_describe(fields).to(device)).cpu().view(transport.world_size, -1)
    described = []
    for row in rows:
        try:
            described.append(json.loads(bytes(row.numpy()).rstrip(b"\0") or b"{}"))
        except ValueError:
            described.append({})
    keys = sorted({k for d in described for k in d})
    differing = [k for k in keys if len({json.dumps(d.get(k), sort_keys=True) for d in described}) > 1]
    detail = "; ".join(f"{k}: " + ", ".join(f"rank {r} {d.get(k)!r}" for r, d in enumerate(described))
                       for k in differing) or "descriptions too long to compare"
    raise ConfigurationMismatch(f"commpress: ranks are configured differently ({detail})")
