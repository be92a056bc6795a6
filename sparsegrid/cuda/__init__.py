"""CuPy kernels: the GPU half of the kernel contract.

Exports every name of :data:`sparsegrid.backend.KERNEL_CONTRACT` with the signatures and
results of :mod:`sparsegrid.cpu`; arrays are CuPy arrays. Kernel sources live in
``kernels/*.cu`` and are compiled by NVRTC through ``cupy.RawModule`` on first use, once
per device (CuPy caches the binaries on disk). Importing this package imports nothing
from CuPy: it is loaded when the first kernel runs.

Host synchronisations (each a read of a size or a flag, never a per-offset round trip):
building an index (whether keys are already sorted), a rulebook (its pair count), a
convolution plan (the offset pointers, once per rulebook), unique keys (their count),
segment ids' bounds (one read), and the checks that raise on bad input.

Convolutions run the fused implicit-GEMM tensor-core kernel or gather-GEMM-scatter, per
layer (:mod:`sparsegrid.cuda.autotune`): :func:`set_conv_algorithm` /
:func:`conv_algorithm` pin one, :func:`set_tf32` / :func:`tf32` let float32 run as TF32.
"""

import functools as _functools

from ..backend import KERNEL_CONTRACT as _CONTRACT
from .blocks import block_gather, block_scatter
from .conv import conv_backward, conv_forward, prepare_conv, rows_product, rule_sum
from .dense import dense_active_sites, gather_from_dense, scatter_to_dense
from .index import build_index, first_duplicate, query_index, unique_inverse
from .norm import batch_norm_backward, batch_norm_forward, batch_norm_statistics
from .pool import max_pool_backward, max_pool_forward
from .rules import (full_rules, offset_rules, strided_rules, submanifold_rules,
                    window_rules)
from .segment import SEGMENT_MODES, segment_reduce, segment_reduce_backward
from ._runtime import cp as _cp
from .autotune import (conv_algorithm, get_conv_algorithm, get_tf32, set_conv_algorithm,
                       set_tf32, tf32)


def _argument_device(args, kwargs):
    """The device of the first CuPy array among the arguments (a rulebook's pairs count)."""
    from ..rulebook import Rulebook
    for value in (*args, *kwargs.values()):
        if isinstance(value, Rulebook):
            value = value.in_idx
        if isinstance(value, _cp.ndarray):
            return value.device
    return None


def _on_argument_device(function):
    """Run ``function`` with its arrays' GPU as the current device: every allocation,
    library call and kernel launch inside happens there (CuPy's default is the current
    device, not the arrays')."""
    @_functools.wraps(function)
    def call(*args, **kwargs):
        device = _argument_device(args, kwargs)
        if device is None:
            return function(*args, **kwargs)
        with device:
            return function(*args, **kwargs)
    return call


for _name in _CONTRACT:
    globals()[_name] = _on_argument_device(globals()[_name])
del _name

__all__ = [
    "block_gather", "block_scatter",
    "batch_norm_backward", "batch_norm_forward", "batch_norm_statistics", "build_index",
    "conv_backward", "conv_forward", "dense_active_sites", "first_duplicate", "full_rules",
    "gather_from_dense", "max_pool_backward", "max_pool_forward", "offset_rules",
    "prepare_conv", "query_index", "rows_product", "rule_sum", "scatter_to_dense",
    "SEGMENT_MODES", "segment_reduce", "segment_reduce_backward", "strided_rules",
    "submanifold_rules", "unique_inverse", "window_rules",
    # algorithm settings (not part of the kernel contract)
    "conv_algorithm", "get_conv_algorithm", "get_tf32", "set_conv_algorithm", "set_tf32",
    "tf32",
]
