"""commpress: communication compression for PyTorch data-parallel training."""
from .codecs import (BF16, FP16, QSGD, Codec, EliasQSGD, Identity, NaturalCompression, NaturalDithering,
                     Payload, Rotated, ScaledSign, codec_names, get_codec)
from .acdc import ACDC, ACDCSchedule
from .config import CompressionConfig
from .ddp import CompressionState, compress_hook, register_hook, state_from_name
from .names import codec_from_name, named_hooks, register_named_hook
from .stats import CommStats
from . import fsdp

__version__ = "0.1.0"
__all__ = ["Codec", "Payload", "get_codec", "codec_names", "QSGD", "EliasQSGD", "NaturalCompression",
           "NaturalDithering", "Rotated", "ScaledSign", "Identity", "FP16", "BF16", "CompressionConfig", "CompressionState",
           "compress_hook", "register_hook", "register_named_hook", "named_hooks",
           "codec_from_name", "state_from_name", "CommStats", "ACDC",
           "ACDCSchedule", "fsdp"]
