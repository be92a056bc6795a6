"""Reverse-mode automatic differentiation over NumPy/CuPy arrays.

A :class:`Tensor` wraps an array. Each differentiable operation whose inputs require a
gradient records one node: its inputs and a vector-Jacobian-product closure mapping the
output's gradient to one gradient per input. ``Tensor.backward`` orders the recorded graph
topologically and runs the closures in reverse, accumulating gradients. Integer data
(indices, rulebooks) is closed over by the closures and never differentiated. Under
:func:`no_grad`, or when no input requires a gradient, nothing is recorded: inference
costs no autodiff bookkeeping.
"""

from __future__ import annotations

import contextlib
import threading

import numpy as np

from .. import backend

_state = threading.local()


def is_grad_enabled():
    """False inside :func:`no_grad` (per thread)."""
    return getattr(_state, "enabled", True)


@contextlib.contextmanager
def no_grad():
    """Record nothing inside this block (inference)."""
    before = is_grad_enabled()
    _state.enabled = False
    try:
        yield
    finally:
        _state.enabled = before


class Tensor:
    """An array that can carry a gradient.

    Parameters
    ----------
    data : array_like
        Kept as given when it is already a NumPy/CuPy array (no copy).
    requires_grad : bool
        Leaves with ``requires_grad=True`` receive ``.grad`` from :meth:`backward`.
    """

    __slots__ = ("data", "grad", "requires_grad", "_inputs", "_vjp", "__weakref__")
    __array_priority__ = 1000

    def __init__(self, data, requires_grad=False):
        if isinstance(data, Tensor):
            data = data.data
        if not hasattr(data, "dtype") or not hasattr(data, "shape"):
            data = np.asarray(data)
        self.data = data
        self.grad = None
        self.requires_grad = bool(requires_grad)
        self._inputs = ()
        self._vjp = None

    # -- basic properties ---------------------------------------------------------------
    @property
    def shape(self):
        return self.data.shape

    @property
    def dtype(self):
        return self.data.dtype

    @property
    def ndim(self):
        return self.data.ndim

    def __len__(self):
        return len(self.data)

    def __repr__(self):
        flag = ", requires_grad=True" if self.requires_grad else ""
        return f"Tensor(shape={self.shape}, dtype={self.dtype}{flag})"

    def detach(self):
        """The same data, cut from the graph."""
        return Tensor(self.data)

    def item(self):
        return self.data.item()

    def numpy(self):
        """The data as a NumPy array (copied from the GPU for CuPy)."""
        return backend.to_numpy(self.data)

    def zero_grad(self):
        self.grad = None

    # -- DLPack: the data leaves zero-copy (torch.from_dlpack(t), jax.dlpack.from_dlpack(t))
    def __dlpack__(self, *args, **kwargs):
        return self.data.__dlpack__(*args, **kwargs)

    def __dlpack_device__(self):
        return self.data.__dlpack_device__()

    # -- gradients ----------------------------------------------------------------------
    def backward(self, grad=None, retain_graph=False):
        """Accumulate d(self)/d(leaf) * grad into every leaf's ``.grad``.

        ``grad`` defaults to 1 for a scalar (one-element) tensor and is required otherwise.
        Intermediate tensors do not keep gradients; the graph is released afterwards
        unless ``retain_graph`` (then ``backward`` may run again on it, as the torch
        bridge needs for ``torch.autograd.gradcheck`` and ``retain_graph=True``).
        """
        if not self.requires_grad:
            raise RuntimeError("backward() on a tensor that does not require a gradient: no "
                               "input of the computation had requires_grad=True (or it ran "
                               "under no_grad())")
        xp = backend.array_namespace(self.data)
        if grad is None:
            if self.data.size != 1:
                raise ValueError(f"backward() needs grad for a non-scalar tensor of shape "
                                 f"{self.shape}")
            grad = xp.ones_like(self.data)
        else:
            grad = grad.data if isinstance(grad, Tensor) else xp.asarray(grad,
                                                                         dtype=self.dtype)
            if grad.shape != self.shape:
                raise ValueError(f"grad has shape {grad.shape}; expected {self.shape}")
        order = _topological_order(self)
        grads = {id(self): grad}
        for node in reversed(order):
            g = grads.pop(id(node), None)
            if g is None:
                continue
            if node._vjp is None:
                if node.requires_grad:
                    node.grad = g.copy() if node.grad is None else node.grad + g
                continue
            for parent, parent_grad in zip(node._inputs, node._vjp(g)):
                if parent_grad is None or not parent.requires_grad:
                    continue
                if parent_grad.shape != parent.data.shape:
                    raise RuntimeError(f"internal error: an operation returned a gradient "
                                       f"of shape {parent_grad.shape} for an input of shape "
                                       f"{parent.data.shape}")
                key = id(parent)
                grads[key] = parent_grad if key not in grads else grads[key] + parent_grad
            if not retain_graph:
                node._inputs, node._vjp = (), None  # release the graph as we go


def _topological_order(root):
    """Nodes reachable from ``root`` (inputs before outputs), without recursion."""
    # Post-order: a node is appended only after every input it depends on, so in reverse
    # it runs after all of its consumers have added their gradients to it.
    order, visited, stack = [], set(), [(root, False)]
    while stack:
        node, expanded = stack.pop()
        if expanded:
            order.append(node)
            continue
        if id(node) in visited:
            continue
        visited.add(id(node))
        stack.append((node, True))
        for parent in node._inputs:
            if parent.requires_grad and id(parent) not in visited:
                stack.append((parent, False))
    return order


def as_tensor(value):
    """``value`` if it is a Tensor, else a constant Tensor around it."""
    return value if isinstance(value, Tensor) else Tensor(value)


def data_of(value):
    """The array inside a Tensor, or the value itself."""
    return value.data if isinstance(value, Tensor) else value


def record(out, inputs, vjp):
    """Wrap the array ``out`` of an operation on ``inputs`` (Tensors or constants).

    ``vjp(g)`` returns one gradient (or None) per input. A node is recorded only when
    gradients are enabled and some input requires one.
    """
    tensors = tuple(as_tensor(x) for x in inputs)
    result = Tensor(out)
    if is_grad_enabled() and any(t.requires_grad for t in tensors):
        result.requires_grad = True
        result._inputs = tensors
        result._vjp = vjp
    return result
