"""The one registry of hook names (``"qsgd4"``, ``"natural+ef"``, ...): every place a hook is
named (``register_hook``, ``state_from_name``, ``commpress train``, the Lightning strategy,
the benchmarks) looks names up here."""
from __future__ import annotations

import functools
from typing import Callable, Dict, List, Optional

from .codecs import (BF16, FP16, QSGD, Codec, EliasQSGD, Identity, NaturalCompression,
                     NaturalDithering, Rotated, ScaledSign)
from .config import FEEDBACK_KINDS

#: hook name -> factory of its codec; one table behind every place a hook is named
#: (register_hook, state_from_name, ``commpress train``, the Lightning strategy, benchmarks)
_NAMED_HOOKS: Dict[str, Callable[[], Codec]] = {}


def register_named_hook(name: str, codec_factory: Callable[[], Codec]) -> None:
    """Make ``name`` (and ``name+ef``, ``name+ef21``) a hook name, e.g. for a codec of your
    own. A taken name is refused, as codec names and wire ids are (see
    :func:`commpress.codecs.register_codec`): a plugin cannot silently replace a built-in.

    Example::

        >>> commpress.register_named_hook("qsgd4-l2", lambda: QSGD(bits=4, norm="l2"))
        >>> state = commpress.register_hook(ddp_model, "qsgd4-l2+ef")
    """
    key = name.lower() if isinstance(name, str) else name
    if not isinstance(key, str) or not key or "+" in key or not key.isprintable() or " " in key:
        raise ValueError(f"a hook name is a non-empty word without '+' or spaces, got {name!r}")
    if not callable(codec_factory):
        raise TypeError(f"codec_factory must be callable (returning a Codec), got {codec_factory!r}")
    if key in _NAMED_HOOKS:
        raise ValueError(f"hook name {name!r} is already registered")
    _NAMED_HOOKS[key] = codec_factory


def named_hooks() -> List[str]:
    """The registered hook names (each also takes ``+ef`` or ``+ef21``)."""
    return sorted(_NAMED_HOOKS)


def split_name(name: str):
    """``(codec factory, error_feedback or None)`` of a hook name such as ``"qsgd4+ef"``."""
    base, plus, feedback = name.lower().partition("+") if isinstance(name, str) else (name, "", "")
    if base not in _NAMED_HOOKS or (plus and feedback not in FEEDBACK_KINDS):
        raise ValueError(f"unknown hook {name!r}; known: {', '.join(named_hooks())} "
                         "(optionally with +ef or +ef21)")
    return _NAMED_HOOKS[base], feedback or None


def codec_from_name(name: str) -> Codec:
    """A fresh codec of hook ``name`` (without its feedback suffix)."""
    return split_name(name)[0]()


def _rotated_qsgd(bits: int) -> Rotated:
    return Rotated(QSGD(bits=bits, bucket_size=128 if bits <= 2 else 512))


for _name, _factory in {
        "fp32": Identity, "fp16": FP16, "bf16": BF16,
        # qsgd1 ... qsgd8, every width QSGD takes; 1 and 2 bits with smaller buckets (fewer
        # levels need a tighter scale)
        **{f"qsgd{bits}": functools.partial(QSGD, bits=bits, bucket_size=128 if bits <= 2 else 512)
           for bits in range(1, 9)},
        # the same, rotated first (a randomized Hadamard transform, see codecs.rotation)
        **{f"qsgd{bits}r": functools.partial(_rotated_qsgd, bits=bits) for bits in range(1, 9)},
        # qsgd2e ... qsgd4e: the quantization of qsgd2 ... qsgd4, the paper's variable-length
        # coding instead of fixed-width codes (fewer bits, the same values)
        **{f"qsgd{bits}e": functools.partial(EliasQSGD, levels=2 ** (bits - 1) - 1,
                                             bucket_size=128 if bits <= 2 else 512, norm="max")
           for bits in range(2, 5)},
        # elias1 ... elias16: the paper's analysed variant, s levels of L2-scaled buckets of 512,
        # variable-length coded (about 0.36, 0.6, 0.9, 1.4, 2.1 bits per entry on real gradients)
        **{f"elias{levels}": functools.partial(EliasQSGD, levels=levels) for levels in (1, 2, 4, 8, 16)},
        # one bit: the sign times the bucket's mean magnitude (biased: use +ef), and rotated
        "sign": ScaledSign, "signr": lambda: Rotated(ScaledSign()),
        "natural": NaturalCompression, "cnat": NaturalCompression,
        "dithering": NaturalDithering, "dnat": NaturalDithering}.items():
    register_named_hook(_name, _factory)


def state_of(spec, state_type: type, from_codec: Callable, caller: str, **kwargs):
    """A front end's state from what its user passed: a ``state_type`` itself (no
    ``kwargs``), a hook name such as ``"qsgd4+ef"`` or a :class:`~commpress.Codec`, the last
    two made with ``from_codec(codec, **kwargs)`` (a name's ``+ef``/``+ef21`` as
    ``error_feedback``)."""
    if isinstance(spec, str):
        factory, feedback = split_name(spec)
        if feedback:
            kwargs["error_feedback"] = feedback
        return from_codec(factory(), **kwargs)
    if isinstance(spec, Codec):
        return from_codec(spec, **kwargs)
    if not isinstance(spec, state_type):
        raise TypeError(f"{caller} takes a {state_type.__name__}, a hook name such as 'qsgd4+ef' "
                        f"or a Codec, got {type(spec).__name__}")
    if kwargs:
        raise TypeError("keyword arguments are only accepted with a hook name or a codec; this "
                        f"{state_type.__name__} is configured already")
    return spec


def codec_of(codec, error_feedback: Optional[str]):
    """``(codec, error_feedback)`` for a front end that takes a :class:`~commpress.Codec` or a
    hook name (``"qsgd4+ef"``: its codec, and its feedback unless one is given)."""
    if not isinstance(codec, str):
        return codec, error_feedback
    factory, suffix = split_name(codec)
    return factory(), error_feedback or suffix
