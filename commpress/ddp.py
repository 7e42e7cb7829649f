"""DDP front end: a communication hook that averages gradient buckets through compression.

Two lines in a DDP script::

    state = commpress.CompressionState(codec=commpress.QSGD(bits=4))
    commpress.register_hook(ddp_model, state)   # or ddp_model.register_comm_hook(state, compress_hook)

The hook follows DDP's contract: it returns a ``Future`` of a tensor shaped like the bucket
holding the *mean* of the gradients over ranks. Each bucket's reduction runs on one background
thread per state, in bucket order (see :mod:`commpress.comm.ordered`), so communication
overlaps the rest of the backward pass.
"""

import json
import logging
from typing import Dict, Optional

import torch
import torch.distributed as dist

from .codecs import FP16, BF16, QSGD, Codec, Identity, NaturalCompression, NaturalDithering
from .comm.collectives import ALGORITHMS
from .comm.ordered import OrderedExecutor
from .comm.transport import (TorchTransport, Transport, group_timeout, node_layout,
                             torch_hierarchical_transport)
from .feedback import KINDS, ErrorFeedback, reduce_mean
from .stats import CommStats

logger = logging.getLogger("commpress")

_FP32 = Identity()


class CompressionState:
    """Configuration and memory of :func:`compress_hook`.

    Args:
        codec: the :class:`~commpress.Codec` applied to each bucket's large layers.
        process_group: the group to reduce over (None: the default group).
        collective: ``"allgather"``, ``"reduce_scatter"``, ``"allreduce"`` (summable codecs
            only), ``"hierarchical"`` (fp32 inside a node, compressed between nodes; nodes from
            torchrun's ``GROUP_RANK``, see :func:`commpress.comm.transport.node_id`) or
            ``"auto"`` (a cost model, see :func:`commpress.comm.collectives.choose_algorithm`,
            hierarchical when there are several nodes of several ranks).
        error_feedback: None, ``"ef"`` or ``"ef21"`` (see :mod:`commpress.feedback`).
        server_feedback: with ``"ef"``, also keep the residual of ``reduce_scatter``'s second
            quantization at the reducing rank.
        start_iter: plain fp32 all-reduce for the first ``start_iter`` steps; must be >= 2 with
            error feedback, because DDP rebuilds its buckets after the first iteration.
        min_numel: parameters with fewer elements, and all 1-D ones (biases, norms), are sent
            uncompressed in one fp32 all-reduce per bucket: compressing them saves little and
            costs accuracy.
        seed: stochastic rounding on rank ``r`` uses a generator seeded from ``(seed, r)``, so
            noise is independent across ranks and runs are reproducible.
        log_every: log :attr:`stats` on rank 0 every this many steps (0: never).

    Like PyTorch's ``PowerSGDState``, it pickles without its process group (which falls back to
    the default group) and has ``state_dict()``/``load_state_dict()`` covering the step
    counter, the error-feedback memories, the random generators and the statistics.

    Example::

        >>> state = CompressionState(codec=QSGD(bits=4), collective="auto", error_feedback=None)
        >>> ddp_model.register_comm_hook(state, compress_hook)
        >>> ...train...
        >>> print(state.stats.summary())
    """

    def __init__(self, codec: Codec, process_group: Optional[dist.ProcessGroup] = None,
                 collective: str = "auto", error_feedback: Optional[str] = None,
                 server_feedback: bool = False, start_iter: int = 2, min_numel: int = 1024,
                 seed: int = 0, log_every: int = 100):
        if not isinstance(codec, Codec):
            raise TypeError(f"codec must be a commpress Codec, got {type(codec).__name__}")
        if collective != "auto" and collective not in ALGORITHMS:
            raise ValueError(f"collective must be 'auto' or one of {ALGORITHMS}, got {collective!r}")
        if collective == "allreduce" and not codec.summable:
            raise ValueError(f"collective 'allreduce' needs a summable codec (identity, fp16, "
                             f"bf16); {codec!r} payloads cannot be added")
        if error_feedback is not None and error_feedback not in KINDS:
            raise ValueError(f"error_feedback must be None or one of {KINDS}, got {error_feedback!r}")
        if not isinstance(start_iter, int) or start_iter < 0:
            raise ValueError(f"start_iter must be a non-negative integer, got {start_iter!r}")
        if error_feedback is not None and start_iter < 2:
            raise ValueError("start_iter must be >= 2 with error feedback: DDP rebuilds its "
                             "buckets after the first iteration")
        if not isinstance(min_numel, int) or min_numel < 0:
            raise ValueError(f"min_numel must be a non-negative integer, got {min_numel!r}")
        self.codec = codec
        self.process_group = process_group
        self.collective = collective
        self.error_feedback = error_feedback
        self.start_iter = start_iter
        self.min_numel = min_numel
        self.seed = seed
        self.log_every = log_every
        self.iter = 0
        self.stats = CommStats()
        #: AC/DC phase ("dense" or "sparse") and per-phase statistics, set by :class:`commpress.ACDC`
        self.phase = "dense"
        self.phase_stats = {"dense": CommStats(), "sparse": CommStats()}
        if server_feedback and error_feedback != "ef":
            raise ValueError("server_feedback=True needs error_feedback='ef'")
        self.server_feedback = server_feedback
        self.feedback = ErrorFeedback(error_feedback, server_feedback) if error_feedback else None
        self._init_runtime()

    def _init_runtime(self):
        self.param_index: Dict[torch.Tensor, int] = {}
        self.masks: Dict[torch.Tensor, torch.Tensor] = {}
        self._agreed_phase: Optional[str] = None
        self._keep_cache: Dict[tuple, Optional[torch.Tensor]] = {}
        self._transport: Optional[TorchTransport] = None
        self._compressed_transport: Optional[Transport] = None
        self._executor: Optional[OrderedExecutor] = None
        self._generators: Dict[str, torch.Generator] = {}
        self._saved_rng: Dict[str, torch.Tensor] = {}

    # -- runtime pieces, created on first use (they need an initialized process group) -----
    @property
    def transport(self) -> TorchTransport:
        """A transport over a private copy of ``process_group``. DDP issues collectives of its
        own on the user's group (e.g. the unused-parameter map with
        ``find_unused_parameters=True``) from the backward thread, while the hook's reductions
        run on the background thread: sharing one group would let the two interleave
        differently on different ranks and mismatch. Created on first use by every member."""
        if self._transport is None:
            if not dist.is_available() or not dist.is_initialized():
                raise RuntimeError("torch.distributed is not initialized: call "
                                   "torch.distributed.init_process_group() first")
            group = self.process_group or dist.group.WORLD
            private = dist.new_group(dist.get_process_group_ranks(group),
                                     backend=dist.get_backend(group), timeout=group_timeout(group),
                                     use_local_synchronization=True)
            self._transport = TorchTransport(private)
        return self._transport

    @property
    def compressed_transport(self) -> Transport:
        """The transport of the compressed reductions: :attr:`transport`, or for the
        hierarchical collective (and ``auto`` on several nodes of several ranks) one that also
        holds node-local and cross-node groups. Created at the first compressed step, after
        the ranks have agreed on the configuration, with one small all-gather of node ids."""
        if self._compressed_transport is None:
            transport = self.transport
            auto = self.collective == "auto" and not self.codec.summable
            if self.collective == "hierarchical" or auto:
                layout = node_layout(transport)
                if not auto or 1 < len(layout) < transport.world_size:
                    transport = torch_hierarchical_transport(transport, layout)
            self._compressed_transport = transport
        return self._compressed_transport

    @property
    def executor(self) -> OrderedExecutor:
        if self._executor is None:
            self._executor = OrderedExecutor()
        return self._executor

    def generator(self, device: torch.device) -> Optional[torch.Generator]:
        if not self.codec.stochastic:
            return None
        key = str(device)
        if key not in self._generators:
            gen = torch.Generator(device=device)
            if key in self._saved_rng:
                gen.set_state(self._saved_rng.pop(key))
            else:
                gen.manual_seed(self.seed * 1_000_003 + self.transport.rank)
            self._generators[key] = gen
        return self._generators[key]

    def set_masks(self, masks: Dict[torch.Tensor, torch.Tensor]) -> None:
        """Send only the gradient entries where ``masks[param]`` is true (zeros elsewhere);
        ``{}`` sends everything. Drops the error-feedback memories of masked-out entries.
        Called by :class:`commpress.ACDC` at every prune and restore."""
        self.masks = {p: m.reshape(-1).bool() for p, m in masks.items()}
        self._keep_cache = {}
        if self.feedback is not None and masks:
            self.feedback.mask_(masks)

    def bind(self, model: torch.nn.Module) -> "CompressionState":
        """Learn the model's parameters: their names, so error-feedback memories can be
        checkpointed, and their order, so compression does not depend on DDP's bucket order.
        :func:`register_hook` calls it."""
        self.param_index = {p: i for i, p in enumerate(model.parameters())}
        if self.feedback is not None:
            self.feedback.bind(model.named_parameters())
        return self

    # -- persistence ----------------------------------------------------------------------
    def _config(self) -> Dict:
        return {"codec": repr(self.codec), "collective": self.collective,
                "error_feedback": self.error_feedback, "server_feedback": self.server_feedback,
                "start_iter": self.start_iter,
                "min_numel": self.min_numel, "seed": self.seed}

    def state_dict(self) -> Dict:
        rng = {key: gen.get_state() for key, gen in self._generators.items()}
        return {"config": self._config(), "iter": self.iter, "rng": {**self._saved_rng, **rng},
                "feedback": self.feedback.state_dict() if self.feedback else None,
                "stats": self.stats.state_dict(), "phase": self.phase,
                "phase_stats": {k: v.state_dict() for k, v in self.phase_stats.items()}}

    def load_state_dict(self, state: Dict) -> None:
        if state["config"] != self._config():
            raise ValueError(f"checkpoint was made with {state['config']}, this state is "
                             f"{self._config()}")
        self.iter = state["iter"]
        self._generators, self._saved_rng = {}, dict(state["rng"])
        if self.feedback is not None:
            self.feedback.load_state_dict(state["feedback"])
        self.stats.load_state_dict(state["stats"])
        self.phase = state["phase"]
        for phase, saved in state["phase_stats"].items():
            self.phase_stats[phase].load_state_dict(saved)

    def __getstate__(self):
        state = {k: v for k, v in self.__dict__.items()
                 if k not in ("process_group", "_transport", "_compressed_transport", "_executor",
                              "_generators",
                              "_saved_rng", "param_index", "masks", "_keep_cache",
                              "_agreed_phase")}
        state["_saved_rng"] = {**self._saved_rng,
                               **{k: g.get_state() for k, g in self._generators.items()}}
        return state

    def __setstate__(self, state):
        saved_rng = state.pop("_saved_rng")
        self.__dict__.update(state)
        self.process_group = None
        self._init_runtime()
        self._saved_rng = saved_rng
        logger.warning("CompressionState unpickled: process_group is not serializable and was "
                       "reset to the default group")


def _segments(state: CompressionState, bucket):
    """Where each parameter's gradient lies in the bucket buffer: ``(small, big)``, lists of
    ``(offset, numel, param)`` for the parameters sent uncompressed and compressed. ``big`` is
    in model order when the model is bound, so a bucket compresses the same vector whichever
    order DDP put it in (DDP's first iteration uses registration order, later ones the order
    gradients become ready): this is what makes a resumed run bit-identical."""
    small, big, offset = [], [], 0
    for p in bucket.parameters():
        compress = p.dim() >= 2 and p.numel() >= state.min_numel
        (big if compress else small).append((offset, p.numel(), p))
        offset += p.numel()
    if state.param_index:
        big.sort(key=lambda seg: state.param_index.get(seg[2], -1))
    return small, big


def _gather(buffer, segments):
    if len(segments) == 1 and segments[0][1] == buffer.numel():
        return buffer
    parts = [buffer[o:o + n] for o, n, _ in segments]
    return torch.cat(parts) if parts else buffer[:0]


def _scatter(buffer, segments, values):
    start = 0
    for o, n, _ in segments:
        buffer[o:o + n].copy_(values[start:start + n])
        start += n


def _kept_indices(state: CompressionState, segments, device) -> Optional[torch.Tensor]:
    """Indices, in the gathered vector of ``segments``, of the entries under the AC/DC mask
    (None when no parameter of them is masked); cached until the masks change."""
    if not state.masks:
        return None
    key = tuple(id(p) for _, _, p in segments)
    if key not in state._keep_cache:
        parts, offset = [], 0
        for _, n, p in segments:
            mask = state.masks.get(p)
            kept = mask.to(device).nonzero().view(-1) if mask is not None else torch.arange(n, device=device)
            parts.append(kept + offset)
            offset += n
        masked = any(p in state.masks for _, _, p in segments)
        state._keep_cache[key] = torch.cat(parts) if masked else None
    return state._keep_cache[key]


def _reduce_group(state: CompressionState, buffer, segments, codec, collective,
                  feedback: Optional[ErrorFeedback], transport: Transport) -> None:
    """Average the gradients of ``segments`` over ranks through ``codec``, in place."""
    mean = reduce_mean(_gather(buffer, segments), [p for _, _, p in segments], codec,
                       transport, collective, feedback, state.generator(buffer.device),
                       state.stats, keep=_kept_indices(state, segments, buffer.device))
    _scatter(buffer, segments, mean)


_AGREEMENT_BYTES = 1024


def _check_agreement(state: CompressionState, phase: str) -> None:
    """Fail, on every rank, with the differing settings named, when ranks are configured
    differently; mixed codecs or phases would otherwise hang or mix payload formats. Runs at
    the first compressed step and whenever the phase changes: one 1 kB all-gather."""
    mine = {**state._config(), "phase": phase}
    del mine["seed"]  # may differ per rank by design
    raw = json.dumps(mine, sort_keys=True).encode()[:_AGREEMENT_BYTES]
    padded = torch.zeros(_AGREEMENT_BYTES, dtype=torch.uint8)
    padded[:len(raw)] = torch.frombuffer(bytearray(raw), dtype=torch.uint8)
    transport = state.transport
    gathered = transport.all_gather(padded.to(transport.device))
    gathered = gathered.cpu().view(transport.world_size, -1)
    configs = [json.loads(bytes(row.numpy()).rstrip(b"\0")) for row in gathered]
    differing = sorted(k for k in mine if len({json.dumps(c.get(k)) for c in configs}) > 1)
    if differing:
        detail = "; ".join(f"{k}: " + ", ".join(f"rank {r} {c.get(k)!r}" for r, c in enumerate(configs))
                           for k in differing)
        raise RuntimeError(f"commpress: ranks are configured differently ({detail})")
    state._agreed_phase = phase


def _reduce_bucket(state: CompressionState, buffer: torch.Tensor, small, big,
                   compress: bool, last: bool, phase: str) -> torch.Tensor:
    w = state.transport.world_size
    state.stats.add(dense_bytes=2 * (w - 1) * 4 * buffer.numel() // w)
    if compress and state._agreed_phase != phase:
        _check_agreement(state, phase)
    if not compress:
        small, big = small + big, []
    if small:
        _reduce_group(state, buffer, small, _FP32, "allreduce", None, state.transport)
    if big:
        _reduce_group(state, buffer, big, state.codec, state.collective, state.feedback,
                      state.compressed_transport)
    if last:
        state.stats.end_step()
        state.phase_stats[phase].absorb(state.stats.last_step)
        if state.log_every and state.stats.steps % state.log_every == 0 and state.transport.rank == 0:
            logger.info("commpress %s", state.stats.summary())
    return buffer


def compress_hook(state: CompressionState, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """DDP communication hook: the mean over ranks of ``bucket``, compressed with
    ``state.codec`` from step ``state.start_iter`` on (plain fp32 all-reduce before).

    Example::

        >>> state = CompressionState(codec=NaturalCompression())
        >>> ddp_model.register_comm_hook(state, compress_hook)
    """
    compress = state.iter >= state.start_iter
    last = bucket.is_last()
    if last:
        state.iter += 1
    small, big = _segments(state, bucket)
    buffer, phase = bucket.buffer(), state.phase
    return state.executor.submit(
        lambda: _reduce_bucket(state, buffer, small, big, compress, last, phase))


# -- named hooks, for command lines and configuration files ----------------------------------
NAMED_CODECS = {
    "fp32": Identity, "fp16": FP16, "bf16": BF16,
    "qsgd2": lambda: QSGD(bits=2, bucket_size=128), "qsgd4": lambda: QSGD(bits=4),
    "qsgd8": lambda: QSGD(bits=8), "natural": NaturalCompression, "cnat": NaturalCompression,
    "dithering": NaturalDithering, "dnat": NaturalDithering,
}


def state_from_name(name: str, **kwargs) -> CompressionState:
    """``"qsgd4"``, ``"natural"``, ... with an optional ``+ef`` or ``+ef21`` suffix,
    e.g. ``"qsgd4+ef"``; keyword arguments go to :class:`CompressionState`."""
    base, _, feedback = name.lower().partition("+")
    if base not in NAMED_CODECS:
        raise ValueError(f"unknown hook {name!r}; known: {', '.join(sorted(NAMED_CODECS))} "
                         "(optionally with +ef or +ef21)")
    if feedback:
        kwargs["error_feedback"] = feedback
    return CompressionState(codec=NAMED_CODECS[base](), **kwargs)


def register_hook(model: torch.nn.parallel.DistributedDataParallel, state, **kwargs) -> CompressionState:
    """Register :func:`compress_hook` on ``model`` with ``state`` (a :class:`CompressionState`
    or a name for :func:`state_from_name`), naming parameters for checkpoints. Returns the state.

    Example::

        >>> state = commpress.register_hook(ddp_model, "qsgd4+ef")
    """
    if isinstance(state, str):
        state = state_from_name(state, **kwargs)
    elif kwargs:
        raise TypeError("keyword arguments are only accepted with a hook name")
    state.bind(model.module if hasattr(model, "module") else model)
    model.register_comm_hook(state, compress_hook)
    return state
