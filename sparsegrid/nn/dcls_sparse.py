"""``SubmanifoldDcls``: a submanifold convolution of a SparseTensor whose taps sit at
learnable fractional positions inside a large dilated kernel (:mod:`sparsegrid.dcls_sparse`).

Parameters shaped and initialised as :mod:`sparsegrid.nn.dcls`'s ``Dcls*d`` modules:
``weight`` (Cout, Cin/g, KC) ~ kaiming_uniform(a=sqrt 5), ``P`` (D, Cout, Cin/g, KC) ~
N(0, 0.5) clamped into the kernel, ``SIG`` (as P; 'gauss' 0.23, 'max' 0, None for 'v0' /
'v1'), ``bias`` (Cout) ~ U(-b, b); float32.
"""

from __future__ import annotations



from .. import backend, dcls
from ..dcls_sparse import submanifold_dcls, touched_offsets
from ..tensor import SparseTensor
from .dcls import _per_axis, clamp_dcls_parameters, dcls_parameters
from .layers import _dimension, _flag_arg, _int_arg
from .module import Module

__all__ = ["SubmanifoldDcls"]



class SubmanifoldDcls(Module):
    """Submanifold DCLS convolution (SCN-style constructor).

    Parameters
    ----------
    dimension : int (1, 2, 3, ...)
    nIn, nOut : int
    kernel_count : int
        Taps per (output, input) channel pair.
    dilated_kernel_size : int or ``dimension`` ints
        The receptive field (centre cell ``n // 2``; odd or even).
    bias : bool
    version : 'v1' (default), 'v0', 'max' or 'gauss'
        Bilinear 'v0' / 'v1' touch at most 2^D cells per tap, so only those offsets enter
        the rulebook; 'max' touches the cells within ``|SIG| + 1``; 'gauss' every cell
        (allowed, but it costs the full ``prod(dilated_kernel_size)``-offset convolution).
    groups : int dividing nIn and nOut (default 1).

    ``forward(x)`` takes a SparseTensor ``(N, nIn)`` and returns one ``(N, nOut)`` on the
    same sites. Call :meth:`clamp_parameters` after each optimizer step, as DCLS.
    """

    def __init__(self, dimension, nIn, nOut, kernel_count, dilated_kernel_size, bias=True,
                 version="v1", groups=1):
        super().__init__()
        owner = type(self).__name__
        self.dimension = _dimension(owner, dimension)
        self.nIn = _int_arg(owner, "nIn", nIn)
        self.nOut = _int_arg(owner, "nOut", nOut)
        self.kernel_count = _int_arg(owner, "kernel_count", kernel_count)
        self.groups = _int_arg(owner, "groups", groups)
        if self.nIn % self.groups or self.nOut % self.groups:
            raise ValueError(f"{owner}: groups={groups} must divide nIn={nIn} and nOut={nOut}")
        self.dilated_kernel_size = _per_axis(owner, "dilated_kernel_size",
                                             dilated_kernel_size, self.dimension, 1)
        if not isinstance(version, str) or version not in dcls.VERSIONS:
            raise ValueError(f"{owner}: version must be one of {dcls.VERSIONS}; got "
                             f"{version!r}")
        self.version = version
        has_bias = _flag_arg(owner, "bias", bias, none_is_false=True)
        #: construct_kernel's range check of P (one host read per forward)
        self.check_range = True
        self.weight, self.P, self.SIG, self.bias = dcls_parameters(
            self.nOut, self.nIn // self.groups, self.kernel_count, self.dilated_kernel_size,
            self.version, has_bias)

    def clamp_parameters(self):
        """``P[d]`` clamped into ``[-(n_d // 2), n_d // 2]`` and ``SIG`` made ``|SIG|``, in
        place (as DCLS, after each optimizer step); returns self."""
        clamp_dcls_parameters(self.P, self.SIG, self.dilated_kernel_size)
        return self

    def construct_kernel(self):
        """The dense kernel ``(nOut, nIn/groups, *dilated_kernel_size)`` (a Tensor)."""
        return dcls.construct_kernel(self.weight, self.P, self.SIG, self.dilated_kernel_size,
                                     self.version, check_range=self.check_range)

    def offsets(self):
        """The integer offsets ``(K, D)`` the current positions touch (the rulebook's)."""
        return touched_offsets(self.P, self.SIG, self.dilated_kernel_size, self.version)

    def forward(self, x):
        owner = type(self).__name__
        if not isinstance(x, SparseTensor):
            raise TypeError(f"{owner}: the input must be a SparseTensor; got "
                            f"{type(x).__name__}")
        if x.dimension != self.dimension:
            raise ValueError(f"{owner} is {self.dimension}-D; the input has {x.dimension} "
                             "spatial dimensions")
        if x.n_channels != self.nIn:
            raise ValueError(f"{owner}: expected {self.nIn} input feature planes; the input "
                             f"has {x.n_channels}")
        self._check_device(backend.device_of(x.indices), "the input")
        return submanifold_dcls(x, self.weight, self.P, self.SIG, self.bias,
                                self.dilated_kernel_size, self.version, self.groups,
                                self.check_range)

    def extra_repr(self):
        s = (f"{self.nIn}->{self.nOut}, kernel_count={self.kernel_count}, "
             f"dilated_kernel_size={self.dilated_kernel_size}, version={self.version}")
        if self.groups != 1:
            s += f", groups={self.groups}"
        return s + f", bias={self.bias is not None}"
