"""Compressed collectives over a transport; they know codecs, never front ends."""
from .collectives import (ALGORITHMS, Channel, FeedbackBuffers, choose_algorithm, chunk_bounds,
                          compressed_mean, wire_bytes_per_rank)
from .loopback import LoopbackGroup, LoopbackTransport
from .ordered import OrderedExecutor
from .pipeline import Layout, reduce_gradient
from .transport import HierarchicalTransport, TorchTransport, Transport

__all__ = ["ALGORITHMS", "Channel", "FeedbackBuffers", "Layout", "choose_algorithm", "chunk_bounds",
           "compressed_mean", "wire_bytes_per_rank", "LoopbackGroup", "LoopbackTransport", "OrderedExecutor",
           "reduce_gradient", "HierarchicalTransport", "TorchTransport", "Transport"]
