"""The codec registry: codecs by name (``get_codec("qsgd", bits=4)``) and by the wire
id their payloads carry."""
from __future__ import annotations

from typing import Callable, Dict

_REGISTRY: Dict[str, Callable] = {}


def codec_label(codec_id: int) -> str:
    """How an error names the codec of a wire ``codec_id``."""
    names = sorted({cls.name for cls in _REGISTRY.values() if cls.codec_id == codec_id})
    return f"{names[0]} (codec id {codec_id})" if names else f"an unknown codec (id {codec_id})"


def register_codec(*names: str):
    """Class decorator: make a codec constructible by ``get_codec(name, **kwargs)``. A name
    or a wire ``codec_id`` already taken by another codec is refused: payloads name their
    codec by id, so two codecs sharing one would decode each other's bytes."""
    def wrap(cls):
        for other in set(_REGISTRY.values()):
            if other is not cls and other.codec_id == cls.codec_id:
                raise ValueError(f"codec id {cls.codec_id} of {cls.__name__} is already "
                                 f"{other.__name__}'s")
        for name in names:
            if _REGISTRY.get(name, cls) is not cls:
                raise ValueError(f"codec name {name!r} is already {_REGISTRY[name].__name__}")
        for name in names:
            _REGISTRY[name] = cls
        return cls
    return wrap


def get_codec(name: str, **kwargs):
    """Build a codec by name, e.g. ``get_codec("qsgd", bits=4)``."""
    try:
        factory = _REGISTRY[name.lower()]
    except KeyError:
        raise ValueError(f"unknown codec {name!r}; known: {', '.join(sorted(_REGISTRY))}") from None
    return factory(**kwargs)


def codec_names() -> list:
    return sorted(_REGISTRY)
