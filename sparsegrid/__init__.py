"""sparsegrid: submanifold sparse convolutional networks on plain arrays.

Sparse tensors and rulebooks are NumPy arrays; the kernels in :mod:`sparsegrid.cpu` run
them. ``import sparsegrid`` imports NumPy only (never CuPy, never SciPy).
"""

from . import denseconv, functional
from .coords import kernel_offsets
from .cpu.threads import get_num_threads, set_num_threads
from .functional import (avg_pool, batch_norm, conv, deconv, from_dense, full_conv,
                         global_pool, input_layer, InputMap, max_pool, network_in_network,
                         output_layer, submanifold_conv, to_dense, unpool)
from .grid import Grid, Sites
from .rulebook import Rulebook
from .tensor import SparseTensor

__version__ = "0.1.0"

__all__ = [
    "avg_pool", "batch_norm", "denseconv", "get_num_threads", "set_num_threads", "conv", "deconv", "from_dense", "full_conv", "functional",
    "global_pool", "Grid", "input_layer", "InputMap", "kernel_offsets", "max_pool",
    "network_in_network", "output_layer", "Rulebook", "Sites", "SparseTensor",
    "submanifold_conv", "to_dense", "unpool", "__version__",
]
