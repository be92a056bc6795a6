"""NumPy + SciPy kernels: the CPU half of the kernel contract.

Exports every name of :data:`sparsegrid.backend.KERNEL_CONTRACT` (the CUDA backend provides
the same names with the same signatures and results). Thread controls
(:func:`get_num_threads`, :func:`set_num_threads`, :func:`parallel_map`) are this
backend's own and not part of the contract.
"""

from .blocks import block_gather, block_scatter
from .conv import conv_backward, conv_forward, prepare_conv, rows_product, rule_sum
from .dense import dense_active_sites, gather_from_dense, scatter_to_dense
from .index import build_index, first_duplicate, query_index, unique_inverse
from .norm import batch_norm_backward, batch_norm_forward, batch_norm_statistics
from .pool import max_pool_backward, max_pool_forward
from .rules import (full_rules, offset_rules, strided_rules, submanifold_rules,
                    window_rules)
from .segment import SEGMENT_MODES, segment_reduce, segment_reduce_backward
from .threads import get_num_threads, parallel_map, set_num_threads

__all__ = [
    "block_gather", "block_scatter",
    "batch_norm_backward", "batch_norm_forward", "batch_norm_statistics", "build_index",
    "conv_backward", "conv_forward", "dense_active_sites", "first_duplicate", "full_rules",
    "gather_from_dense", "get_num_threads", "max_pool_backward", "max_pool_forward",
    "offset_rules", "parallel_map", "prepare_conv", "query_index", "rows_product",
    "rule_sum", "scatter_to_dense", "SEGMENT_MODES", "segment_reduce",
    "segment_reduce_backward", "set_num_threads", "strided_rules", "submanifold_rules",
    "unique_inverse", "window_rules",
]
