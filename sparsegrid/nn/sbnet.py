"""SBNet layers: block-sparse 2-D convolution and residual blocks on dense NHWC maps.

Both compute only on the blocks a mask marks active (:mod:`sparsegrid.sbnet`) and mix
with the rest of ``sparsegrid.nn`` (parameters, ``state_dict``, optimizers, devices).
Inputs are dense channels-last arrays or autodiff Tensors (N, H, W, C); the active blocks
come as ``indices`` (from :meth:`active_blocks`, to share between layers of one
resolution) or as a ``mask`` (N, H, W[, 1]) reduced on the fly.
"""

from __future__ import annotations

import math

import numpy as np

from .. import sbnet
from ..autodiff import ops
from ..autodiff.core import Tensor, data_of
from ..functional import batch_norm_rows
from .layers import _eps_momentum, _flag_arg, _int_arg, _real_arg
from .module import Module, Parameter, default_rng


def _conv_weight(out_channels, in_channels, kh, kw):
    """PyTorch's default initialisation (kaiming uniform, a = sqrt(5)): U(-b, b), b =
    1 / sqrt(fan_in); float32, (Cout, Cin, kh, kw)."""
    bound = 1.0 / math.sqrt(in_channels * kh * kw)
    return default_rng().uniform(-bound, bound, (out_channels, in_channels, kh, kw)).astype(
        np.float32)


def _dense(x):
    return x if isinstance(x, Tensor) else Tensor(x)


class ChannelsLastBatchNorm(Module):
    """Batch normalisation over every pixel of a channels-last stack (..., C), then a leaky
    activation; SCN's momentum convention and buffers (as :class:`BatchNormalization`;
    float32 running statistics in a float16 model)."""

    _float32_buffers = ("running_mean", "running_var")

    def __init__(self, nPlanes, eps=1e-4, momentum=0.99, leakiness=0):
        super().__init__()
        owner = type(self).__name__
        self.nPlanes = _int_arg(owner, "nPlanes", nPlanes)
        self.eps, self.momentum = _eps_momentum(owner, eps, momentum)
        self.leakiness = _real_arg(owner, "leakiness", leakiness)
        self.register_buffer("running_mean", np.zeros(self.nPlanes, np.float32))
        self.register_buffer("running_var", np.ones(self.nPlanes, np.float32))
        self.weight = Parameter(np.ones(self.nPlanes, np.float32))
        self.bias = Parameter(np.zeros(self.nPlanes, np.float32))

    def forward(self, x):
        x = _dense(x)
        shape = x.shape
        if shape[-1] != self.nPlanes:
            raise ValueError(f"{type(self).__name__}({self.nPlanes}) got {shape[-1]} channels")
        rows = ops.reshape(x, (-1, self.nPlanes))
        out = batch_norm_rows(rows, self.weight, self.bias, self.running_mean,
                              self.running_var, self.training, self.momentum, self.eps,
                              self.leakiness)
        return ops.reshape(out, shape)


class _BlockLayer(Module):
    """What the two block layers share: the block geometry, the mask reduction."""

    def _setup(self, block_size, tol, avgpool):
        owner = type(self).__name__
        self.block_size = sbnet._pair("block_size", block_size, 1)
        self.tol = _real_arg(owner, "tol", tol)
        self.avgpool = _flag_arg(owner, "avgpool", avgpool)

    def active_blocks(self, mask, image_shape=None):
        """The blocks of this layer's geometry a mask (N, H, W[, 1]) marks active."""
        data = data_of(mask)
        shape = image_shape if image_shape is not None else (*data.shape[:3], 1)
        params = self.block_params(shape)
        return sbnet.reduce_mask(mask, params.bcount, params.bsize, params.boffset,
                                 params.bstrides, self.tol, self.avgpool)

    def _indices(self, x, indices, mask):
        if (indices is None) == (mask is None):
            raise ValueError(f"{type(self).__name__} needs exactly one of indices (from "
                             "active_blocks) or mask")
        if indices is not None:
            return indices
        shape, mask_shape = data_of(x).shape, data_of(mask).shape
        if tuple(mask_shape[:3]) != tuple(shape[:3]) or len(mask_shape) not in (3, 4):
            raise ValueError(f"{type(self).__name__} mask must have shape {tuple(shape[:3])} "
                             f"(or with a trailing 1) for input {tuple(shape)}; got "
                             f"{tuple(mask_shape)}")
        return self.active_blocks(mask, shape)


class BlockSparseConv2d(_BlockLayer):
    """A 2-D convolution computed only on active blocks (SBNet's sparse convolution).

    ``y`` has the dense convolution's values on every output tile of an active block and
    zeros elsewhere. Weight (Cout, Cin, kh, kw) and bias (Cout,) as PyTorch's Conv2d (and
    its initialisation); ``block_size`` is the input block size (output tiles are
    ``(block_size - k) // stride + 1``); ``padding`` 'SAME' or 'VALID'.
    """

    def __init__(self, in_channels, out_channels, kernel_size=3, stride=1, padding="SAME",
                 bias=True, block_size=18, tol=0.5, avgpool=False):
        super().__init__()
        owner = type(self).__name__
        self.in_channels = _int_arg(owner, "in_channels", in_channels)
        self.out_channels = _int_arg(owner, "out_channels", out_channels)
        self.kernel_size = sbnet._pair("kernel_size", kernel_size, 1)
        self.stride = sbnet._pair("stride", stride, 1)
        if not isinstance(padding, str) or padding.upper() not in ("SAME", "VALID"):
            raise ValueError(f"{owner} padding must be 'SAME' or 'VALID'; got {padding!r}")
        self.padding = padding.upper()
        self._setup(block_size, tol, avgpool)
        if any(b < k for b, k in zip(self.block_size, self.kernel_size)):
            raise ValueError(f"{owner} block_size {self.block_size} must be at least the "
                             f"kernel size {self.kernel_size}")
        self.weight = Parameter(_conv_weight(self.out_channels, self.in_channels,
                                             *self.kernel_size))
        bound = 1.0 / math.sqrt(self.in_channels * math.prod(self.kernel_size))
        self.bias = Parameter(default_rng().uniform(-bound, bound, self.out_channels).astype(
            np.float32)) if _flag_arg(owner, "bias", bias) else None

    def block_params(self, image_shape):
        return sbnet.calc_block_params(image_shape, self.block_size, self.kernel_size,
                                       self.stride, self.padding)

    def forward(self, x, indices=None, mask=None):
        indices = self._indices(x, indices, mask)
        params = self.block_params(data_of(x).shape)
        return sbnet.sparse_conv2d(_dense(x), indices, self.weight, self.bias, params,
                                   self.stride, self.padding)


class SparseResBlock(_BlockLayer):
    """A pre-activation residual block computed on active blocks: ``y = x + F(x)`` on
    every tile of an active block, ``y = x`` elsewhere (SBNet's sparse residual block).

    ``kind='bottleneck'``: BN-ReLU, 1x1 (C -> mid), BN-ReLU, 3x3 (mid -> mid), BN-ReLU,
    1x1 (mid -> C); ``kind='basic'``: BN-ReLU, 3x3, BN-ReLU, 3x3 (C -> C). Stride 1, SAME.
    The blocks carry the halo the 3x3 convolutions need (``block_size`` is the gathered
    size: tiles are ``block_size - 2`` (bottleneck) or ``- 4`` (basic)); pixels outside
    the image are zeroed before each 3x3 convolution, as a dense SAME convolution pads.
    In evaluation mode the result equals the dense block on active tiles; in training the
    batch statistics are taken over the gathered pixels (halos included).

    ``inplace=True`` adds the tiles into ``x`` itself (SBNet's in-place scatter): no copy
    of the whole map, for inference on maps the caller owns (an input that requires a
    gradient is refused).
    """

    def __init__(self, channels, mid_channels=None, kind="bottleneck", block_size=18,
                 tol=0.5, avgpool=False, eps=1e-4, momentum=0.99, inplace=False):
        super().__init__()
        owner = type(self).__name__
        self.channels = _int_arg(owner, "channels", channels)
        if kind not in ("bottleneck", "basic"):
            raise ValueError(f"{owner} kind must be 'bottleneck' or 'basic'; got {kind!r}")
        self.kind = kind
        if kind == "basic" and mid_channels is not None:
            raise ValueError(f"{owner}(kind='basic') has no mid_channels (both 3x3 "
                             f"convolutions are {self.channels} -> {self.channels}); got "
                             f"{mid_channels}")
        self.mid_channels = _int_arg(owner, "mid_channels", mid_channels if mid_channels
                                     is not None else max(self.channels // 4, 1)) \
            if kind == "bottleneck" else self.channels
        self._setup(block_size, tol, avgpool)
        self.inplace = _flag_arg(owner, "inplace", inplace)
        halo = 1 if kind == "bottleneck" else 2
        if min(self.block_size) <= 2 * halo:
            raise ValueError(f"{owner} block_size must exceed {2 * halo} (the halo of a "
                             f"{kind} block); got {self.block_size}")
        c, m = self.channels, self.mid_channels
        if kind == "bottleneck":
            self.bn1 = ChannelsLastBatchNorm(c, eps, momentum)
            self.conv1 = Parameter(_conv_weight(m, c, 1, 1))
            self.bn2 = ChannelsLastBatchNorm(m, eps, momentum)
            self.conv2 = Parameter(_conv_weight(m, m, 3, 3))
            self.bn3 = ChannelsLastBatchNorm(m, eps, momentum)
            self.conv3 = Parameter(_conv_weight(c, m, 1, 1))
        else:
            self.bn1 = ChannelsLastBatchNorm(c, eps, momentum)
            self.conv1 = Parameter(_conv_weight(c, c, 3, 3))
            self.bn2 = ChannelsLastBatchNorm(c, eps, momentum)
            self.conv2 = Parameter(_conv_weight(c, c, 3, 3))

    def block_params(self, image_shape):
        reach = 3 if self.kind == "bottleneck" else 5
        return sbnet.calc_block_params(image_shape, self.block_size, reach, 1, "SAME")

    def forward(self, x, indices=None, mask=None):
        from .. import denseconv
        x = _dense(x)
        indices = self._indices(x, indices, mask)
        shape = x.shape
        params = self.block_params(shape)
        image = (shape[0], shape[1], shape[2])

        def inside(stage):
            """Mask of the gathered pixels after ``stage`` VALID 3x3 convolutions."""
            size = tuple(b - 2 * stage for b in params.bsize)
            offset = tuple(o + stage for o in params.boffset)
            mask = sbnet.block_mask(indices, image, size, offset, params.bstrides)
            return mask.astype(data_of(x).dtype)

        def conv(h, weight):
            return denseconv.conv(h, weight, None, padding=0, layout="NHWC")

        def branch(blocks):
            if self.kind == "bottleneck":
                h = conv(self.bn1(blocks), self.conv1)
                h = conv(self.bn2(h) * inside(0), self.conv2)
                return conv(self.bn3(h), self.conv3)
            h = conv(self.bn1(blocks) * inside(0), self.conv1)
            return conv(self.bn2(h) * inside(1), self.conv2)

        return sbnet.sparse_residual(x, indices, params, branch, inplace=self.inplace)

    def extra_repr(self):
        return (f"{self.channels}, mid_channels={self.mid_channels}, kind={self.kind!r}, "
                f"block_size={self.block_size}")


__all__ = ["BlockSparseConv2d", "ChannelsLastBatchNorm", "SparseResBlock"]
