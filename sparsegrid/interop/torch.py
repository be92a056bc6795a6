"""A sparsegrid network inside a PyTorch model: forward and backward zero-copy via DLPack.

:class:`SparseModule` wraps a :class:`sparsegrid.nn.Module` as a ``torch.nn.Module``::

    import torch
    import sparsegrid.nn as scn
    from sparsegrid.interop.torch import SparseModule

    backbone = SparseModule(scn.Sequential(scn.SubmanifoldConvolution(3, 4, 16, 3, False),
                                           scn.BatchNormReLU(16)))
    head = torch.nn.Linear(16, 5)
    out = backbone(features, indices, spatial_shape)      # torch tensors in
    logits = head(out.features)                           # a torch tensor (N, 16)
    loss = torch.nn.functional.cross_entropy(logits, labels)
    loss.backward()                                       # through the sparsegrid layers
    torch.optim.Adam([*backbone.parameters(), *head.parameters()]).step()

How it works
------------
- The wrapped module's parameters and buffers become torch ``Parameter``s and buffers
  that *share memory* with the sparsegrid arrays (``torch.from_dlpack``), registered
  under sparsegrid's own dotted names (``backbone.sparse.state_dict()`` has the keys of
  ``module.state_dict()``). torch optimizers, ``state_dict``, ``.to()``/``.cuda()``/
  ``.double()``, ``train()``/``eval()`` and ``requires_grad_`` act on them; before each
  call the sparsegrid module is re-pointed at the torch storage (a view, no copy), so
  whatever torch did to its parameters is what sparsegrid computes with. Running
  statistics (batch norm) are updated in the torch buffers.
- A call is one ``torch.autograd.Function``: its forward runs the sparsegrid module on
  DLPack views of the torch inputs (CPU tensors as NumPy, CUDA tensors as CuPy on the
  same GPU), recording sparsegrid's own autodiff graph when torch needs gradients; its
  backward feeds torch's output gradient into that graph and returns the gradients of
  every floating-point input tensor and of every parameter, again without copies.
- The versions of the inputs, the parameters and the output are checked in backward, so
  modifying them in place before ``backward()`` raises torch's usual "modified by an
  inplace operation" error instead of corrupting the gradients. The sparsegrid graph is
  freed with torch's saved state (after a backward without ``retain_graph``); nothing is
  recorded under ``torch.no_grad()``. Second derivatives are not available.

Devices: a CPU model takes CPU tensors, a CUDA model (``.cuda()``) CUDA tensors with
CuPy installed; a mix raises the ValueError/TypeError of
:func:`sparsegrid.backend.require_same_device` naming both devices. Nothing is copied
between host and device.

Inputs: what the wrapped module's first layer takes, with torch tensors anywhere inside
it: ``(features, indices, spatial_shape[, batch_size])`` builds a SparseTensor;
a :class:`sparsegrid.SparseTensor` (its features constant, or replaced by a torch tensor
given as ``features=``), a :class:`SparseOutput` of another wrapped module (chaining,
gradients flow through both), or an ``InputLayer``'s ``[coords, features(,
batch_size)]`` list. Every floating-point torch tensor in the input is differentiable;
integer tensors (indices, coordinates) are not.

Outputs: a sparse result comes back as a :class:`SparseOutput` (torch ``features``,
``indices``, ``spatial_shape``, ``batch_size``, and the sparsegrid ``tensor`` to chain);
a dense one (``SparseToDense``, ``OutputLayer``, pooling to a vector) as a torch tensor.
"""

from __future__ import annotations

import weakref

import numpy as np

import torch

from .. import backend
from ..autodiff.core import Tensor, no_grad
from ..nn.module import Module
from ..tensor import SparseTensor
from . import asarray, to_torch

__all__ = ["SparseModule", "SparseOutput", "apply", "from_torch"]


class SparseOutput:
    """A sparse result on the torch side: torch ``features`` (N, C), differentiable,
    row-aligned with ``indices`` (torch int32 (N, 1 + D), batch index first), the
    ``spatial_shape`` and ``batch_size``, and ``tensor``, the sparsegrid tensor on the
    same sites (features detached) for chaining into another :class:`SparseModule`."""

    __slots__ = ("features", "tensor")

    def __init__(self, features, tensor):
        self.features = features
        self.tensor = tensor

    @property
    def indices(self):
        return to_torch(self.tensor.indices, "indices")

    @property
    def spatial_shape(self):
        return self.tensor.spatial_shape

    @property
    def batch_size(self):
        return self.tensor.batch_size

    def replace(self, features):
        """The same sites with new torch ``features`` (e.g. after a torch layer)."""
        if not isinstance(features, torch.Tensor):
            raise TypeError(f"features must be a torch tensor; got {type(features).__name__}")
        if features.ndim != 2 or features.shape[0] != self.tensor.n_active:
            raise ValueError(f"features must have shape ({self.tensor.n_active}, C); got "
                             f"{tuple(features.shape)}")
        return SparseOutput(features, self.tensor)

    def __repr__(self):
        return (f"SparseOutput(features={tuple(self.features.shape)} {self.features.dtype} "
                f"on {self.features.device}, spatial_shape={self.spatial_shape}, "
                f"batch_size={self.batch_size})")


def from_torch(features, indices, spatial_shape, batch_size=None):
    """A :class:`sparsegrid.SparseTensor` viewing torch ``features`` (no copy; detached)
    at torch (or NumPy/CuPy) ``indices`` (copied to int32, as always)."""
    if isinstance(features, torch.Tensor):
        features = features.detach()
    return SparseTensor(features, indices, spatial_shape, batch_size)


# --------------------------------------------------------------------------- the bridge

class _Hole:
    """Where the k-th differentiable torch tensor goes back into the input structure."""

    __slots__ = ("k",)

    def __init__(self, k):
        self.k = k


def _split(value, tensors):
    """``value`` with every floating torch tensor replaced by a :class:`_Hole` (the
    tensors appended to ``tensors``) and integer torch tensors by array views."""
    if isinstance(value, torch.Tensor):
        if value.is_floating_point():
            tensors.append(value)
            return _Hole(len(tensors) - 1)
        return asarray(value.detach(), "an integer input tensor")
    if isinstance(value, SparseOutput):
        return ("__sparse__", value.tensor, _split(value.features, tensors))
    if isinstance(value, list):
        return [_split(v, tensors) for v in value]
    if isinstance(value, tuple):
        return tuple(_split(v, tensors) for v in value)
    return value


def _fill(value, leaves):
    if isinstance(value, _Hole):
        return leaves[value.k]
    if isinstance(value, tuple) and len(value) == 3 and value[0] == "__sparse__":
        return value[1].with_features(_fill(value[2], leaves))
    if isinstance(value, list):
        return [_fill(v, leaves) for v in value]
    if isinstance(value, tuple):
        return tuple(_fill(v, leaves) for v in value)
    return value


def _contiguous(array):
    xp = backend.array_namespace(array)
    return xp.ascontiguousarray(array)


class _Call:
    """One call through the bridge: the function, the input structure, the sparsegrid
    parameters to bind, and (after forward) the recorded graph."""

    def __init__(self, fn, structure, n_inputs, parameters, binder):
        self.grad_enabled = torch.is_grad_enabled()   # torch's mode at the call
        self.versions = ()                 # the saved torch tensors' versions at forward
        self.fn = fn
        self.structure = structure
        self.n_inputs = n_inputs
        self.parameters = parameters       # sparsegrid Parameters, aligned with torch's
        self.binder = binder               # binds torch storage to them (or None)
        self.leaves = None
        self.needs = ()                    # torch's needs_input_grad for the parameters
        self.output = None                 # the sparsegrid autodiff Tensor returned
        self.sparse = None                 # the output SparseTensor (detached), if sparse

    def _flags(self, flags):
        """Set the parameters' requires_grad flags; return the previous ones."""
        before = [p.requires_grad for p in self.parameters]
        for p, flag in zip(self.parameters, flags):
            p.requires_grad = bool(flag)
        return before

    def forward(self, inputs, params, needs):
        leaves = [Tensor(_view(t), requires_grad=need) for t, need in zip(inputs, needs)]
        if self.binder is not None:
            self.binder(params)
        self.needs = needs[len(inputs):]
        # The module's own requires_grad flags are torch's for this call only.
        before = self._flags(self.needs)
        try:
            if any(needs):
                result = self.fn(*_fill(self.structure, leaves))
            else:
                with no_grad():
                    result = self.fn(*_fill(self.structure, leaves))
        finally:
            self._flags(before)
        if isinstance(result, SparseTensor):
            self.sparse = result.detach()
            result = result.features
        elif not (isinstance(result, Tensor) or isinstance(result, np.ndarray)
                  or backend.is_cupy_array(result)):
            raise TypeError(f"the wrapped module returned a {type(result).__name__}; the "
                            f"torch bridge takes a SparseTensor or an array result")
        self.leaves = leaves
        self.output = result if isinstance(result, Tensor) else Tensor(result)
        return to_torch(self.output.data, "the module's output")

    def backward(self, grad):
        # The sparsegrid graph lives as long as this call, i.e. as long as torch keeps
        # the node (retain_graph=True and gradcheck run backward several times).
        output, leaves, parameters = self.output, self.leaves, self.parameters
        n = len(leaves)
        if not output.requires_grad:
            return [None] * (n + len(parameters))
        for leaf in leaves:
            leaf.grad = None
        kept = [p.grad for p in parameters]
        before = self._flags(self.needs)
        try:
            for p in parameters:
                p.grad = None
            g = _contiguous(asarray(grad.detach(), "the output gradient"))
            if g.dtype != output.dtype:
                g = g.astype(output.dtype)
            output.backward(g, retain_graph=True)
            grads = [leaf.grad for leaf in leaves] + [p.grad for p in parameters]
        finally:
            self._flags(before)
            for p, g in zip(parameters, kept):
                p.grad = g
        return [None if g is None else to_torch(g, "a gradient") for g in grads]


def _view(tensor):
    return asarray(tensor.detach(), "an input tensor")


class _Bridge(torch.autograd.Function):
    @staticmethod
    def forward(ctx, call, *tensors):
        n = call.n_inputs
        inputs, params = tensors[:n], tensors[n:]
        needs = ctx.needs_input_grad[1:] if call.grad_enabled else (False,) * len(tensors)
        out = call.forward(inputs, params, needs)
        # The inputs, the parameters and the output must not change before backward
        # (the sparsegrid graph holds views of them): their versions are checked there.
        call.saved = (*tensors, out)
        call.versions = tuple(t._version for t in call.saved)
        # The call (and the sparsegrid graph in it) lives exactly as long as torch keeps
        # this node's saved state: a packed token holds it (see _keep_alive), ctx only a
        # weak reference, so a backward without retain_graph frees the graph.
        ctx.call = weakref.ref(call)
        ctx.save_for_backward(torch.empty(0))
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        ctx.saved_tensors               # torch's own "backward a second time" check
        call = ctx.call()
        if call is None:                # pragma: no cover - torch raised above
            raise RuntimeError("the sparsegrid graph of this call was already freed")
        for t, version in zip(call.saved, call.versions):
            if t._version != version:
                raise RuntimeError(
                    "one of the variables needed for gradient computation has been "
                    f"modified by an inplace operation: a {tuple(t.shape)} tensor given to "
                    f"or returned by a sparsegrid call is at version {t._version}; "
                    f"expected version {version} (an optimizer step between forward and "
                    "backward does this)")
        return (None, *call.backward(grad))


def _run(call, tensors):
    """``_Bridge.apply`` with the call kept alive by torch's saved-tensor packing."""
    def pack(t):
        return (t, call)

    def unpack(packed):
        return packed[0]

    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        out = _Bridge.apply(call, *tensors)
    return out


def apply(fn, *args):
    """Call a sparsegrid function of autodiff Tensors / SparseTensors on torch tensors,
    differentiably for torch: ``apply(sparsegrid.functional.submanifold_conv, x,
    weight)`` with a torch ``weight`` returns torch output whose backward reaches
    ``weight``. Floating torch tensors anywhere in ``args`` (and a :class:`SparseOutput`'s
    features) are the differentiable inputs; a SparseTensor result returns a
    :class:`SparseOutput`, an array result a torch tensor."""
    tensors = []
    structure = _split(args, tensors)
    call = _Call(fn, structure, len(tensors), [], None)
    out = _run(call, tensors)
    return SparseOutput(out, call.sparse) if call.sparse is not None else out


def _mirror(module, made=None):
    """A torch module tree with ``module``'s parameters and buffers, sharing memory. A
    sparsegrid Parameter registered in several places (a shared weight) becomes one torch
    Parameter registered under each of its names, as torch shares parameters."""
    made = {} if made is None else made
    mirror = torch.nn.Module()
    for name, param in module._parameters.items():
        if param is not None:
            if id(param) not in made:
                made[id(param)] = torch.nn.Parameter(
                    to_torch(param.data, f"parameter {name}"),
                    requires_grad=param.requires_grad)
            mirror.register_parameter(name, made[id(param)])
    for name, buf in module._buffers.items():
        if buf is not None:
            mirror.register_buffer(name, to_torch(buf, f"buffer {name}"))
    for name, child in module._modules.items():
        mirror.add_module(name, _mirror(child, made))
    return mirror


class SparseModule(torch.nn.Module):
    """A :class:`sparsegrid.nn.Module` as a ``torch.nn.Module`` (see the module notes).

    Parameters
    ----------
    module : sparsegrid.nn.Module
        The network to wrap. Its parameters and buffers are shared with this module's
        (``self.sparse``, under the same dotted names; a shared weight is one torch
        Parameter). Either side may change them: arrays the sparsegrid side replaces
        (``load_state_dict``) are copied into torch's storage at the next call, cast to
        torch's dtype and device, which torch's side owns.

    Calling
    -------
    ``wrapper(features, indices, spatial_shape, batch_size=None)`` with torch tensors, or
    ``wrapper(x)`` for a SparseTensor / :class:`SparseOutput` (``features=`` replaces its
    features), or ``wrapper(input)`` with whatever the wrapped module's first layer takes
    (an InputLayer's ``[coords, features]``). Returns a :class:`SparseOutput` for a sparse
    result, a torch tensor for a dense one.
    """

    def __init__(self, module):
        super().__init__()
        if not isinstance(module, Module):
            raise TypeError(f"module must be a sparsegrid.nn.Module; got "
                            f"{type(module).__name__}")
        self.sparse = _mirror(module)
        object.__setattr__(self, "module", module)   # not a torch submodule
        object.__setattr__(self, "_bound", {})       # what each array was last bound to
        # the mirror views the module's own arrays: they count as bound
        for owner in self._torch_parameters()[1]:
            self._bound[id(owner)] = _pointer(owner.data)
        for m, name, _ in self._buffer_pairs():
            self._bound[(id(m), name)] = _pointer(m._buffers[name])
        self.train(module.training)

    def _pairs(self):
        """(sparsegrid module, torch mirror) for every module of the tree."""
        mirrors = dict(self.sparse.named_modules())
        return [(m, mirrors[path]) for path, m in self.module.named_modules()]

    def _torch_parameters(self):
        """(torch Parameters, their sparsegrid Parameters), each shared weight once."""
        params, owners, seen = [], [], set()
        for m, mirror in self._pairs():
            for name, p in m._parameters.items():
                if p is not None and id(p) not in seen:
                    seen.add(id(p))
                    params.append(mirror._parameters[name])
                    owners.append(p)
        return params, owners

    def _buffer_pairs(self):
        return [(m, name, buf) for m, mirror in self._pairs()
                for name, buf in mirror._buffers.items() if buf is not None]

    def _adopt_sparsegrid_changes(self, params, owners):
        """Values the sparsegrid side replaced since the last call (``load_state_dict``,
        an assignment to ``.data`` on the wrapped module) are copied into torch's storage
        before the call re-points the module at it, so neither side's change is lost.
        Torch's side owns the dtype and device: a replaced array is cast to them."""
        bound = self._bound
        with torch.no_grad():
            for owner, tensor in zip(owners, params):
                self._adopt(bound.get(id(owner)), owner.data, tensor, "parameter")
            for m, name, buf in self._buffer_pairs():
                self._adopt(bound.get((id(m), name)), m._buffers.get(name), buf, "buffer")

    @staticmethod
    def _adopt(last, current, tensor, what):
        if last is None or current is None or _pointer(current) == last:
            return
        if tuple(current.shape) != tuple(tensor.shape):
            raise ValueError(f"a {what} of the wrapped sparsegrid module was replaced by an "
                             f"array of shape {tuple(current.shape)}; the torch side holds "
                             f"{tuple(tensor.shape)}")
        source = to_torch(_contiguous(current), what)
        tensor.copy_(source.to(device=tensor.device, dtype=tensor.dtype))

    def _bind(self, owners):
        """Point the sparsegrid parameters (``owners``) and buffers at torch's storage."""
        def binder(params):
            for owner, tensor in zip(owners, params):
                owner.data = _view(tensor)
                self._bound[id(owner)] = _pointer(owner.data)
            for m, name, buf in self._buffer_pairs():
                setattr(m, name, _view(buf))
                self._bound[(id(m), name)] = _pointer(m._buffers[name])
        return binder

    def _sync_buffers(self):
        """Copy back a buffer the module rebound instead of updating in place."""
        for m, name, buf in self._buffer_pairs():
            mine = m._buffers.get(name)
            if mine is None:
                continue
            if _pointer(mine) != _pointer(_view(buf)):
                with torch.no_grad():
                    buf.copy_(to_torch(_contiguous(mine), f"buffer {name}"))
            self._bound[(id(m), name)] = _pointer(m._buffers[name])

    def train(self, mode=True):
        super().train(mode)
        self.module.train(mode)
        return self

    def forward(self, *args, features=None):
        if args and isinstance(args[0], torch.Tensor) and len(args) in (3, 4) and \
                not isinstance(args[2], torch.Tensor):
            feats, indices, spatial_shape = args[:3]
            batch_size = args[3] if len(args) == 4 else None
            x = from_torch(feats, indices, spatial_shape, batch_size)
            args = (SparseOutput(feats, x),)
        if features is not None:
            if len(args) != 1 or not isinstance(args[0], (SparseTensor, SparseOutput)):
                raise TypeError("features= replaces the features of one SparseTensor or "
                                "SparseOutput input")
            sites = args[0].tensor if isinstance(args[0], SparseOutput) else args[0]
            args = (SparseOutput(sites.features, sites).replace(features)
                    if isinstance(features, torch.Tensor) else sites.with_features(features),)
        tensors = []
        structure = _split(args, tensors)
        params, owners = self._torch_parameters()
        self._adopt_sparsegrid_changes(params, owners)
        call = _Call(self.module, structure, len(tensors), owners, self._bind(owners))
        out = _run(call, (*tensors, *params))
        self._sync_buffers()
        return SparseOutput(out, call.sparse) if call.sparse is not None else out

    def extra_repr(self):
        return "\n".join(["(module): " + repr(self.module).replace("\n", "\n  ")])


def _pointer(array):
    """The address of an array's first element (NumPy or CuPy)."""
    if backend.is_cupy_array(array):
        return array.data.ptr
    return array.__array_interface__["data"][0]
