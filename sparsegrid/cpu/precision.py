"""float16 data on the CPU kernels: converted to float32, computed, rounded once.

NumPy has no BLAS for float16 (its float16 ``matmul`` is a plain loop, hundreds of times
slower than float32's), and float16 sums rounded term by term lose about 11 bits per
thousand terms. So every kernel that adds or multiplies takes float16 arguments through
:func:`float16_in_float32`: the named float16 arrays are converted to float32, the float32
kernel runs unchanged (the same blocks, the same summation order), and each floating
result is rounded to float16 once at the end. float32 and float64 calls pass straight
through (one dtype comparison), so their bits are exactly those of the undecorated kernel.

Kernels that only move or compare values (gathers, scatters without addition, max pooling
forward, dense conversion, block gathers) are exact in float16 and run on it directly.
"""

from __future__ import annotations

import functools
import inspect

import numpy as np

_FLOAT16 = np.dtype(np.float16)


def _round_results(result):
    """float32 arrays (alone or in a tuple) to float16; anything else as it is."""
    if isinstance(result, tuple):
        return tuple(_round_results(value) for value in result)
    if getattr(result, "dtype", None) == np.float32 and hasattr(result, "astype"):
        return result.astype(np.float16)
    return result


def float16_in_float32(*names, round_results=True):
    """Decorate a kernel so float16 data runs in float32.

    Parameters
    ----------
    *names : str
        The array arguments to convert (when they are float16). The first one decides:
        when it is not a float16 array, the kernel is called as it is.
    round_results : bool
        Round float32 results to float16 (False for kernels whose results stay float32
        for float16 data: batch-norm statistics).

    The wrapper keeps the kernel's signature (``inspect.signature`` follows
    ``__wrapped__``), so the kernel contract's table still describes it. It only calls
    ``astype``, so it serves CuPy kernels too (the CUDA batch norm uses it).
    """
    def decorate(kernel):
        signature = inspect.signature(kernel)
        position = list(signature.parameters).index(names[0])

        @functools.wraps(kernel)
        def run(*args, **kwargs):
            first = args[position] if len(args) > position else kwargs.get(names[0])
            if getattr(first, "dtype", None) != _FLOAT16:
                return kernel(*args, **kwargs)
            bound = signature.bind(*args, **kwargs)
            for name in names:
                value = bound.arguments.get(name)
                if getattr(value, "dtype", None) == _FLOAT16:
                    bound.arguments[name] = value.astype(np.float32)
            result = kernel(*bound.args, **bound.kwargs)
            return _round_results(result) if round_results else result

        return run

    return decorate
