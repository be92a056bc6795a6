"""SBNet: block-sparse convolution (Ren et al., "SBNet: Sparse Blocks Network for Fast
Inference", CVPR 2018) on NumPy and CuPy arrays, differentiable.

A dense NHWC feature map is processed only on the blocks a mask marks active:
:func:`reduce_mask` turns the mask into a list of active blocks, :func:`sparse_gather`
stacks those blocks (with the halo a convolution needs), dense convolutions run on the
stack ("VALID", :mod:`sparsegrid.denseconv`), and :func:`sparse_scatter` puts the result
back into a base tensor (written, or added for a residual). :func:`calc_block_params`
derives the block geometry from a convolution; :func:`sparse_conv2d` and
:func:`sparse_residual` are the two pipelines. Names and arguments are SBNet's.

Geometry: block ``(n, bh, bw)`` covers rows ``block_offset[0] + bh * block_stride[0] +
[0, block_size[0])`` and the matching columns of image ``n``; pixels outside the image
read as zero when gathered and are dropped when scattered. Indices are int32 (n_blocks, 3),
n-major then bh, bw, on every backend; each block at most once.

Deliberate differences from SBNet (docs/sbnet.md): an all-inactive mask gives zero blocks
(not a dummy block); ``calc_block_params`` covers every output pixel (block counts are
``ceil(out / block_out)``); indices are int32, not int16; the gradient of a transposed
scatter is transposed too; overwriting scatters with overlapping blocks give a
deterministic result (the last block of the list wins, and only the winner receives the
gradient).
"""

from __future__ import annotations

import math
from collections import namedtuple

import numpy as np

from . import backend
from .autodiff.core import Tensor, data_of, is_grad_enabled
from .functional import _differentiable

BlockParams = namedtuple("BlockParams", ["bsize", "bsize_out", "boffset", "bcount",
                                         "bstrides"])
BlockParams.__doc__ = """Block geometry of one convolution (SBNet's names): input block size,
output block size, input block offset, block counts (H, W) covering the output, input block
strides. Each a pair (H, W)."""


# -- argument checks ----------------------------------------------------------------------

def _pair(name, value, minimum=None):
    if isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be an int or a pair of ints; got {value!r}")
    if isinstance(value, (int, np.integer)):
        value = (int(value), int(value))
    try:
        items = tuple(value)
    except TypeError:
        raise TypeError(f"{name} must be an int or a pair of ints; got "
                        f"{type(value).__name__} {value!r}") from None
    if len(items) != 2 or not all(isinstance(v, (int, np.integer))
                                  and not isinstance(v, (bool, np.bool_)) for v in items):
        raise TypeError(f"{name} must be an int or a pair of ints (H, W); got {value!r}")
    items = (int(items[0]), int(items[1]))
    if minimum is not None and min(items) < minimum:
        raise ValueError(f"{name} must be >= {minimum}; got {items}")
    return items


def _image(name, x):
    data = data_of(x)
    if not (isinstance(data, np.ndarray) or backend.is_cupy_array(data)):
        raise TypeError(f"{name} must be a NumPy/CuPy array or an autodiff Tensor (N, H, W, "
                        f"C); got {type(x).__name__}")
    if data.ndim != 4:
        raise ValueError(f"{name} must be 4-D NHWC (N, H, W, C); got shape {data.shape}")
    if data.dtype not in (np.float32, np.float64):
        raise TypeError(f"{name} must be float32 or float64; got dtype {data.dtype}")
    return data


def _indices(indices, n_images=None):
    data = data_of(indices)
    if not (isinstance(data, np.ndarray) or backend.is_cupy_array(data)):
        raise TypeError(f"indices must be an int32 array (n_blocks, 3) from reduce_mask; got "
                        f"{type(indices).__name__}")
    if data.ndim != 2 or data.shape[1] != 3:
        raise ValueError(f"indices must have shape (n_blocks, 3) of (n, bh, bw); got "
                         f"{data.shape}")
    if data.dtype.kind not in "iu":
        raise TypeError(f"indices must be integers; got dtype {data.dtype}")
    if len(data):               # one host read for every bound
        xp = backend.array_namespace(data)
        low, n_max, bh_max, bw_max = (int(v) for v in backend.to_numpy(xp.stack(
            [data.min(), data[:, 0].max(), data[:, 1].max(), data[:, 2].max()])))
        if low < 0:
            raise ValueError(f"indices must be >= 0; got {low}")
        if n_images is not None and n_max >= n_images:
            raise ValueError(f"indices name image {n_max} of {n_images}")
        if max(bh_max, bw_max) >= 2**31 - 1:
            raise ValueError(f"indices must be below 2**31 - 1 (int32 block numbers); got "
                             f"{max(bh_max, bw_max)}")
    return data.astype(np.int32, copy=False)


def _distinct(indices):
    """ValueError unless every block appears once (scatter relies on it)."""
    if len(indices) < 2:
        return
    xp = backend.array_namespace(indices)
    ordered = indices[xp.lexsort(indices.T[::-1])]        # rows sorted by (n, bh, bw)
    if bool((ordered[1:] == ordered[:-1]).all(axis=1).any()):
        raise ValueError("indices must name each block once (a block listed twice would be "
                         "scattered twice)")


def _geometry(block_size, block_offset, block_stride):
    return (_pair("bsize", block_size, 1), _pair("boffset", block_offset),
            _pair("bstride", block_stride, 1))


_LONG_NAMES = {"block_size": "bsize", "block_offset": "boffset", "block_stride": "bstride",
               "base": "ybase"}


def _long_names(function):
    """Accept the spelled-out keywords (``block_size``, ``block_offset``, ``block_stride``,
    ``base``) beside SBNet's (``bsize``, ``boffset``, ``bstride``, ``ybase``)."""
    import functools

    @functools.wraps(function)
    def call(*args, **kwargs):
        for long, short in _LONG_NAMES.items():
            if long in kwargs:
                if short in kwargs:
                    raise TypeError(f"{function.__name__}() got both {long} and {short} (the "
                                    "same argument)")
                kwargs[short] = kwargs.pop(long)
        return function(*args, **kwargs)
    return call


# -- reduce_mask ---------------------------------------------------------------------------

@_long_names
def reduce_mask(mask, block_count, bsize, boffset, bstride, tol=0.5, avgpool=False):
    """Active blocks of a mask: int32 (n_blocks, 3) of (n, bh, bw), n-major, bh, bw.

    Parameters
    ----------
    mask : (N, H, W) or (N, H, W, 1) array (bool or float), NumPy or CuPy
    block_count : (BCH, BCW): blocks considered per axis (bh < BCH, bw < BCW)
    bsize, boffset, bstride : block size, offset (usually minus the padding), stride
    tol : threshold: max pooling (default) marks a block active when some in-image pixel
        is > tol; ``avgpool`` when the sum of its in-image pixels over the full block area
        is > tol (out-of-image pixels count as 0)

    An all-inactive mask gives no blocks ((0, 3); SBNet returns a dummy block). Sums are
    exact (float64 integral images), so the result is the same on every backend.
    """
    data = data_of(mask)
    if not (isinstance(data, np.ndarray) or backend.is_cupy_array(data)):
        raise TypeError(f"mask must be an array (N, H, W) or (N, H, W, 1); got "
                        f"{type(mask).__name__}")
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise ValueError(f"mask must have shape (N, H, W) or (N, H, W, 1); got {data.shape}")
    if data.dtype.kind not in "biuf":
        raise TypeError(f"mask must be bool or numeric; got dtype {data.dtype}")
    count = _pair("block_count", block_count, 1)
    size, offset, stride = _geometry(bsize, boffset, bstride)
    tol = float(tol)
    if not math.isfinite(tol):
        raise ValueError(f"tol must be finite; got {tol}")
    xp = backend.array_namespace(data)
    n_images, height, width = data.shape
    values = data.astype(np.float64) if avgpool else (data.astype(np.float64) > tol).astype(
        np.float64)
    table = xp.zeros((n_images, height + 1, width + 1), dtype=np.float64)
    table[:, 1:, 1:] = xp.cumsum(xp.cumsum(values, axis=1), axis=2)

    r0 = xp.clip(offset[0] + xp.arange(count[0], dtype=np.int64) * stride[0], 0, height)
    r1 = xp.clip(offset[0] + xp.arange(count[0], dtype=np.int64) * stride[0] + size[0], 0,
                 height)
    c0 = xp.clip(offset[1] + xp.arange(count[1], dtype=np.int64) * stride[1], 0, width)
    c1 = xp.clip(offset[1] + xp.arange(count[1], dtype=np.int64) * stride[1] + size[1], 0,
                 width)
    total = (table[:, r1[:, None], c1[None, :]] - table[:, r0[:, None], c1[None, :]]
             - table[:, r1[:, None], c0[None, :]] + table[:, r0[:, None], c0[None, :]])
    active = total / (size[0] * size[1]) > tol if avgpool else total > 0
    return xp.argwhere(active).astype(np.int32)


# -- gather / scatter ------------------------------------------------------------------------

def _to_blocks_layout(blocks, transpose):
    """(nb, BH, BW, C) from the user's layout ((nb, C, BH, BW) when ``transpose``)."""
    xp = backend.array_namespace(blocks)
    return xp.ascontiguousarray(blocks.transpose(0, 2, 3, 1)) if transpose else blocks


def _from_blocks_layout(blocks, transpose):
    xp = backend.array_namespace(blocks)
    return xp.ascontiguousarray(blocks.transpose(0, 3, 1, 2)) if transpose else blocks


@_long_names
def sparse_gather(x, indices, bsize, boffset, bstride, transpose=False):
    """The blocks of NHWC ``x`` named by ``indices``: (nb, BH, BW, C), or (nb, C, BH, BW)
    with ``transpose``. Out-of-image pixels are zero; blocks may overlap.

    Differentiable in ``x`` (an autodiff Tensor): the adjoint adds the block gradients back
    (overlaps accumulate)."""
    data = _image("x", x)
    idx = _indices(indices, data.shape[0])
    geometry = _geometry(bsize, boffset, bstride)
    _distinct(idx)          # the gradient scatters the blocks back: each block once
    kernels = backend.kernels(data, idx)
    out = _from_blocks_layout(kernels.block_gather(data, idx, *geometry), transpose)

    def vjp(g):
        xp = backend.array_namespace(g)
        grad = kernels.block_scatter(_to_blocks_layout(g, transpose), idx,
                                     xp.zeros(data.shape, dtype=data.dtype), *geometry, True)
        return (grad,)

    return _differentiable(out, (x,), vjp)


@_long_names
def sparse_scatter(blocks, indices, ybase, bsize, boffset, bstride, add=False,
                   transpose=False, inplace=False):
    """A copy of ``ybase`` (N, H, W, C) with the blocks (nb, BH, BW, C) -- (nb, C, BH, BW)
    with ``transpose`` -- written (``add=False``; where blocks overlap, the last block of
    the list wins) or added (``add=True``; overlaps accumulate, in a fixed order).
    Out-of-image pixels are dropped. The scatter's geometry is independent of any gather's.

    ``inplace=True`` (SBNet's ``sparse_scatter_var``) writes into ``ybase`` itself and
    returns it, saving a copy of the whole map: ``ybase`` must then be a C-contiguous
    plain array (or a Tensor that records no gradient).

    Differentiable in ``blocks`` and ``ybase``: a block pixel receives the gradient of the
    pixel it wrote (zero where a later block overwrote it), the base the gradient where no
    block wrote (``add=False``) or everywhere (``add=True``)."""
    base = _image("ybase", ybase)
    data = data_of(blocks)
    if not (isinstance(data, np.ndarray) or backend.is_cupy_array(data)) or data.ndim != 4:
        raise ValueError(f"blocks must be a 4-D array (nb, BH, BW, C) or (nb, C, BH, BW); "
                         f"got {getattr(data, 'shape', type(blocks).__name__)}")
    if data.dtype != base.dtype:
        raise TypeError(f"blocks and ybase must have one dtype; got {data.dtype} and "
                        f"{base.dtype}")
    idx = _indices(indices, base.shape[0])
    geometry = _geometry(bsize, boffset, bstride)
    stacked = _to_blocks_layout(data, transpose)
    expected = (len(idx), *geometry[0], base.shape[3])
    if stacked.shape != expected:
        shown = expected if not transpose else (expected[0], expected[3], *expected[1:3])
        raise ValueError(f"blocks must have shape {shown} for these indices, bsize and "
                         f"ybase; got {data.shape}")
    backend.require_same_device("blocks", data, "ybase", base)
    _distinct(idx)
    if inplace:
        if isinstance(ybase, Tensor) and ybase.requires_grad and is_grad_enabled():
            raise ValueError("sparse_scatter(inplace=True) would overwrite ybase, which "
                             "requires a gradient; use inplace=False")
        if not base.flags.c_contiguous:
            raise ValueError("sparse_scatter(inplace=True) needs a C-contiguous ybase")
    kernels = backend.kernels(stacked, idx, base)
    out = kernels.block_scatter(stacked, idx, base, *geometry, bool(add), bool(inplace))

    def vjp(g):
        xp = backend.array_namespace(g)
        grad_blocks = kernels.block_gather(g, idx, *geometry)
        if add:
            grad_base = g
        else:
            ones = xp.ones(stacked.shape[:3] + (1,), dtype=g.dtype)
            stamp = kernels.block_scatter(ones, idx, xp.zeros(base.shape[:3] + (1,), g.dtype),
                                          *geometry, False)
            grad_base = g * (1 - stamp)
            size, _, stride = geometry
            if size[0] > stride[0] or size[1] > stride[1]:   # overlaps: winners only
                ids = xp.arange(1, stacked.shape[0] * size[0] * size[1] + 1,
                                dtype=np.float64).reshape(stacked.shape[:3] + (1,))
                written = kernels.block_scatter(ids, idx, xp.zeros(base.shape[:3] + (1,)),
                                                *geometry, False)
                won = kernels.block_gather(written, idx, *geometry) == ids
                grad_blocks = grad_blocks * won.astype(g.dtype)
        return _from_blocks_layout(grad_blocks, transpose), grad_base

    if inplace:   # ybase was overwritten: the result is differentiable in the blocks only
        return _differentiable(out, (blocks,), lambda g: vjp(g)[:1])
    return _differentiable(out, (blocks, ybase), vjp)


# -- block parameters and pipelines -----------------------------------------------------------

def calc_block_params(in_size, bsize, ksize, strides=1, padding="SAME"):
    """The block geometry of one convolution over an (N, H, W, C) input (SBNet's
    ``calc_block_params``): input blocks of ``bsize`` (H, W) produce output tiles of
    ``(bsize - k) // stride + 1``; consecutive blocks' tiles are adjacent, so the input
    block stride is ``tile * stride``; the offset is minus the "SAME" padding (0 for
    "VALID"); the counts ``ceil(out / tile)`` cover every output pixel (SBNet's own formula
    can leave the last rows out).

    ``ksize``: int or (kh, kw); ``strides``: int, pair, or SBNet's (1, sh, sw, 1).
    """
    if len(in_size) != 4:
        raise ValueError(f"in_size must be (N, H, W, C); got {in_size!r}")
    height, width = int(in_size[1]), int(in_size[2])
    size = _pair("bsize", bsize, 1)
    if not isinstance(ksize, (int, np.integer)) and len(tuple(ksize)) != 2:
        raise ValueError(f"ksize must be an int or (kh, kw); got {tuple(ksize)} (a weight's "
                         "shape is ambiguous: SBNet's is (kh, kw, Cin, Cout), sparsegrid's "
                         "(Cout, Cin, kh, kw))")
    kernel = _pair("ksize", ksize, 1)
    if not isinstance(strides, (int, np.integer)) and len(tuple(strides)) == 4:
        strides = tuple(strides)[1:3]
    stride = _pair("strides", strides, 1)
    if not isinstance(padding, str) or padding.upper() not in ("SAME", "VALID"):
        raise ValueError(f"padding must be 'SAME' or 'VALID'; got {padding!r}")
    same = padding.upper() == "SAME"
    if size[0] < kernel[0] or size[1] < kernel[1]:
        raise ValueError(f"bsize {size} must be at least the kernel size {kernel}")
    outs, offsets = [], []
    for extent, k, s in zip((height, width), kernel, stride):
        if same:
            out = -(-extent // s)
            pad = max((out - 1) * s + k - extent, 0) // 2
        else:
            if extent < k:
                raise ValueError(f"in_size {tuple(in_size)} is smaller than the kernel {kernel}")
            out, pad = (extent - k) // s + 1, 0
        outs.append(out)
        offsets.append(-pad)
    tile = tuple((b - k) // s + 1 for b, k, s in zip(size, kernel, stride))
    return BlockParams(bsize=size, bsize_out=tile, boffset=tuple(offsets),
                       bcount=tuple(-(-o // t) for o, t in zip(outs, tile)),
                       bstrides=tuple(t * s for t, s in zip(tile, stride)))


def block_mask(indices, image_shape, size, offset, stride, xp=None):
    """(nb, h, w, 1) float mask: 1 where a block pixel of the given geometry lies inside
    the (N, H, W) image. Multiplying an intermediate stack by it makes a VALID convolution
    on blocks see zeros outside the image, as a dense SAME convolution does."""
    from .cpu.blocks import block_pixels
    xp = backend.array_namespace(indices) if xp is None else xp
    _, valid = block_pixels(indices, image_shape, size, offset, stride, xp)
    return valid[..., None]


def sparse_conv2d(x, indices, weight, bias, params, strides=1, padding="SAME", ybase=None):
    """One block-sparse convolution: the dense convolution ``params`` was made for
    (:func:`calc_block_params` with the same ``strides`` and ``padding``), computed only on
    the active blocks and written into ``ybase`` (zeros of the output size by default).
    ``weight`` (Cout, Cin, kh, kw) and ``bias`` (Cout,) as :func:`sparsegrid.denseconv.conv`.
    Equal to the dense convolution on every output tile of an active block."""
    from . import denseconv
    data = _image("x", x)
    if not isinstance(strides, (int, np.integer)) and len(tuple(strides)) == 4:
        strides = tuple(strides)[1:3]
    stride = _pair("strides", strides, 1)
    if not isinstance(padding, str) or padding.upper() not in ("SAME", "VALID"):
        raise ValueError(f"padding must be 'SAME' or 'VALID'; got {padding!r}")
    kernel = data_of(weight).shape[2:4]
    expected = calc_block_params(data.shape, params.bsize, kernel, stride, padding)
    if tuple(params) != tuple(expected):
        raise ValueError(f"params {params} were not made for this convolution (kernel "
                         f"{tuple(kernel)}, strides {stride}, padding {padding!r} on "
                         f"{data.shape}: calc_block_params gives {expected})")
    blocks = sparse_gather(x, indices, params.bsize, params.boffset, params.bstrides)
    out = denseconv.conv(blocks, weight, bias, stride=stride, padding=0, layout="NHWC")
    if ybase is None:
        xp = backend.array_namespace(data)
        if padding.upper() == "SAME":
            extent = tuple(-(-e // s) for e, s in zip(data.shape[1:3], stride))
        else:
            extent = tuple((e - k) // s + 1 for e, k, s in zip(data.shape[1:3], kernel, stride))
        ybase = xp.zeros((data.shape[0], *extent, data_of(weight).shape[0]), dtype=data.dtype)
    return sparse_scatter(out, indices, ybase, params.bsize_out, (0, 0), params.bsize_out,
                          add=False)


def sparse_residual(x, indices, params, branch, inplace=False):
    """``y = x + branch(blocks)`` on the active blocks, ``y = x`` elsewhere: gather the
    blocks of ``params`` (:func:`calc_block_params` of the branch's total receptive field,
    stride 1), run ``branch`` (a function of the (nb, BH, BW, C) stack returning the
    (nb, tile_h, tile_w, C) tiles, e.g. VALID convolutions), scatter-add the tiles
    (into ``x`` itself with ``inplace``, for inference: no copy of the map)."""
    blocks = sparse_gather(x, indices, params.bsize, params.boffset, params.bstrides)
    tiles = branch(blocks)
    return sparse_scatter(tiles, indices, x, params.bsize_out, (0, 0), params.bsize_out,
                          add=True, inplace=inplace)


# -- between sparse tensors and dense maps --------------------------------------------------

def from_sparse(x):
    """A 2-D SparseTensor as a dense NHWC map and its occupancy: ``(map (B, H, W, C),
    mask (B, H, W) bool)``; differentiable in the features. With :func:`to_sparse`, SBNet
    layers sit between submanifold layers of one network."""
    from . import functional
    from .autodiff import ops
    from .tensor import SparseTensor
    if not isinstance(x, SparseTensor) or x.dimension != 2:
        raise TypeError(f"from_sparse takes a 2-D SparseTensor; got "
                        f"{type(x).__name__}" + (f" of dimension {x.dimension}"
                                                  if isinstance(x, SparseTensor) else ""))
    dense = functional.to_dense(x)                                  # (B, C, H, W)
    nhwc = ops.transpose(dense, (0, 2, 3, 1)) if isinstance(dense, Tensor) else \
        dense.transpose(0, 2, 3, 1)
    xp = backend.array_namespace(x.indices)
    mask = xp.zeros((x.batch_size, *x.spatial_shape), dtype=bool)
    mask[x.indices[:, 0], x.indices[:, 1], x.indices[:, 2]] = True
    return nhwc, mask


def to_sparse(dense, like):
    """The NHWC map's pixels at the sites of the 2-D SparseTensor ``like``: a SparseTensor
    on ``like``'s sites and grid (so later submanifold layers reuse its rulebooks);
    differentiable in the map."""
    from .autodiff import ops
    data = _image("dense", dense)
    expected = (like.batch_size, *like.spatial_shape)
    if data.shape[:3] != expected:
        raise ValueError(f"dense must be ({expected[0]}, {expected[1]}, {expected[2]}, C) for "
                         f"these sites; got {data.shape}")
    idx = like.indices
    rows = (idx[:, 0], idx[:, 1], idx[:, 2])
    features = ops.getitem(dense, rows) if isinstance(dense, Tensor) else data[rows]
    return like.with_features(features)


__all__ = ["BlockParams", "block_mask", "calc_block_params", "from_sparse", "reduce_mask",
           "sparse_conv2d", "sparse_gather", "sparse_residual", "sparse_scatter", "to_sparse"]
