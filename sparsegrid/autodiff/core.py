"""Reverse-mode automatic differentiation over NumPy/CuPy arrays.

A :class:`Tensor` wraps an array. Each differentiable operation whose inputs require a
gradient records one node: its inputs and a vector-Jacobian-product closure mapping the
output's gradient to one gradient per input. ``Tensor.backward`` orders the recorded graph
topologically and runs the closures in reverse, accumulating gradients. Integer data
(indices, rulebooks) is closed over by the closures and never differentiated. Under
:func:`no_grad`, or when no input requires a gradient, nothing is recorded: inference
costs no autodiff bookkeeping.

``Tensor`` also speaks the part of ``torch.Tensor``'s language that SparseConvNet scripts
use (``size()``, ``view``, ``max(dim)``, ``type('torch.FloatTensor')``, ``index_add_``,
elementwise comparisons, ``np.asarray(t)``, ...): the non-differentiable ones are defined
here, the differentiable ones in :mod:`.ops` next to their vector-Jacobian products.
In-place operations (``index_add_``) bump the tensor's version; ``backward`` refuses a node
whose input was modified in place after the node was recorded (torch's rule), since its
recorded gradient would be wrong.
"""

from __future__ import annotations

import contextlib
import numbers
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


class Size(tuple):
    """The shape of a :class:`Tensor` (``t.shape``, ``t.size()``): a tuple of ints, as
    ``torch.Size`` is, with ``numel()``; a slice of it is a Size too. It prints as a tuple."""

    __slots__ = ()

    def numel(self):
        """The number of elements of a tensor of this shape (1 for ``()``)."""
        n = 1
        for extent in self:
            n *= extent
        return n

    def __getitem__(self, index):
        item = tuple.__getitem__(self, index)
        return Size(item) if isinstance(index, slice) else item


#: torch's tensor-type names (``t.type()``, ``t.type('torch.FloatTensor')``) and the NumPy
#: dtype of each; ``'torch.cuda.<Name>'`` is the same on the GPU.
TORCH_TYPE_NAMES = {
    "FloatTensor": np.dtype(np.float32), "DoubleTensor": np.dtype(np.float64),
    "HalfTensor": np.dtype(np.float16), "LongTensor": np.dtype(np.int64),
    "IntTensor": np.dtype(np.int32), "ShortTensor": np.dtype(np.int16),
    "CharTensor": np.dtype(np.int8), "ByteTensor": np.dtype(np.uint8),
    "BoolTensor": np.dtype(np.bool_),
}
_TYPE_NAME_OF = {dtype: name for name, dtype in TORCH_TYPE_NAMES.items()}


def _comparable(other):
    """Whether ``==`` / ``<`` ... with ``other`` is elementwise (else NotImplemented, so
    ``t == None`` is False and ``t != 'a'`` True, as in torch)."""
    return (isinstance(other, (Tensor, numbers.Number, np.generic, list, tuple))
            or (hasattr(other, "dtype") and hasattr(other, "shape")))


def _comparison(op, name):
    def compare(self, other):
        if not _comparable(other):
            return NotImplemented
        return Tensor(op(self.data, data_of(other)))

    compare.__name__ = name
    compare.__doc__ = (f"Elementwise ``{name}``: a Tensor without gradient (bool for "
                       "comparisons), with NumPy's broadcasting; never Python identity.")
    return compare


class Tensor:
    """An array that can carry a gradient.

    Parameters
    ----------
    data : array_like
        Kept as given when it is already a NumPy/CuPy array (no copy); a NumPy scalar
        (what a full reduction gives) becomes a 0-d array, and anything else goes through
        ``np.asarray`` (NumPy's dtype: ``Tensor([1.0])`` is float64, not torch's float32).
        So ``.data`` is always an array, whatever produced the tensor.
    requires_grad : bool
        Leaves with ``requires_grad=True`` receive ``.grad`` from :meth:`backward`.

    Its torch-named methods are listed in docs/porting_from_scn.md; the differentiable
    ones are installed by :mod:`.ops`.
    """

    __slots__ = ("data", "grad", "requires_grad", "_inputs", "_vjp", "_counter",
                 "_saved_versions", "__weakref__")
    # NumPy/CuPy binary operators defer to the Tensor's reflected operators; NumPy ufuncs
    # go through __array_ufunc__ (installed by .ops), so ``ndarray * t`` is a Tensor.
    __array_priority__ = 1000
    # ``==`` is elementwise, so hashing goes by identity, as for torch tensors (a Tensor is
    # a valid dict key / set member, compared by ``is``).
    __hash__ = object.__hash__

    def __init__(self, data, requires_grad=False):
        counter = None
        if isinstance(data, Tensor):
            # the same memory: the same version counter (as torch's detach shares it)
            data, counter = data.data, data._counter
        if isinstance(data, np.generic) or not hasattr(data, "dtype") or \
                not hasattr(data, "shape"):
            data = np.asarray(data)
        self.data = data
        self.grad = None
        self.requires_grad = bool(requires_grad)
        self._inputs = ()
        self._vjp = None
        # in-place operations bump the version, shared by every Tensor on the same data
        # made by detach() / Tensor(t); a node remembers its inputs' versions
        self._counter = [0] if counter is None else counter
        self._saved_versions = None   # the inputs' versions when this node was recorded

    @property
    def _version(self):
        return self._counter[0]

    @_version.setter
    def _version(self, value):
        self._counter[0] = value

    # -- basic properties ---------------------------------------------------------------
    @property
    def shape(self):
        """The shape, a :class:`Size` (a tuple)."""
        return Size(self.data.shape)

    @property
    def dtype(self):
        return self.data.dtype

    @property
    def ndim(self):
        return self.data.ndim

    @property
    def device(self):
        """``'cpu'`` or ``'cuda:N'``: where the data lives."""
        return backend.device_of(self.data)

    @property
    def is_cuda(self):
        """True when the data is a CuPy array."""
        return backend.is_cupy_array(self.data)

    @property
    def is_leaf(self):
        """True unless the tensor is the recorded output of an operation (torch's rule)."""
        return self._vjp is None

    def __len__(self):
        return len(self.data)

    def __repr__(self):
        values = np.array2string(backend.to_numpy(self.data), separator=", ",
                                 prefix="Tensor(")
        extras = f", dtype={self.dtype}"
        if self.is_cuda:
            extras += f", device='{self.device}'"
        if self.requires_grad:
            extras += ", requires_grad=True"
        return f"Tensor({values}{extras})"

    # -- torch's queries ---------------------------------------------------------------
    def size(self, dim=None):
        """The shape as a :class:`Size`, or the extent of dimension ``dim`` (negative
        counts from the end; IndexError outside ``[-ndim, ndim)``)."""
        if dim is None:
            return self.shape
        return self.data.shape[_dimension(dim, self.ndim, "size")]

    def dim(self):
        """The number of dimensions (``ndim``)."""
        return self.data.ndim

    def numel(self):
        """The number of elements."""
        return int(self.data.size)

    nelement = numel

    def detach(self):
        """The same data (no copy) and version counter, cut from the graph."""
        return Tensor(self)

    def requires_grad_(self, requires_grad=True):
        """Set ``requires_grad`` in place and return the tensor. Only leaves can be
        changed (RuntimeError otherwise, as in torch)."""
        if not self.is_leaf:
            raise RuntimeError("requires_grad_() on the recorded output of an operation: "
                               "only leaf tensors can change requires_grad (use detach())")
        self.requires_grad = bool(requires_grad)
        return self

    def item(self):
        """The single element as a Python number (ValueError unless there is one)."""
        if self.data.size != 1:
            raise ValueError(f"item() needs a tensor with one element; this one has shape "
                             f"{tuple(self.shape)} ({self.data.size} elements)")
        return self.data.item()

    def tolist(self):
        """The values as (nested) Python lists (a number for a 0-d tensor)."""
        return backend.to_numpy(self.data).tolist()

    def numpy(self):
        """The data as a NumPy array (the same memory on the CPU; copied from the GPU for
        CuPy), with or without a gradient: unlike torch, no ``detach()`` is needed."""
        return backend.to_numpy(self.data)

    def __array__(self, dtype=None, copy=None):
        """Explicit conversion, ``np.asarray(t)`` / ``np.concatenate([t1, t2])``: the data
        as a NumPy array (no gradient flows through NumPy functions). CuPy data raises
        TypeError, as CuPy does: call ``.cpu()`` or ``.numpy()`` first."""
        data = self.data
        if backend.is_cupy_array(data):
            raise TypeError(f"implicit conversion of a Tensor on {self.device} to a NumPy "
                            f"array is not allowed (CuPy's rule); call .cpu() or .numpy() "
                            f"first (or .get() on its .data)")
        if copy is False:
            if dtype is not None and np.dtype(dtype) != data.dtype:
                raise ValueError(f"np.asarray(tensor, dtype={np.dtype(dtype)}, copy=False): "
                                 f"the data is {data.dtype}, so a copy is needed")
            return np.asarray(data)
        if copy:
            return np.array(data, dtype=dtype, copy=True)
        return np.asarray(data, dtype=dtype)

    def _scalar(self, kind):
        if self.data.size != 1:
            raise ValueError(f"only a tensor with one element converts to a Python "
                             f"{kind.__name__}; this one has shape {tuple(self.shape)}")
        return kind(self.data.item())

    def __bool__(self):
        return self._scalar(bool)

    def __float__(self):
        return self._scalar(float)

    def __int__(self):
        return self._scalar(int)

    def __format__(self, spec):
        if self.data.ndim == 0:                       # f"{loss:.3f}", as torch
            return format(self.data.item(), spec)
        return format(str(self), spec)

    def __contains__(self, value):
        return bool((self.data == data_of(value)).any())

    def type(self, dtype=None, non_blocking=False):  # noqa: A003 - torch's name
        """With no argument: torch's name of the tensor type (``'torch.FloatTensor'``,
        ``'torch.cuda.LongTensor'``, ...). With one: the tensor converted (see
        :func:`.ops.tensor_type`)."""
        if dtype is None:
            name = _TYPE_NAME_OF.get(self.dtype)
            if name is None:
                raise ValueError(f"dtype {self.dtype} has no torch tensor-type name")
            return ("torch.cuda." if self.is_cuda else "torch.") + name
        from .ops import tensor_type
        return tensor_type(self, dtype)

    __eq__ = _comparison(lambda a, b: a == b, "__eq__")
    __ne__ = _comparison(lambda a, b: a != b, "__ne__")
    __lt__ = _comparison(lambda a, b: a < b, "__lt__")
    __le__ = _comparison(lambda a, b: a <= b, "__le__")
    __gt__ = _comparison(lambda a, b: a > b, "__gt__")
    __ge__ = _comparison(lambda a, b: a >= b, "__ge__")
    eq, ne, lt, le, gt, ge = __eq__, __ne__, __lt__, __le__, __gt__, __ge__
    # logical operators on bool (or integer) masks: ``(a > 0) & ~ignored``; no gradient
    __and__ = __rand__ = _comparison(lambda a, b: a & b, "__and__")
    __or__ = __ror__ = _comparison(lambda a, b: a | b, "__or__")
    __xor__ = __rxor__ = _comparison(lambda a, b: a ^ b, "__xor__")

    def __invert__(self):
        """``~mask``: logical not of a bool tensor (bitwise for integers); no gradient."""
        return Tensor(~self.data)

    def any(self, dim=None, keepdim=False):
        """Whether any element (along ``dim``) is true: a bool Tensor."""
        axis = None if dim is None else _dimension(dim, self.ndim, "any")
        return Tensor(self.data.any(axis=axis, keepdims=keepdim))

    def all(self, dim=None, keepdim=False):
        """Whether every element (along ``dim``) is true: a bool Tensor."""
        axis = None if dim is None else _dimension(dim, self.ndim, "all")
        return Tensor(self.data.all(axis=axis, keepdims=keepdim))

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
        Gradients have their tensor's dtype where it is float16 (a gradient promoted to
        float32 by a float32 operand, such as a loss scale, is rounded to float16 on its
        way in). Intermediate tensors do not keep gradients; the graph is released afterwards
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
            _check_versions(node)
            for parent, parent_grad in zip(node._inputs, node._vjp(g)):
                if parent_grad is None or not parent.requires_grad:
                    continue
                if parent.data.dtype == np.float16 and parent_grad.dtype != np.float16:
                    # mixed precision: a float16 tensor's gradient is float16 (an op
                    # with a float32 operand, such as a loss scale, promoted it)
                    parent_grad = parent_grad.astype(np.float16)
                if parent_grad.shape != parent.data.shape:
                    raise RuntimeError(f"internal error: an operation returned a gradient "
                                       f"of shape {parent_grad.shape} for an input of shape "
                                       f"{parent.data.shape}")
                key = id(parent)
                grads[key] = parent_grad if key not in grads else grads[key] + parent_grad
            if not retain_graph:   # release the graph as we go
                node._inputs, node._vjp, node._saved_versions = (), None, None


def _check_versions(node):
    """RuntimeError when an input of ``node`` was modified in place after ``node`` was
    recorded: its vector-Jacobian product would use the new values (torch's rule)."""
    for position, (parent, saved) in enumerate(zip(node._inputs, node._saved_versions)):
        if parent._version != saved:
            raise RuntimeError(
                f"an input (position {position}, shape {tuple(parent.shape)}) of an operation "
                f"whose gradient is needed was modified by an in-place operation (such as "
                f"index_add_) after the operation used it (version {saved} -> "
                f"{parent._version}); use the out-of-place form (index_add) or clone() the "
                f"tensor before modifying it")


def _dimension(dim, ndim, where):
    """``dim`` as a non-negative axis of an ``ndim``-D tensor (negative counts from the
    end). TypeError for a non-int, IndexError outside ``[-ndim, ndim)`` (a 0-d tensor has
    no dimension to name)."""
    if isinstance(dim, (bool, np.bool_)) or not isinstance(dim, numbers.Integral):
        raise TypeError(f"{where}: dim must be an int; got {type(dim).__name__} {dim!r}")
    dim = int(dim)
    if ndim == 0:
        raise IndexError(f"{where}: dimension {dim} was given, but the tensor is 0-d (it "
                         f"has no dimensions)")
    if not -ndim <= dim < ndim:
        raise IndexError(f"{where}: dimension out of range (expected to be in range of "
                         f"[{-ndim}, {ndim - 1}], but got {dim})")
    return dim % ndim


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
        result._saved_versions = tuple(t._version for t in tensors)
    return result
