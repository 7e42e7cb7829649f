"""Error-feedback memories, kept per parameter so they survive DDP's bucket rebuilds and resume.

- ``"ef"`` (EF-SGD / memory-SGD): send ``p = g + e``; keep ``e <- p - C(p)``. Needed by biased
  compressors, optional (off by default) for unbiased ones such as QSGD and C_nat.
- ``"ef21"`` (Richtarik et al., 2021): each worker keeps its estimate ``g_i`` and sends
  ``c_i = C(grad_i - g_i)``; then ``g_i += c_i`` and every rank applies ``g += mean(c_i)``,
  using ``g`` as the gradient.
- ``server=True`` (with ``"ef"``): a second memory for ``reduce_scatter``'s re-quantization of
  the averaged chunk, at the rank that reduces it (DeepSpeed 1-bit Adam's "server error").
  ``"ef21"`` always keeps it: its shared estimate ``g`` adds up what the collective returns,
  so without it every re-quantization error would stay in ``g`` for good (a random walk:
  training diverges). With it, ``g + server == mean_i g_i`` holds exactly: ``g`` lags the
  workers' mean by one quantization residual, never by their sum.

Each kind is a class behind one interface, :class:`ErrorFeedback` (``ErrorFeedback("ef")``
makes an :class:`EF`, ``ErrorFeedback("ef21")`` an :class:`EF21`): the reduction pipeline
(:func:`commpress.comm.pipeline.reduce_gradient`) calls :meth:`~ErrorFeedback.compensate`
before sending a flat vector made of whole parameters, and :meth:`~ErrorFeedback.update` after
the mean, with what was sent and what the kind asked the collective for
(:attr:`~ErrorFeedback.residual_in_place`: ``p - C(p)`` written over what was sent, piece by
piece; :attr:`~ErrorFeedback.keeps_local`: this rank's compressed contribution ``C(p)``), and
the server residual (:meth:`~ErrorFeedback.server_memory`): this module knows nothing of
collectives, and they know nothing of the kinds. Memories are fp32 and live
on the gradient's device. Keys are parameters (:func:`commpress.layout.flat_numel` gives the split) or, for
front ends without parameters (MPI arrays), names with explicit ``sizes``.
"""
from __future__ import annotations

from typing import Dict, Iterable, Optional, Sequence

import torch

from .codecs import Codec, contractive_factor
from .config import FEEDBACK_KINDS
from .finite import keep_finite
from .layout import flat_numel, to_bucket_order, to_row_major


def _sizes(params: Sequence, sizes) -> list:
    """How many values of a flat vector belong to each key: ``sizes`` where the caller gives
    them (names), else each parameter's :func:`flat_numel`."""
    return list(sizes) if sizes else [flat_numel(p) for p in params]


def _with_memories(store: Dict, params: Sequence, flat, sizes, subtract: bool) -> torch.Tensor:
    """A new fp32 vector: each parameter's part of ``flat`` plus (``subtract``: minus) its
    memory in ``store`` (none yet: zero), written in one pass. ``flat`` may be any vector that
    slices, such as the DDP hook's bucket :class:`~commpress.comm.segments.Segments`, whose
    slices inside one parameter are views."""
    out = torch.empty(sum(sizes), dtype=torch.float32, device=flat.device)
    offset = 0
    for param, n in zip(params, sizes):
        part, into, memory = flat[offset: offset + n], out[offset: offset + n], store.get(param)
        if memory is None:
            into.copy_(part)
        else:
            (torch.sub if subtract else torch.add)(part, memory, out=into)
        offset += n
    return out


class ErrorFeedback:
    """The memories of one error-feedback kind (see the module docstring), per parameter.
    ``ErrorFeedback(kind, server)`` makes the kind's class; subclasses give :data:`kind`,
    :data:`memories_kept`, :meth:`compensate` and :meth:`update`."""

    kind = ""
    #: the memories this kind keeps, by name
    memories_kept: tuple = ()
    #: the collective writes ``p - C(p)`` over what was sent (``FeedbackBuffers.residual``)
    residual_in_place = False
    #: the collective returns this rank's own compressed contribution ``C(p)`` (``keep_local``)
    keeps_local = False

    def __new__(cls, kind: Optional[str] = None, server: bool = False):
        if cls is ErrorFeedback:
            if kind not in KINDS:
                raise ValueError(f"error_feedback must be None or one of {FEEDBACK_KINDS}, "
                                 f"got {kind!r}")
            cls = KINDS[kind]
        return super().__new__(cls)

    def __init__(self, kind: Optional[str] = None, server: bool = False):
        if kind is not None and kind != self.kind:
            raise ValueError(f"{type(self).__name__} is error feedback {self.kind!r}, not {kind!r}")
        self.server = self._server(server)
        self._names = self.memories_kept + (("server",) if self.server else ())
        self.memories: Dict[str, Dict[torch.Tensor, torch.Tensor]] = {m: {} for m in self._names}
        self.names: Dict[torch.Tensor, str] = {}

    def _server(self, asked: bool) -> bool:
        """Whether this kind keeps the server residual when ``asked``."""
        return asked

    def bind(self, named_parameters: Iterable) -> None:
        """Give the parameters names, so memories can be saved and restored by name; memories
        loaded by name before binding move to their parameters. A loaded memory whose name
        is not a parameter's, or whose size differs from it, is refused with its name."""
        self.names = {param: name for name, param in named_parameters}
        by_name = {name: param for param, name in self.names.items()}
        for memory, store in self.memories.items():
            loaded = [k for k in store if isinstance(k, str)]
            for key in loaded:
                _check_fits(memory, key, store[key], by_name)
            for key in loaded:
                param = by_name[key]
                store[param] = to_bucket_order(param, store.pop(key).to(param.device, torch.float32))

    def adopt_other_rank(self) -> None:
        """After loading another rank's memories: drop those that belong to one rank (the EF
        and server residuals) and set EF21's worker estimates to the shared one, so that the
        shared estimate is again the mean of the workers' on every rank."""
        for memory in ("residual", "server"):
            if memory in self.memories:
                self.memories[memory] = {}

    # -- the two calls around a reduction ------------------------------------------------
    def compensate(self, params: Sequence, flat: torch.Tensor, sizes=None,
                   codec: Optional[Codec] = None) -> torch.Tensor:
        """What to compress instead of the gradient ``flat`` (which is left untouched): a
        new fp32 tensor, which :meth:`update` may reuse."""
        raise NotImplementedError

    def update(self, params: Sequence, sent: torch.Tensor, local: Optional[torch.Tensor],
               mean: torch.Tensor, sizes=None, mean_sizes=None) -> torch.Tensor:
        """Update the memories in place; return the vector to use as the averaged gradient.
        ``sent`` (what :meth:`compensate` returned, overwritten by the collective with
        ``p - C(p)`` when :attr:`residual_in_place`), ``local`` (this rank's ``C(p)`` when
        :attr:`keeps_local`, else None) and ``mean`` are consumed: the memories are updated
        through them with no full-size temporary. ``mean_sizes``: the split of ``mean`` when
        it is this rank's shard of the mean (a reduce-scatter's), not the whole of it."""
        raise NotImplementedError

    def server_memory(self, params: Sequence[torch.Tensor], like: torch.Tensor) -> Optional[torch.Tensor]:
        """The server residual for ``params`` (to pass to ``compressed_mean``, which updates it
        in place), or None. One parameter's is the memory itself, not a copy."""
        if not self.server:
            return None
        store = self.memories["server"]
        if len(params) == 1 and params[0] in store and store[params[0]].numel() == like.numel():
            return store[params[0]]
        return self._gather("server", params, like)

    def server_memories(self, params: Sequence, like: torch.Tensor, sizes=None) -> list:
        """Each parameter's server residual itself (zeros the first time), for a collective
        that updates them in place piece by piece: no concatenated copy, nothing to store."""
        store = self.memories["server"]
        for param, n in zip(params, _sizes(params, sizes)):
            if param not in store:
                store[param] = torch.zeros(n, device=like.device)
        return [store[param] for param in params]

    def store_server_memory(self, params: Sequence[torch.Tensor], residual: Optional[torch.Tensor]) -> None:
        if residual is not None:
            self._scatter("server", params, residual)

    def mask_(self, masks: Dict[torch.Tensor, torch.Tensor]) -> None:
        """Zero the memories where ``masks[param]`` is 0 (entries pruned by AC/DC)."""
        for memory in self.memories.values():
            for param, mask in masks.items():
                if param in memory:
                    memory[param].mul_(mask.reshape(-1).to(memory[param].dtype))

    # -- storage --------------------------------------------------------------------------
    def _gather(self, memory: str, params, like: torch.Tensor, sizes=None) -> torch.Tensor:
        store = self.memories[memory]
        sizes = _sizes(params, sizes)
        parts = [store[p] if p in store else torch.zeros(n, device=like.device)
                 for p, n in zip(params, sizes)]
        return torch.cat(parts) if parts else torch.zeros(0, device=like.device)

    def _scatter(self, memory: str, params, flat: torch.Tensor, sizes=None) -> None:
        store = self.memories[memory]
        for param, part in zip(params, flat.split(_sizes(params, sizes))):
            store[param] = part

    def _assign(self, memory: str, params, new: torch.Tensor, sizes=None, add: bool = False) -> None:
        """Set each parameter's memory to its part of ``new`` (``add``: add it to the memory,
        computing in ``new``, which is overwritten), in place where it exists; an entry that
        would not be finite keeps its old value (see :func:`commpress.finite.keep_finite`). A new memory is a
        copy: ``new`` may be the caller's buffer."""
        store = self.memories[memory]
        for param, part in zip(params, new.split(_sizes(params, sizes))):
            old = store.get(param)
            if old is None:
                store[param] = torch.nan_to_num(part, nan=0.0, posinf=0.0, neginf=0.0)
            else:
                keep_finite(part, old, add)

    def state_dict(self) -> Dict:
        out: Dict = {"kind": self.kind}
        for memory, store in self.memories.items():
            names = {k: k if isinstance(k, str) else self.names.get(k) for k in store}
            if None in names.values():
                raise RuntimeError("error-feedback memories cannot be saved without parameter "
                                   "names: register the hook with commpress.register_hook(model, "
                                   "state) or call state.bind(model) first")
            out[memory] = {names[k]: (v if isinstance(k, str) else to_row_major(k, v)).detach().cpu().clone()
                           for k, v in store.items()}
        return out

    def validate_state_dict(self, state) -> None:
        """Refuse, naming the entry, memories of another kind, unknown memories, and values
        that are not finite float vectors."""
        if not isinstance(state, dict) or state.get("kind") != self.kind:
            kind = state.get("kind") if isinstance(state, dict) else state
            raise ValueError(f"checkpoint holds {kind!r} error feedback, this state uses {self.kind!r}")
        unknown = sorted(set(state) - {"kind"} - set(self._names))
        if unknown:
            raise ValueError(f"checkpoint has unknown error-feedback memories {unknown} "
                             f"({self.kind} keeps {list(self._names)})")
        by_name = {name: param for param, name in self.names.items()}
        for memory in self._names:
            store = state.get(memory, {})
            if not isinstance(store, dict):
                raise ValueError(f"checkpoint memory {memory!r} must map names to tensors")
            for name, value in store.items():
                where = f"checkpoint memory {memory}[{name!r}]"
                if not isinstance(name, str):
                    raise ValueError(f"{where}: memories are keyed by parameter name")
                if not isinstance(value, torch.Tensor) or not value.dtype.is_floating_point:
                    raise ValueError(f"{where} is not a float tensor")
                if not bool(torch.isfinite(value).all()):
                    raise ValueError(f"{where} holds non-finite values")
                if by_name:  # bound: names and sizes now (else bind() checks them)
                    _check_fits(memory, name, value, by_name)

    def load_state_dict(self, state: Dict) -> None:
        """Memories come back keyed by name; :meth:`bind` (now if already bound, else when it
        is called) moves them to their parameters."""
        self.validate_state_dict(state)
        # copies: memories are updated in place, and must not write into the caller's dict
        self.memories = {m: {name: v.to(torch.float32, copy=True).reshape(-1)
                             for name, v in state.get(m, {}).items()}
                         for m in self._names}
        if self.names:
            self.bind((name, p) for p, name in self.names.items())


class EF(ErrorFeedback):
    """EF-SGD / memory-SGD: send ``p = g + e``; keep ``e <- p - C(p)``, which the collective
    writes over ``p`` as it encodes it (``residual_in_place``). ``server``: also keep the
    residual of reduce_scatter's second quantization at the reducing rank."""

    kind, memories_kept, residual_in_place = "ef", ("residual",), True

    def compensate(self, params, flat, sizes=None, codec=None):
        return _with_memories(self.memories["residual"], params, flat, _sizes(params, sizes),
                              subtract=False)

    def update(self, params, sent, local, mean, sizes=None, mean_sizes=None):
        self._assign("residual", params, sent, sizes)
        return mean


class EF21(ErrorFeedback):
    """EF21: each worker keeps its estimate ``g_i`` and sends ``c_i = C(grad_i - g_i)`` (it
    needs its own ``c_i`` back: ``keeps_local``); then ``g_i += c_i`` and ``g += mean(c_i)``.
    Always keeps the server residual (see the module docstring).

    EF21 assumes a contractive compressor; an unbiased one with relative variance
    ``omega > 1`` (QSGD-2) diverges. So it sends ``lam * (grad - g_i)`` with
    ``lam = 1 / (1 + omega)`` (:func:`commpress.codecs.contractive_factor`, exact for the
    vector). The estimates still add exactly what was sent, so ``g == mean_i g_i`` holds."""

    kind, memories_kept, keeps_local = "ef21", ("worker", "shared"), True

    def _server(self, asked: bool) -> bool:
        if asked:
            raise ValueError("server-side error feedback needs error_feedback='ef' (EF21 "
                             "always keeps it)")
        return True

    def compensate(self, params, flat, sizes=None, codec=None):
        diff = _with_memories(self.memories["worker"], params, flat, _sizes(params, sizes),
                              subtract=True)
        if codec is not None:
            diff.mul_(contractive_factor(codec, diff))
        return diff

    def update(self, params, sent, local, mean, sizes=None, mean_sizes=None):
        self._assign("worker", params, local, sizes, add=True)
        self._assign("shared", params, mean, mean_sizes or sizes, add=True)
        return mean

    def adopt_other_rank(self) -> None:
        """The residuals go; every worker estimate becomes the shared one, so that the shared
        estimate is again the mean of the workers'."""
        super().adopt_other_rank()
        self.memories["worker"] = {k: v.clone() for k, v in self.memories["shared"].items()}


#: the kinds, by the name ``error_feedback=`` takes
KINDS = {"ef": EF, "ef21": EF21}
assert tuple(KINDS) == FEEDBACK_KINDS


def _check_fits(memory: str, name: str, value: torch.Tensor, by_name: Dict) -> None:
    """Refuse a loaded memory that names no parameter of the model, or has another size."""
    where = f"checkpoint memory {memory}[{name!r}]"
    if name not in by_name:
        raise ValueError(f"{where}: the model has no parameter of that name")
    if value.numel() != flat_numel(by_name[name]):
        raise ValueError(f"{where} has {value.numel()} values, the parameter has "
                         f"{flat_numel(by_name[name])}")
