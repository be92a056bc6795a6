"""Explicit SIMD vectors for the generated numba kernels (``_jit_kernels.py``).

Imported only by the compiled-kernel module, so only when numba is used. A ``Vec`` is an
LLVM vector ``<L x float>`` / ``<L x double>`` held in registers; the kernels build their
register tiles from four operations:

- ``loadL(a, i, j)``: ``a[i, j:j+L]`` of a 2-D array (no bounds check: callers keep
  ``j + L <= a.shape[1]``),
- ``storeL(a, i, j, v)``: ``a[i, j:j+L] = v``,
- ``splatL(s)``: ``L`` copies of the scalar ``s``,
- ``fma(a, b, c)``: ``a * b + c`` lane by lane with one rounding (``llvm.fma``).

Why explicit vectors rather than scalar code left to LLVM's SLP vectoriser: LLVM tunes
its vectorisers for 256-bit vectors on Intel CPUs with AVX-512 ("prefer-vector-width"), so
scalar tiles never use the 512-bit registers; numba sets that preference process-wide and
offers no per-function switch. Vector types written out in the IR are kept as they are
(an AVX-512 target treats 512-bit vectors as legal unless a function asks otherwise), and
on a CPU without AVX-512 LLVM splits them into 256- or 128-bit halves: slower, never wrong.
The arithmetic is the same either way: each lane is one fused multiply-add in the order
the kernel writes, so results do not depend on the vector width.

numba's on-disk cache keys the kernels on ``_jit_kernels.py`` alone: after changing this
file, regenerate that one (``python -m sparsegrid.cpu.jit``) so cached kernels are rebuilt.
"""

from __future__ import annotations

from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic, models, register_model

__all__ = ["Vec", "fma"]


class Vec(types.Type):
    """numba type of an ``L``-lane vector of ``dtype`` (float32 or float64)."""

    def __init__(self, dtype, lanes):
        self.dtype = dtype
        self.lanes = lanes
        super().__init__(name=f"Vec({dtype} x {lanes})")


@register_model(Vec)
class _VecModel(models.PrimitiveModel):
    def __init__(self, dmm, fe_type):
        element = dmm.lookup(fe_type.dtype).get_value_type()
        super().__init__(dmm, fe_type, ir.VectorType(element, fe_type.lanes))


def _check_array(arr, what):
    if not (isinstance(arr, types.Array) and arr.ndim == 2
            and arr.dtype in (types.float32, types.float64)):
        raise TypeError(f"{what} needs a 2-D float32 or float64 array; got {arr}")


def _element_pointer(context, builder, sig, args):
    arr_ty, i_ty, j_ty = sig.args[:3]
    arr, i, j = args[:3]
    ary = context.make_array(arr_ty)(context, builder, arr)
    inds = [context.cast(builder, i, i_ty, types.intp), context.cast(builder, j, j_ty, types.intp)]
    return cgutils.get_item_pointer2(context, builder, data=ary.data,
                                     shape=cgutils.unpack_tuple(builder, ary.shape),
                                     strides=cgutils.unpack_tuple(builder, ary.strides),
                                     layout=arr_ty.layout, inds=inds,
                                     wraparound=False, boundscheck=False)


def _operations(lanes):
    @intrinsic
    def load(typingctx, arr, i, j):
        _check_array(arr, f"load{lanes}")
        vec = Vec(arr.dtype, lanes)

        def codegen(context, builder, sig, args):
            pointer = _element_pointer(context, builder, sig, args)
            vec_ty = context.get_value_type(vec)
            return builder.load(builder.bitcast(pointer, vec_ty.as_pointer()),
                                align=arr.dtype.bitwidth // 8)
        return vec(arr, i, j), codegen

    @intrinsic
    def store(typingctx, arr, i, j, value):
        _check_array(arr, f"store{lanes}")
        if value != Vec(arr.dtype, lanes):
            raise TypeError(f"store{lanes} into {arr} needs Vec({arr.dtype} x {lanes}); "
                            f"got {value}")

        def codegen(context, builder, sig, args):
            pointer = _element_pointer(context, builder, sig, args)
            builder.store(args[3], builder.bitcast(pointer, args[3].type.as_pointer()),
                          align=arr.dtype.bitwidth // 8)
            return context.get_dummy_value()
        return types.none(arr, i, j, value), codegen

    @intrinsic
    def splat(typingctx, scalar):
        if scalar not in (types.float32, types.float64):
            raise TypeError(f"splat{lanes} needs a float32 or float64 scalar; got {scalar}")
        vec = Vec(scalar, lanes)

        def codegen(context, builder, sig, args):
            vec_ty = context.get_value_type(vec)
            undef = ir.Constant(vec_ty, ir.Undefined)
            one = builder.insert_element(undef, args[0], ir.Constant(ir.IntType(32), 0))
            mask = ir.Constant(ir.VectorType(ir.IntType(32), lanes), [0] * lanes)
            return builder.shuffle_vector(one, undef, mask)
        return vec(scalar), codegen

    return load, store, splat


@intrinsic
def fma(typingctx, a, b, c):
    """``a * b + c`` lane by lane, rounded once."""
    if not (isinstance(a, Vec) and a == b == c):
        raise TypeError(f"fma needs three vectors of one type; got {a}, {b}, {c}")

    def codegen(context, builder, sig, args):
        vec_ty = args[0].type
        bits = 32 if a.dtype == types.float32 else 64
        name = f"llvm.fma.v{a.lanes}f{bits}"
        fn = cgutils.get_or_insert_function(builder.module,
                                            ir.FunctionType(vec_ty, [vec_ty] * 3), name)
        return builder.call(fn, list(args))
    return a(a, b, c), codegen


load4, store4, splat4 = _operations(4)
load8, store8, splat8 = _operations(8)
load16, store16, splat16 = _operations(16)
