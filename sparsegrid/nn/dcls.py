"""DCLS layers: dilated convolutions with learnable spacings (dcls 0.1.1's construct
modules), on dense channels-first maps.

``Dcls1d`` / ``Dcls2d`` / ``Dcls3d`` take dcls 0.1.1's constructor arguments and
parameters -- ``weight`` (Cout, Cin/groups, kernel_count), ``P`` and (for 'gauss' and
'max') ``SIG`` (ndim, Cout, Cin/groups, kernel_count), ``bias`` (Cout) -- with its
initialisation, float32, and the same ``state_dict`` keys. ``ConstructKernel1d/2d/3d``
are dcls's kernel builders (no parameters of their own). The positions follow
:mod:`sparsegrid.dcls`'s axis convention (``P[d]`` along kernel axis ``d``);
:meth:`load_dcls_state_dict` converts a dcls 0.1.1 checkpoint's positions.
"""

from __future__ import annotations

import math

import numpy as np

from .. import backend, dcls
from ..autodiff import ops
from ..autodiff.core import Tensor, data_of
from .layers import _flag_arg, _int_arg
from .module import Module, Parameter, default_rng

__all__ = ["ConstructKernel1d", "ConstructKernel2d", "ConstructKernel3d", "Dcls1d",
           "Dcls2d", "Dcls3d"]

P_INIT_STD = 0.5             # dcls: P ~ N(0, 0.5), clamped into the kernel
SIG_INIT = {"gauss": 0.23, "max": 0.0}
PADDING_MODES = ("zeros", "reflect", "replicate", "circular")
_NUMPY_PAD_MODE = {"reflect": "reflect", "replicate": "edge", "circular": "wrap"}


def _per_axis(owner, name, value, ndim, minimum):
    """An int or ``ndim`` ints, each >= ``minimum``, as a tuple."""
    if isinstance(value, (tuple, list)):
        if len(value) != ndim:
            raise ValueError(f"{owner}: {name} must be an int or {ndim} ints; got "
                             f"{len(value)}: {tuple(value)!r}")
        return tuple(_int_arg(owner, name, v, minimum) for v in value)
    return (_int_arg(owner, name, value, minimum),) * ndim


def _version_arg(owner, version):
    if not isinstance(version, str) or version not in dcls.VERSIONS:
        raise ValueError(f"{owner}: version must be one of {dcls.VERSIONS}; got {version!r}")
    return version


def dcls_parameters(out_channels, cin_per_group, kernel_count, dilated_kernel_size, version,
                    bias=True):
    """dcls 0.1.1's initial parameters, float32: ``(weight, P, SIG, bias)`` Parameters (SIG
    None for 'v0'/'v1', bias None without one). weight (Cout, Cin/g, KC) kaiming-uniform
    (a = sqrt(5)): U(-b, b), b = 1 / sqrt(Cin/g * KC), the bias the same bound (PyTorch's
    convolution bias); P (D, Cout, Cin/g, KC) ~ N(0, 0.5) clamped into the kernel; SIG
    0.23 ('gauss') or 0 ('max'). Shared by the dense and the sparse DCLS layers."""
    d = len(dilated_kernel_size)
    shape = (out_channels, cin_per_group, kernel_count)
    rng = default_rng()
    bound = 1.0 / math.sqrt(cin_per_group * kernel_count)
    weight = Parameter(rng.uniform(-bound, bound, shape).astype(np.float32))
    positions = rng.standard_normal((d,) + shape) * P_INIT_STD
    for axis, lim in enumerate(dcls.position_limits(dilated_kernel_size)):
        positions[axis] = np.clip(positions[axis], -lim, lim)
    P = Parameter(positions.astype(np.float32))
    SIG = Parameter(np.full((d,) + shape, SIG_INIT[version], np.float32)) \
        if version in SIG_INIT else None
    b = Parameter(rng.uniform(-bound, bound, out_channels).astype(np.float32)) if bias \
        else None
    return weight, P, SIG, b


def clamp_dcls_parameters(P, SIG, dilated_kernel_size):
    """In place: ``P[d]`` clamped into ``[-(n_d // 2), n_d // 2]``, ``SIG`` made ``|SIG|``
    (the layers' ``clamp_parameters``)."""
    p = P.data
    xp = backend.array_namespace(p)
    for axis, lim in enumerate(dcls.position_limits(dilated_kernel_size)):
        p[axis] = xp.clip(p[axis], -lim, lim)
    if SIG is not None:
        SIG.data[...] = xp.abs(SIG.data)


def repr_options(module):
    """The ``, groups=..., bias=False, padding_mode=...`` tail of a DCLS layer's repr
    (only what differs from the defaults)."""
    s = f", groups={module.groups}" if module.groups != 1 else ""
    if module.bias is None:
        s += ", bias=False"
    if module.padding_mode != "zeros":
        s += f", padding_mode={module.padding_mode}"
    return s


def batched_input(module, x, padding, padding_mode):
    """``(x as a batched Tensor, unbatched, padding left for the convolution)`` for the
    DCLS layers' ``(N, C, S...)`` or unbatched ``(C, S...)`` input; non-zero padding modes
    are applied here."""
    data = data_of(x)
    owner = type(module).__name__
    if not hasattr(data, "ndim"):
        raise TypeError(f"{owner}: x must be a NumPy/CuPy array or a Tensor; got "
                        f"{type(x).__name__}")
    module._check_device(backend.device_of(data), "x")
    d = module._ndim
    if data.ndim not in (d + 1, d + 2):
        raise ValueError(f"{owner}: x must be (N, C, S1, ..., S{d}) or (C, S1, ..., S{d}); "
                         f"got shape {tuple(data.shape)}")
    x = x if isinstance(x, Tensor) else Tensor(x)
    unbatched = data.ndim == d + 1
    if unbatched:
        x = ops.reshape(x, (1,) + tuple(data.shape))
    if padding_mode != "zeros":
        return _pad(x, padding, padding_mode), unbatched, 0
    return x, unbatched, padding


class _ConstructKernelNd(Module):
    """dcls's ``ConstructKernel{1,2,3}d(out_channels, in_channels, groups, kernel_count,
    dilated_kernel_size, version)``: ``forward(W, P, SIG)`` is
    :func:`sparsegrid.dcls.construct_kernel` with these sizes (no parameters)."""

    _ndim = None

    def __init__(self, out_channels, in_channels, groups, kernel_count, dilated_kernel_size,
                 version="gauss"):
        super().__init__()
        owner = type(self).__name__
        self.out_channels = _int_arg(owner, "out_channels", out_channels)
        self.in_channels = _int_arg(owner, "in_channels", in_channels)
        self.groups = _int_arg(owner, "groups", groups)
        if self.in_channels % self.groups or self.out_channels % self.groups:
            raise ValueError(f"{owner}: in_channels ({self.in_channels}) and out_channels "
                             f"({self.out_channels}) must be divisible by groups "
                             f"({self.groups})")
        self.kernel_count = _int_arg(owner, "kernel_count", kernel_count)
        self.dilated_kernel_size = _per_axis(owner, "dilated_kernel_size",
                                             dilated_kernel_size, self._ndim, 1)
        self.version = _version_arg(owner, version)
        self.check_range = True

    def forward(self, W, P, SIG=None):
        shape = (self.out_channels, self.in_channels // self.groups, self.kernel_count)
        if tuple(data_of(W).shape) != shape:
            raise ValueError(f"{type(self).__name__}: W must have shape {shape} (out_channels, "
                             f"in_channels // groups, kernel_count); got "
                             f"{tuple(data_of(W).shape)}")
        # A module returns an autodiff Tensor whatever its inputs (one return type).
        W = W if isinstance(W, Tensor) else Tensor(W)
        return dcls.construct_kernel(W, P, SIG, self.dilated_kernel_size, self.version,
                                     check_range=self.check_range)

    def extra_repr(self):
        s = (f"{self.in_channels}, {self.out_channels}, kernel_count={self.kernel_count}, "
             f"version={self.version}, dilated_kernel_size={self.dilated_kernel_size}")
        return s + (f", groups={self.groups}" if self.groups != 1 else "")


class ConstructKernel1d(_ConstructKernelNd):
    _ndim = 1


class ConstructKernel2d(_ConstructKernelNd):
    _ndim = 2


class ConstructKernel3d(_ConstructKernelNd):
    _ndim = 3


class _DclsNd(Module):
    """A DCLS convolution: ``kernel_count`` taps per (output, input) channel pair at
    learnable positions inside a ``dilated_kernel_size`` kernel; see :class:`Dcls2d`."""

    _ndim = None
    _construct = None

    def __init__(self, in_channels, out_channels, kernel_count, stride=1, padding=0,
                 dilated_kernel_size=1, groups=1, bias=True, padding_mode="zeros",
                 version="gauss"):
        super().__init__()
        owner = type(self).__name__
        d = self._ndim
        self.in_channels = _int_arg(owner, "in_channels", in_channels)
        self.out_channels = _int_arg(owner, "out_channels", out_channels)
        self.kernel_count = _int_arg(owner, "kernel_count", kernel_count)
        self.groups = _int_arg(owner, "groups", groups)
        if self.in_channels % self.groups:
            raise ValueError(f"{owner}: in_channels ({self.in_channels}) must be divisible by "
                             f"groups ({self.groups})")
        if self.out_channels % self.groups:
            raise ValueError(f"{owner}: out_channels ({self.out_channels}) must be divisible "
                             f"by groups ({self.groups})")
        self.stride = _per_axis(owner, "stride", stride, d, 1)
        if isinstance(padding, str):
            if padding not in ("same", "valid"):
                raise ValueError(f"{owner}: padding must be an int, {d} ints, 'same' or "
                                 f"'valid'; got {padding!r}")
            if padding == "same" and any(s != 1 for s in self.stride):
                raise ValueError(f"{owner}: padding='same' needs stride 1; got stride "
                                 f"{self.stride}")
            self.padding = padding
        else:
            self.padding = _per_axis(owner, "padding", padding, d, 0)
        self.dilated_kernel_size = _per_axis(owner, "dilated_kernel_size", dilated_kernel_size,
                                             d, 1)
        if padding_mode not in PADDING_MODES:
            raise ValueError(f"{owner}: padding_mode must be one of {PADDING_MODES}; got "
                             f"{padding_mode!r}")
        if padding_mode != "zeros" and isinstance(self.padding, str):
            raise ValueError(f"{owner}: padding_mode={padding_mode!r} needs integer padding; "
                             f"got {self.padding!r}")
        self.padding_mode = padding_mode
        self.version = _version_arg(owner, version)
        has_bias = _flag_arg(owner, "bias", bias, none_is_false=True)
        #: construct_kernel's check that P lies inside the dilated kernel (one host read
        #: per forward; set False to skip it, e.g. on a GPU once training is trusted)
        self.check_range = True

        self.weight, self.P, self.SIG, self.bias = dcls_parameters(
            self.out_channels, self.in_channels // self.groups, self.kernel_count,
            self.dilated_kernel_size, self.version, has_bias)
        self.DCK = self._construct(self.out_channels, self.in_channels, self.groups,
                                   self.kernel_count, self.dilated_kernel_size, self.version)

    # -- DCLS's methods ---------------------------------------------------------------------
    def clamp_parameters(self):
        """Keep the parameters where DCLS keeps them (call after each optimizer step):
        ``P[d]`` clamped into ``[-(n_d // 2), n_d // 2]`` (:func:`sparsegrid.dcls.position_
        limits`), and ``SIG`` replaced by ``|SIG|`` -- the constructions use ``|SIG|``
        (plus 0.27 or 1), so the spread stays positive and no kernel changes. In place;
        returns self."""
        clamp_dcls_parameters(self.P, self.SIG, self.dilated_kernel_size)
        return self

    def construct_kernel(self):
        """The dense kernel ``(Cout, Cin/groups, *dilated_kernel_size)`` (a Tensor)."""
        return dcls.construct_kernel(self.weight, self.P, self.SIG, self.dilated_kernel_size,
                                     self.version, check_range=self.check_range)

    def forward(self, x):
        """``x``: ``(N, Cin, S1, ..., SD)`` or, unbatched, ``(Cin, S1, ..., SD)`` (array
        or Tensor); returns the convolution as a Tensor."""
        x, unbatched, padding = batched_input(self, x, self.padding, self.padding_mode)
        out = dcls.dcls_conv(x, self.weight, self.P, self.SIG, self.bias,
                             self.dilated_kernel_size, self.stride, padding, self.groups,
                             self.version, self.check_range)
        if unbatched:
            out = ops.reshape(out, out.shape[1:])
        return out

    # -- dcls 0.1.1 checkpoints -------------------------------------------------------------
    def load_dcls_state_dict(self, state, strict=True):
        """Load a dcls 0.1.1 ``state_dict`` (same keys and shapes), converting its
        positions and spreads to this library's axis convention
        (:func:`sparsegrid.dcls.from_dcls_positions`), so the layer computes what the dcls
        layer computed. For a non-square kernel the converted positions may lie outside
        the clamp range; set ``check_range = False`` to run them unclamped. Returns
        ``(missing_keys, unexpected_keys)`` as :meth:`load_state_dict`."""
        state = dict(state)
        if "P" in state:
            p = _host_array(state["P"])
            sig = _host_array(state["SIG"]) if state.get("SIG") is not None else None
            new_p, new_sig = dcls.from_dcls_positions(p, sig, self.dilated_kernel_size,
                                                      self.version)
            state["P"] = new_p
            if new_sig is not None:
                state["SIG"] = new_sig
        return self.load_state_dict(state, strict)

    def extra_repr(self):
        s = (f"{self.in_channels}, {self.out_channels}, kernel_count={self.kernel_count}, "
             f"stride={self.stride}, version={self.version}")
        if self.padding != (0,) * self._ndim:
            s += f", padding={self.padding}"
        s += f", dilated_kernel_size={self.dilated_kernel_size}"
        return s + repr_options(self)


def _host_array(value):
    if isinstance(value, Tensor):
        value = value.data
    if hasattr(value, "detach"):                     # a torch tensor
        return value.detach().cpu().numpy()
    return backend.to_numpy(value)


def _pad(x, padding, mode):
    """``x`` (N, C, S...) padded by ``padding[d]`` on both sides of each spatial axis with
    PyTorch's 'reflect' / 'replicate' / 'circular' rule, differentiably (a gather whose
    gradient adds the copies back)."""
    data = data_of(x)
    xp = backend.array_namespace(data)
    index = [slice(None), slice(None)]
    spatial = data.ndim - 2
    for axis, (n, p) in enumerate(zip(data.shape[2:], padding)):
        if mode == "reflect" and p >= n:
            raise ValueError(f"padding_mode='reflect' needs padding < the input size; got "
                             f"padding {p} for size {n} (axis {axis})")
        if mode == "circular" and p > n:
            raise ValueError(f"padding_mode='circular' needs padding <= the input size; got "
                             f"padding {p} for size {n} (axis {axis})")
        rows = np.pad(np.arange(n), p, mode=_NUMPY_PAD_MODE[mode])
        shape = [1] * spatial
        shape[axis] = rows.size
        index.append(xp.asarray(rows.reshape(shape)))
    return ops.getitem(x, tuple(index))


class Dcls1d(_DclsNd):
    """1-D DCLS convolution (dcls 0.1.1's ``Dcls1d``): input (N, Cin, L)."""

    _ndim = 1
    _construct = ConstructKernel1d


class Dcls2d(_DclsNd):
    """2-D DCLS convolution (dcls 0.1.1's ``Dcls2d``): input (N, Cin, H, W).

    Parameters
    ----------
    in_channels, out_channels : int
    kernel_count : int
        Taps per (output, input/groups) channel pair (dcls's "previous kernel_size").
    stride : int or 2 ints
    padding : int, 2 ints, 'same' or 'valid'
        Usually ``dilated_kernel_size // 2`` (size-keeping for odd sizes).
    dilated_kernel_size : int or 2 ints
        The size of the constructed kernel (default 1, as dcls).
    groups : int
        ``groups == in_channels`` makes it depthwise.
    bias : bool
    padding_mode : 'zeros', 'reflect', 'replicate' or 'circular'
    version : 'gauss' (default), 'v1', 'v0' or 'max'
        The interpolation (:mod:`sparsegrid.dcls`).
    use_implicit_gemm : bool
        Accepted for dcls compatibility; no effect (denseconv's depthwise path is used).

    Parameters of the module: ``weight`` (Cout, Cin/g, KC) ~ kaiming_uniform(a=sqrt 5);
    ``P`` (2, Cout, Cin/g, KC) ~ N(0, 0.5) clamped to ``+-(dilated_kernel_size // 2)``;
    ``SIG`` (as P; 'gauss': 0.23, 'max': 0; absent for 'v0' / 'v1'); ``bias`` (Cout) ~
    U(-1/sqrt(fan_in), 1/sqrt(fan_in)). float32.
    """

    _ndim = 2
    _construct = ConstructKernel2d

    def __init__(self, in_channels, out_channels, kernel_count, stride=1, padding=0,
                 dilated_kernel_size=1, groups=1, bias=True, padding_mode="zeros",
                 version="gauss", use_implicit_gemm=True):
        super().__init__(in_channels, out_channels, kernel_count, stride, padding,
                         dilated_kernel_size, groups, bias, padding_mode, version)
        _flag_arg(type(self).__name__, "use_implicit_gemm", use_implicit_gemm)


class Dcls3d(_DclsNd):
    """3-D DCLS convolution (dcls 0.1.1's ``Dcls3d``): input (N, Cin, D, H, W)."""

    _ndim = 3
    _construct = ConstructKernel3d
