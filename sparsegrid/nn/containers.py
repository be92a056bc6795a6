"""Containers: Sequential, ConcatTable, JoinTable, AddTable, Identity (SCN's tables)."""

from __future__ import annotations

from collections.abc import Mapping

from ..autodiff import ops
from ..autodiff.core import Tensor, record
from ..tensor import SparseTensor
from .layers import _tensor_features
from .module import Module


class _Numbered(Module):
    """Children named "0", "1", ... (PyTorch/SCN keys), added by ``add``/``append``; or,
    built from one ``OrderedDict`` (or dict) of names to modules, named by its keys, as
    ``torch.nn.Sequential(OrderedDict(...))``."""

    def __init__(self, *modules):
        super().__init__()
        if len(modules) == 1 and isinstance(modules[0], Mapping):
            for name, module in modules[0].items():
                if not isinstance(name, str) or not name or "." in name:
                    raise ValueError(f"{type(self).__name__}: module names must be non-empty "
                                     f"strings without '.'; got {name!r}")
                if name in self.__dict__ or hasattr(type(self), name):
                    raise ValueError(f"{type(self).__name__}: module name {name!r} is taken "
                                     "by an attribute or method")
                self.add_module(name, module)
            return
        for module in modules:
            self.add(module)

    def add(self, module):
        """Append ``module``, named by its position; returns self (SCN's chaining style).

        ValueError if that name is taken (a container built from a dict with such a key):
        nothing is replaced silently."""
        name = str(len(self._modules))
        if name in self._modules:
            raise ValueError(f"{type(self).__name__}.add: the name {name!r} is taken by "
                             "another child; use add_module(name, module)")
        return self.add_module(name, module)

    append = add

    def __len__(self):
        return len(self._modules)

    def __iter__(self):
        return iter(self._modules.values())


class Sequential(_Numbered):
    """Modules applied in order; children are named "0", "1", ... (PyTorch/SCN keys).

    ``add``/``append`` return the container so calls chain as in SCN; ``insert`` renumbers.
    """

    def insert(self, index, module):
        """Insert ``module`` before position ``index``; returns self."""
        if not isinstance(module, Module):
            raise TypeError(f"module must be a sparsegrid.nn.Module; got {type(module).__name__}")
        items = list(self._modules.values())
        index = index + len(items) if index < 0 else index
        if not 0 <= index <= len(items):
            raise IndexError(f"insert index {index} out of range for {len(items)} modules")
        items.insert(index, module)
        for name in list(self._modules):
            delattr(self, name)
        for module in items:
            self.add(module)
        return self

    def extend(self, modules):
        for module in modules:
            self.add(module)
        return self

    def __add__(self, other):
        """A new Sequential running self's modules, then ``other``'s (or ``other``)."""
        more = list(other) if isinstance(other, Sequential) else [other]
        return Sequential(*self, *more)

    def __getitem__(self, index):
        items = list(self._modules.items())
        if isinstance(index, slice):
            part = Sequential()   # keeps the children's names (and so state_dict keys)
            for name, module in items[index]:
                part.add_module(name, module)
            return part
        return items[index][1]

    def forward(self, x):
        for module in self._modules.values():
            x = module(x)
        return x

    def input_spatial_size(self, out_size):
        """Input spatial size giving ``out_size`` at the end: each module's inverse, in
        reverse order (hello world: 10x10 out needs 87x87 in)."""
        for module in reversed(list(self._modules.values())):
            out_size = module.input_spatial_size(out_size)
        return out_size


class ConcatTable(_Numbered):
    """Apply every branch to the same input; returns the list of their outputs."""

    def __getitem__(self, index):
        return list(self._modules.values())[index]

    def forward(self, x):
        outputs = [module(x) for module in self._modules.values()]
        _check_branch_outputs(self, outputs)
        return outputs

    def input_spatial_size(self, out_size):
        return next(iter(self._modules.values())).input_spatial_size(out_size)


def _check_branch_outputs(module, outputs):
    """The SparseTensor outputs of a ConcatTable's branches, checked to share one batch size
    and one dtype: every branch sees the same batch, and the JoinTable/AddTable after a
    ConcatTable needs both to agree. Their sites may differ (a branch may stride)."""
    sparse = [(i, t) for i, t in enumerate(outputs) if isinstance(t, SparseTensor)]
    if not sparse:
        return
    name = type(module).__name__
    i0, first = sparse[0]
    for i, t in sparse[1:]:
        if t.batch_size != first.batch_size:
            raise ValueError(f"{name}: branch {i} returned a batch of {t.batch_size} samples; "
                             f"branch {i0} returned {first.batch_size}")
        if t.dtype != first.dtype:
            raise TypeError(f"{name}: branch {i} returned {t.dtype} features; branch {i0} "
                            f"returned {first.dtype} (convert the branches to one dtype)")


def _same_sites(module, tensors):
    """The first of ``tensors`` (checked to share its sites and row order) and the
    tensors' (Tensor) features."""
    if not isinstance(tensors, (list, tuple)) or not tensors:
        raise TypeError(f"{type(module).__name__} expects a non-empty list of SparseTensors")
    first = tensors[0]
    for i, t in enumerate(tensors):
        if not isinstance(t, SparseTensor):
            raise TypeError(f"{type(module).__name__} input {i} is a {type(t).__name__}, "
                            "not a SparseTensor")
        if t.dtype != first.dtype:
            raise TypeError(f"{type(module).__name__} needs tensors of one dtype; input {i} "
                            f"has {t.dtype} features, input 0 has {first.dtype}")
        if t.sites is first.sites:
            continue
        if t.batch_size != first.batch_size:
            raise ValueError(f"{type(module).__name__} needs tensors of the same batch size; "
                             f"input {i} has {t.batch_size} samples, input 0 has "
                             f"{first.batch_size}")
        if t.spatial_shape != first.spatial_shape or t.n_active != first.n_active or \
                not bool((t.indices == first.indices).all()):
            raise ValueError(f"{type(module).__name__} needs tensors on the same sites in the "
                             f"same row order; input {i} ({t.n_active} sites, "
                             f"{t.spatial_shape}) differs from input 0 ({first.n_active} "
                             f"sites, {first.spatial_shape})")
    return first, [_tensor_features(t).features for t in tensors]


class JoinTable(Module):
    """Concatenate the channels of tensors on the same sites (checked, unlike SCN)."""

    def forward(self, tensors):
        first, features = _same_sites(self, tensors)
        return first.with_features(ops.concatenate(features, axis=1))


class AddTable(Module):
    """Sum tensors on the same sites with the same channel count (checked, unlike SCN)."""

    def forward(self, tensors):
        first, features = _same_sites(self, tensors)
        channels = {t.n_channels for t in tensors}
        if len(channels) != 1:
            raise ValueError(f"AddTable needs equal channel counts; got {sorted(channels)}")
        total = features[0]
        for f in features[1:]:
            total = ops.add(total, f)
        return first.with_features(total)


class Identity(Module):
    """Returns its input (a SparseTensor with plain features gets Tensor features, as
    every layer's output)."""

    def forward(self, x):
        return _tensor_features(x) if isinstance(x, SparseTensor) else x


__all__ = ["AddTable", "ConcatTable", "Identity", "JoinTable", "Sequential"]


class VerboseIdentity(Identity):
    """Returns its input after printing a one-line description of it (debugging)."""

    def forward(self, x):
        print(x)
        return super().forward(x)


def concatenate_feature_planes(tensors):
    """Functional JoinTable: channels of tensors on the same sites, side by side."""
    return JoinTable()(tensors)


def add_feature_planes(tensors):
    """Functional AddTable: the sum of tensors on the same sites."""
    return AddTable()(tensors)


__all__ += ["VerboseIdentity", "add_feature_planes", "concatenate_feature_planes"]


class CheckpointedSequential(Sequential):
    """A Sequential that keeps no intermediate results for the backward pass: the forward
    runs without recording, and the backward pass runs the modules again (with the same
    random draws) to get their gradients. Trades one extra forward for the memory of the
    activations, as SCN's (PyTorch-checkpoint based) CheckpointedSequential.

    As with any recomputation, batch-norm running statistics are updated twice per
    training step (once per forward).
    """

    def forward(self, x):
        from ..autodiff.core import is_grad_enabled, no_grad
        from .module import default_rng
        features = None
        if isinstance(x, SparseTensor):
            x = _tensor_features(x)
            features = x.features
        params = [p for p in self.parameters() if p.requires_grad]
        inputs = ([features] if features is not None else []) + params
        if not is_grad_enabled() or not any(t.requires_grad for t in inputs):
            return super().forward(x)
        rng_state = default_rng().bit_generator.state
        with no_grad():
            out = super().forward(x.detach())
        if not isinstance(out, SparseTensor):
            raise TypeError("CheckpointedSequential needs its modules to return a "
                            "SparseTensor")

        def vjp(g):
            after = default_rng().bit_generator.state
            default_rng().bit_generator.state = rng_state        # the same dropout masks
            leaf = Tensor(features.data, requires_grad=features.requires_grad) \
                if features is not None else None
            again = super(CheckpointedSequential, self).forward(
                x.with_features(leaf) if leaf is not None else x.detach())
            default_rng().bit_generator.state = after
            if again.features.requires_grad:
                again.features.backward(g)   # parameter gradients accumulate in place
            grads = [leaf.grad] if leaf is not None else []
            return grads + [None] * len(params)

        return out.with_features(record(out.features.data, inputs, vjp))


__all__ += ["CheckpointedSequential"]
