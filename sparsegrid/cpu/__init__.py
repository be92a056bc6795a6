"""NumPy kernels: the CPU half of the kernel contract (DESIGN.md).

The CUDA backend provides the same names with the same signatures and results.
"""

from .conv import (ConvPlan, build_conv_plan, build_fast_plan, conv_backward, conv_forward,
                   fast_plan_available, rows_product, rule_sum)
from .jit import jit_enabled, set_jit_enabled
from .dense import dense_active_sites, gather_from_dense, scatter_to_dense
from .index import build_index, first_duplicate, query_index
from .norm import batch_norm_backward, batch_norm_forward, batch_norm_statistics
from .pool import max_pool_backward, max_pool_forward
from .rules import (full_rules, offset_rules, strided_rules, submanifold_rules,
                    window_rules)
from .threads import get_num_threads, parallel_map, set_num_threads
from .segment import SEGMENT_MODES, segment_reduce, segment_reduce_backward

__all__ = [
    "batch_norm_backward", "batch_norm_forward", "batch_norm_statistics", "build_conv_plan", "build_fast_plan",
    "fast_plan_available", "jit_enabled", "set_jit_enabled", "build_index", "ConvPlan",
    "conv_backward", "conv_forward", "dense_active_sites", "first_duplicate", "full_rules",
    "gather_from_dense", "max_pool_backward", "max_pool_forward", "query_index", "rows_product", "rule_sum",
    "scatter_to_dense", "SEGMENT_MODES", "segment_reduce", "segment_reduce_backward",
    "offset_rules", "strided_rules", "submanifold_rules", "window_rules", "get_num_threads", "parallel_map", "set_num_threads",
]
