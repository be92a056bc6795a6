"""DCLS's older API (before dcls 0.1.1): ``Dcls2d(16, 33, 3, dilation=4, stride=2)``.

The layers take ``nn.Conv2d``'s arguments plus ``gain``:
``(in_channels, out_channels, kernel_size, stride=1, padding=0, dilation=1, groups=1,
bias=True, padding_mode='zeros', gain=1.0)``. A filter has ``prod(kernel_size)`` taps, as a
plain convolution; tap ``i`` (a multi-index into ``kernel_size``) sits, along kernel axis
``d``, at ``i_d * dilation_d + gain * P_d[..., i]`` inside a dilated kernel of size
``n_d = dilation_d * (kernel_size_d - 1) + 1`` (``nn.Conv2d``'s dilated extent, hence its
output sizes): the positions are offsets added to the regular dilated grid, initialised
to 0, so a fresh layer *is* the dilated convolution, and with ``dilation=1`` a plain
convolution. Each tap is spread on its ``2^D`` integer neighbours by floor-based bilinear
interpolation (:mod:`sparsegrid.dcls` version ``'v0'``, whose position gradient is the
right-hand derivative at integer positions, so taps leave the grid from the first step).
``gain`` multiplies the positions in the forward pass: the learnable ``P_*`` are the
offsets divided by ``gain``, so an optimizer step moves a tap ``gain**2`` times as far as
with ``gain = 1`` (the seed's "scaling gain for the positions").

Two methods, as the seed's two modules:

- ``DclsConstruct1d/2d/3d`` (the seed's ``DCLS.construct.modules.Dcls.Dcls2d``):
  positions per (output, input) channel pair, ``P_h`` and ``P_w`` (2-D; ``P_d``, ``P_h``,
  ``P_w`` in 3-D; ``P`` in 1-D) of shape ``(Cout, Cin/g, *kernel_size)``, weight
  ``(Cout, Cin/g, *kernel_size)``; the dense kernel is constructed
  (``dcls_conv(..., method='construct')``).
- ``DclsIm2col1d/2d/3d`` (the seed's ``DCLS.modules.Dcls.Dcls2d``): positions shared by
  all output channels, shape ``(Cin/g, *kernel_size)``; no dense kernel, the convolution
  runs one GEMM per touched integer offset (``method='construct_free'``).

``Dcls1d`` / ``Dcls2d`` / ``Dcls3d`` in this module are the im2col classes, as the seed's
``from DCLS.modules.Dcls import Dcls2d``; a port writes
``from sparsegrid.nn.dcls_legacy import Dcls2d`` (and
``from sparsegrid.nn.dcls_legacy import DclsConstruct2d as cDcls2d`` for
``from DCLS.construct.modules.Dcls import Dcls2d as cDcls2d``). ``sparsegrid.nn.Dcls2d``
stays dcls 0.1.1's ``kernel_count`` layer.
"""

from __future__ import annotations

import math

import numpy as np

from .. import backend, dcls
from ..autodiff import ops
from .dcls import PADDING_MODES, _host_array, _per_axis, batched_input, repr_options
from .layers import _flag_arg, _int_arg
from .module import Module, Parameter, default_rng

__all__ = ["Dcls1d", "Dcls2d", "Dcls3d", "DclsConstruct1d", "DclsConstruct2d",
           "DclsConstruct3d", "DclsIm2col1d", "DclsIm2col2d", "DclsIm2col3d"]

POSITION_NAMES = {1: ("P",), 2: ("P_h", "P_w"), 3: ("P_d", "P_h", "P_w")}


class _LegacyDclsNd(Module):
    """A DCLS convolution of the older API; see the module docstring."""

    _ndim = None
    _shared_positions = None        # True: im2col (Cin/g, *k); False: construct
    _default_method = None

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0,
                 dilation=1, groups=1, bias=True, padding_mode="zeros", gain=1.0):
        super().__init__()
        owner = type(self).__name__
        d = self._ndim
        self.in_channels = _int_arg(owner, "in_channels", in_channels)
        self.out_channels = _int_arg(owner, "out_channels", out_channels)
        self.groups = _int_arg(owner, "groups", groups)
        if self.in_channels % self.groups or self.out_channels % self.groups:
            raise ValueError(f"{owner}: in_channels ({self.in_channels}) and out_channels "
                             f"({self.out_channels}) must be divisible by groups "
                             f"({self.groups})")
        self.kernel_size = _per_axis(owner, "kernel_size", kernel_size, d, 1)
        self.stride = _per_axis(owner, "stride", stride, d, 1)
        self.padding = _per_axis(owner, "padding", padding, d, 0)
        self.dilation = _per_axis(owner, "dilation", dilation, d, 1)
        if padding_mode not in PADDING_MODES:
            raise ValueError(f"{owner}: padding_mode must be one of {PADDING_MODES}; got "
                             f"{padding_mode!r}")
        self.padding_mode = padding_mode
        if isinstance(gain, (bool, np.bool_)) or not isinstance(gain, (int, float, np.number)) \
                or not math.isfinite(float(gain)) or float(gain) == 0:
            raise ValueError(f"{owner}: gain must be a non-zero finite number; got {gain!r}")
        self.gain = float(gain)
        has_bias = _flag_arg(owner, "bias", bias, none_is_false=True)
        #: the dilated kernel, ``dilation * (kernel_size - 1) + 1`` per axis
        self.dilated_kernel_size = tuple(dl * (k - 1) + 1 for dl, k in
                                         zip(self.dilation, self.kernel_size))
        #: :func:`sparsegrid.dcls.dcls_conv`'s ``method`` (same results either way)
        self.method = self._default_method

        cin_g = self.in_channels // self.groups
        shape = (self.out_channels, cin_g) + self.kernel_size
        bound = 1.0 / math.sqrt(cin_g * math.prod(self.kernel_size))
        rng = default_rng()
        self.weight = Parameter(rng.uniform(-bound, bound, shape).astype(np.float32))
        self.bias = Parameter(rng.uniform(-bound, bound, self.out_channels).astype(
            np.float32)) if has_bias else None
        position_shape = shape[1:] if self._shared_positions else shape
        for name in POSITION_NAMES[d]:
            setattr(self, name, Parameter(np.zeros(position_shape, np.float32)))

    @property
    def position_names(self):
        return POSITION_NAMES[self._ndim]

    def _grid(self, axis, xp, dtype):
        """Tap ``i``'s regular position along ``axis`` minus the centre ``n // 2``:
        broadcastable to the positions' shape."""
        d = self._ndim
        k, dl = self.kernel_size[axis], self.dilation[axis]
        values = np.arange(k) * dl - self.dilated_kernel_size[axis] // 2
        shape = [1] * d
        shape[axis] = k
        return xp.asarray(values.reshape(shape).astype(dtype))

    def dcls_positions(self):
        """``P`` of :func:`sparsegrid.dcls.construct_kernel`, ``(D, Cout, Cin/g, KC)``
        (a Tensor): ``gain * P_d`` plus the regular grid, centred on ``n_d // 2``."""
        cout, cin_g = self.out_channels, self.in_channels // self.groups
        kc = math.prod(self.kernel_size)
        d = self._ndim
        result = None
        for axis, name in enumerate(self.position_names):
            p = getattr(self, name)
            xp = backend.array_namespace(p.data)
            q = p * self.gain + self._grid(axis, xp, p.data.dtype)
            if self._shared_positions:       # one position per (input channel, tap)
                q = q + xp.zeros((cout,) + (1,) * (d + 1), p.data.dtype)
            # row ``axis`` of the (D, Cout, Cin/g, KC) stack (a one-hot product: exact)
            onehot = np.zeros((d, 1, 1, 1), p.data.dtype)
            onehot[axis] = 1
            row = ops.reshape(q, (1, cout, cin_g, kc)) * xp.asarray(onehot)
            result = row if result is None else result + row
        return result

    def construct_kernel(self):
        """The dense kernel ``(Cout, Cin/g, *dilated_kernel_size)`` (a Tensor)."""
        cout, cin_g = self.out_channels, self.in_channels // self.groups
        w = ops.reshape(self.weight, (cout, cin_g, -1))
        return dcls.construct_kernel(w, self.dcls_positions(), None,
                                     self.dilated_kernel_size, "v0", check_range=False)

    def clamp_parameters(self):
        """Keep every tap inside the dilated kernel: ``i_d * dilation_d + gain * P_d`` in
        ``[0, n_d - 1]``. In place; returns self."""
        for axis, name in enumerate(self.position_names):
            p = getattr(self, name).data
            xp = backend.array_namespace(p)
            grid = self._grid(axis, xp, p.dtype) + self.dilated_kernel_size[axis] // 2
            low = (0 - grid) / self.gain
            high = (self.dilated_kernel_size[axis] - 1 - grid) / self.gain
            p[...] = xp.clip(p, xp.minimum(low, high), xp.maximum(low, high))
        return self

    def forward(self, x):
        """``x``: ``(N, Cin, S1, ..., SD)`` or unbatched ``(Cin, S1, ..., SD)``."""
        x, unbatched, padding = batched_input(self, x, self.padding, self.padding_mode)
        cout, cin_g = self.out_channels, self.in_channels // self.groups
        w = ops.reshape(self.weight, (cout, cin_g, -1))
        out = dcls.dcls_conv(x, w, self.dcls_positions(), None, self.bias,
                             self.dilated_kernel_size, self.stride, padding, self.groups,
                             "v0", check_range=False, method=self.method)
        if unbatched:
            out = ops.reshape(out, out.shape[1:])
        return out

    def load_dcls_state_dict(self, state, strict=True):
        """Load a checkpoint of the seed's layers: keys ``weight``, ``bias`` and the
        positions under this class's names (``P_h``, ``P_w``, ...), or stacked under
        ``P`` ``(D, *position_shape)``, or as ``P1``, ``P2``, ``P3`` (axis order);
        torch tensors or arrays. Returns ``(missing_keys, unexpected_keys)``."""
        state = {k: _host_array(v) if v is not None else None for k, v in dict(state).items()}
        names = self.position_names
        if "P" in state and names != ("P",):
            stacked = state.pop("P")
            for axis, name in enumerate(names):
                state[name] = stacked[axis]
        for axis, name in enumerate(names):
            alias = f"P{axis + 1}"
            if alias in state and name not in state:
                state[name] = state.pop(alias)
        return self.load_state_dict(state, strict)

    def extra_repr(self):
        s = (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
             f"stride={self.stride}")
        if self.padding != (0,) * self._ndim:
            s += f", padding={self.padding}"
        s += f", dilation={self.dilation} (learnable positions), method={self.method}"
        if self.gain != 1.0:
            s += f", gain={self.gain}"
        return s + repr_options(self)


def _make(name, ndim, shared, method, doc):
    return type(name, (_LegacyDclsNd,), {"_ndim": ndim, "_shared_positions": shared,
                                         "_default_method": method, "__doc__": doc})


DclsConstruct1d = _make("DclsConstruct1d", 1, False, "construct",
                        "Older-API DCLS, construct method, 1-D: position ``P`` "
                        "(Cout, Cin/g, k).")
DclsConstruct2d = _make("DclsConstruct2d", 2, False, "construct",
                        "Older-API DCLS, construct method, 2-D (the seed's "
                        "``DCLS.construct.modules.Dcls.Dcls2d``): ``P_h``, ``P_w`` "
                        "(Cout, Cin/g, kh, kw).")
DclsConstruct3d = _make("DclsConstruct3d", 3, False, "construct",
                        "Older-API DCLS, construct method, 3-D: ``P_d``, ``P_h``, ``P_w`` "
                        "(Cout, Cin/g, kd, kh, kw).")
DclsIm2col1d = _make("DclsIm2col1d", 1, True, "construct_free",
                     "Older-API DCLS, im2col method, 1-D: position ``P`` (Cin/g, k).")
DclsIm2col2d = _make("DclsIm2col2d", 2, True, "construct_free",
                     "Older-API DCLS, im2col method, 2-D (the seed's "
                     "``DCLS.modules.Dcls.Dcls2d``): ``P_h``, ``P_w`` (Cin/g, kh, kw), "
                     "shared by the output channels.")
DclsIm2col3d = _make("DclsIm2col3d", 3, True, "construct_free",
                     "Older-API DCLS, im2col method, 3-D: ``P_d``, ``P_h``, ``P_w`` "
                     "(Cin/g, kd, kh, kw).")
for _cls in (DclsConstruct1d, DclsConstruct2d, DclsConstruct3d, DclsIm2col1d, DclsIm2col2d,
             DclsIm2col3d):
    _cls.__module__ = __name__

#: The seed's ``from DCLS.modules.Dcls import Dcls2d`` (the im2col modules).
Dcls1d, Dcls2d, Dcls3d = DclsIm2col1d, DclsIm2col2d, DclsIm2col3d
