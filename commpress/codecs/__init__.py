"""Codecs: pure tensor <-> :class:`Payload` transforms; nothing here knows about ranks."""
from .base import Codec, contractive_factor, saturating_cast
from .registry import codec_names, get_codec, register_codec
from .wire import HEADER_BYTES, Payload, PayloadError
from .elias import EliasQSGD
from .floats import BF16, FP16, Identity
from .natural import NaturalCompression, NaturalDithering
from .qsgd import QSGD
from .rotation import Rotated
from .sign import ScaledSign

__all__ = ["Codec", "Payload", "PayloadError", "HEADER_BYTES", "get_codec", "codec_names", "register_codec",
           "contractive_factor", "QSGD", "EliasQSGD", "NaturalCompression", "NaturalDithering", "Identity",
           "FP16", "BF16", "Rotated", "ScaledSign", "saturating_cast"]
