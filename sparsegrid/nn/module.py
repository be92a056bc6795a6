"""Module and Parameter: the containers of trainable state (PyTorch-shaped, NumPy inside).

A :class:`Module` registers the :class:`Parameter` objects, buffers and sub-modules
assigned to its attributes, in assignment order. ``state_dict()`` names them with dotted
paths exactly as a PyTorch module tree would (``"0.weight"``, ``"2.running_mean"``), which
is how SparseConvNet checkpoints are keyed.
"""

from __future__ import annotations

from collections import OrderedDict

import numpy as np

from .. import backend
from ..autodiff.core import Tensor

_rng = np.random.default_rng()


def manual_seed(seed):
    """Seed the generator that initialises weights and draws dropout masks."""
    global _rng
    _rng = np.random.default_rng(seed)


def default_rng():
    """The generator behind weight initialisation and dropout (see :func:`manual_seed`)."""
    return _rng


class Parameter(Tensor):
    """A trainable array: a :class:`~sparsegrid.autodiff.Tensor` with ``requires_grad=True``."""

    __slots__ = ()

    def __init__(self, data, requires_grad=True):
        super().__init__(data, requires_grad)

    def __repr__(self):
        return f"Parameter(shape={self.shape}, dtype={self.dtype})"


def _host_copy(array):
    """A NumPy copy of a NumPy or CuPy array."""
    return array.get() if backend.is_cupy_array(array) else np.array(array, copy=True)


class Module:
    """Base class of layers and networks.

    Subclasses set parameters, buffers (:meth:`register_buffer`) and sub-modules as
    attributes in ``__init__`` and implement ``forward``. Calling the module calls
    ``forward``.
    """

    #: Buffers that stay float32 when the module is converted to float16 (:meth:`half`):
    #: batch-norm running statistics (mixed precision keeps statistics in float32).
    _float32_buffers = ()

    def __init__(self):
        object.__setattr__(self, "training", True)
        object.__setattr__(self, "_parameters", OrderedDict())
        object.__setattr__(self, "_buffers", OrderedDict())
        object.__setattr__(self, "_modules", OrderedDict())

    # -- registration ---------------------------------------------------------------------
    def __setattr__(self, name, value):
        if "_parameters" not in self.__dict__:
            raise AttributeError(f"{type(self).__name__}.__init__ must call "
                                 "Module.__init__(self) before assigning attributes")
        if name in self._parameters and value is not None and \
                not isinstance(value, Parameter):
            raise TypeError(f"cannot assign a {type(value).__name__} to parameter {name!r} "
                            f"of {type(self).__name__}: assign a Parameter (or None), or set "
                            f"{name}.data to change its values")
        if isinstance(value, Parameter):
            target = self._parameters
        elif isinstance(value, Module):
            target = self._modules
        elif name in self.__dict__.get("_buffer_names", ()):
            target = self._buffers
        else:
            target = None
        for table in (self._parameters, self._buffers, self._modules):
            if table is not target:
                table.pop(name, None)
        if target is not None:
            target[name] = value   # an existing name keeps its place (state_dict order)
        object.__setattr__(self, name, value)

    def __delattr__(self, name):
        for table in (self._parameters, self._buffers, self._modules):
            table.pop(name, None)
        object.__delattr__(self, name)

    def register_buffer(self, name, array):
        """A non-trainable array saved in ``state_dict`` (running statistics)."""
        names = self.__dict__.setdefault("_buffer_names", set())
        names.add(name)
        setattr(self, name, array)

    def add_module(self, name, module):
        if not isinstance(module, Module):
            raise TypeError(f"module must be a sparsegrid.nn.Module; got {type(module).__name__}")
        setattr(self, str(name), module)
        return self

    # -- traversal ------------------------------------------------------------------------
    def children(self):
        return iter(self._modules.values())

    def named_children(self):
        return iter(self._modules.items())

    def named_modules(self, prefix=""):
        """``(dotted name, module)`` for this module and every descendant, depth first."""
        yield prefix, self
        for name, child in self._modules.items():
            yield from child.named_modules(f"{prefix}.{name}" if prefix else name)

    def modules(self):
        for _, module in self.named_modules():
            yield module

    def named_parameters(self, prefix=""):
        """``(dotted name, Parameter)`` pairs; a parameter shared by two modules once."""
        seen = set()
        for path, module in self.named_modules(prefix):
            for name, param in module._parameters.items():
                if id(param) in seen:
                    continue
                seen.add(id(param))
                yield (f"{path}.{name}" if path else name), param

    def parameters(self):
        for _, param in self.named_parameters():
            yield param

    def named_buffers(self, prefix=""):
        for path, module in self.named_modules(prefix):
            for name, buf in module._buffers.items():
                yield (f"{path}.{name}" if path else name), buf

    def apply(self, fn):
        """Call ``fn(module)`` on every descendant and on self (children first)."""
        for child in self._modules.values():
            child.apply(fn)
        fn(self)
        return self

    # -- modes ----------------------------------------------------------------------------
    def train(self, mode=True):
        """Training mode (batch statistics, dropout active) for this module and descendants."""
        for module in self.modules():
            object.__setattr__(module, "training", bool(mode))
        return self

    def eval(self):
        """Evaluation mode: running statistics, no dropout."""
        return self.train(False)

    def zero_grad(self):
        """Forget accumulated gradients."""
        for param in self.parameters():
            param.grad = None

    def astype(self, dtype):
        """Convert every parameter and floating buffer to ``dtype`` in place (float64 for
        gradient checks); returns self. To float16, the buffers a module lists in
        ``_float32_buffers`` (batch-norm running statistics) become float32 instead."""
        dtype = np.dtype(dtype)
        for module in self.modules():
            for param in module._parameters.values():
                param.data = param.data.astype(dtype)
                param.grad = None
            for name, buf in list(module._buffers.items()):
                if buf is not None and buf.dtype.kind == "f":
                    keep32 = dtype == np.float16 and name in module._float32_buffers
                    setattr(module, name, buf.astype(np.float32 if keep32 else dtype))
        return self

    def double(self):
        """Parameters and floating buffers to float64 (in place); returns self."""
        return self.astype(np.float64)

    def half(self):
        """Parameters and floating buffers to float16 (in place); returns self.

        Mixed precision (docs/mixed_precision.md): the model then runs on float16 inputs
        (``features.astype(np.float16)``), sparse and dense layers alike; every kernel
        computes in float32 and rounds its result once to float16. Batch-norm running
        statistics stay float32 buffers. Train it with :class:`sparsegrid.nn.GradScaler`
        (loss scaling) and an optimizer from :mod:`sparsegrid.nn.optim`, which keeps a
        float32 master copy of every float16 parameter. ``float()`` converts back. SBNet,
        DCLS and dense N-D convolution layers do not run in float16 (TypeError).
        """
        return self.astype(np.float16)

    def requires_grad_(self, requires_grad=True):
        """Set ``requires_grad`` of every parameter of this module and its descendants
        (freeze with ``False``), as ``torch.nn.Module.requires_grad_``; returns self.

        A parameter that does not require a gradient gets no ``.grad`` from
        ``backward()``, and optimizers skip it. Raises TypeError unless the flag is a
        bool (or 0 / 1)."""
        if isinstance(requires_grad, (bool, np.bool_)) or \
                (isinstance(requires_grad, (int, np.integer)) and requires_grad in (0, 1)):
            flag = bool(requires_grad)
        else:
            raise TypeError(f"requires_grad_: requires_grad must be a bool; got "
                            f"{requires_grad!r} ({type(requires_grad).__name__})")
        for param in self.parameters():
            param.requires_grad = flag
        return self

    # -- devices ----------------------------------------------------------------------------
    def to(self, device):
        """Move every parameter, its gradient and every array buffer, in this module and
        its descendants, to ``device`` (``'cpu'``, ``'cuda'`` (the current GPU),
        ``'cuda:N'``, a GPU number or a ``cupy.cuda.Device``); returns self.

        In place: the :class:`Parameter` objects stay the same (an optimizer built on
        them keeps working; its state follows at its next ``step()``), only their
        ``.data`` (and ``.grad``) are replaced by copies on the device. Arrays already
        there are kept as they are (no copy). Modules keep no other arrays: what an
        input layer records about a batch lives with that batch's grid.

        Raises
        ------
        ValueError, TypeError
            For a malformed ``device`` (naming it; a dtype belongs in :meth:`astype`).
        RuntimeError
            For a GPU when CuPy or a visible GPU is missing (naming the device).
        """
        if isinstance(device, (type, np.dtype)):
            raise TypeError(f"Module.to(device): device must be 'cpu', 'cuda', 'cuda:N' or a "
                            f"GPU number; got {device!r} (convert dtypes with .astype(dtype), "
                            ".float() or .double())")
        target = backend.resolve_device(device)
        for module in self.modules():
            for param in module._parameters.values():
                if param is None:
                    continue
                param.data = backend.to_device(param.data, target)
                if param.grad is not None:
                    grad = param.grad.data if isinstance(param.grad, Tensor) else param.grad
                    param.grad = backend.to_device(grad, target)
            for name, buf in list(module._buffers.items()):
                if isinstance(buf, np.ndarray) or backend.is_cupy_array(buf):
                    setattr(module, name, backend.to_device(buf, target))
        return self

    def cuda(self, device=None):
        """Move to a GPU: the current one (``device=None``) or GPU ``device`` (N,
        ``'cuda:N'``); see :meth:`to`. Returns self."""
        return self.to(backend.cuda_device_argument(device))

    def cpu(self):
        """Move every parameter and buffer to the CPU (NumPy); see :meth:`to`. Returns self."""
        return self.to("cpu")

    def _devices(self):
        """The devices of this module's own parameters and array buffers (not its
        children's), in order of first appearance."""
        devices = []
        for value in list(self._parameters.values()) + list(self._buffers.values()):
            data = value.data if isinstance(value, Tensor) else value
            if isinstance(data, np.ndarray) or backend.is_cupy_array(data):
                device = backend.device_of(data)
                if device not in devices:
                    devices.append(device)
        return devices

    def _check_device(self, device, what="the input"):
        """Raise (TypeError between the CPU and a GPU, ValueError between two GPUs, naming
        both devices) unless this module's own parameters and buffers are on ``device``,
        the device of ``what``. Never copies."""
        for mine in self._devices():
            if mine != device:
                raise backend.mixed_devices_error(
                    f"{type(self).__name__}'s parameters", mine, what, device,
                    f" (model.to({device!r}) moves the model; x.to({mine!r}) the input)")

    def float(self):
        """Parameters and floating buffers to float32 (in place); returns self."""
        return self.astype(np.float32)

    # -- state ----------------------------------------------------------------------------
    def state_dict(self):
        """An ordered dict of dotted names to NumPy arrays (copies, on the host whatever
        the module's device): parameters, then buffers, module by module, as PyTorch
        orders them."""
        state = OrderedDict()
        for path, module in self.named_modules():
            for name, param in module._parameters.items():
                state[f"{path}.{name}" if path else name] = _host_copy(param.data)
            for name, buf in module._buffers.items():
                if buf is not None:
                    state[f"{path}.{name}" if path else name] = _host_copy(buf)
        return state

    def load_state_dict(self, state, strict=True):
        """Copy arrays from ``state`` into this module's parameters and buffers.

        Values may be NumPy or CuPy arrays, autodiff Tensors, torch tensors, or anything
        ``np.asarray`` takes. Each loaded array is put on the device of the parameter or
        buffer it replaces (a module on a GPU loads a NumPy state dict onto that GPU).
        A layer may accept other layouts of its own weights (convolutions take SCN's
        ``(K, 1, Cin, Cout)`` for ungrouped weights). With ``strict``, missing or
        unexpected keys raise a KeyError listing them; a shape that does not fit, or a
        dtype that cannot be cast to the target's (strings, objects, complex into real,
        floating into integer), always raises a ValueError/TypeError naming the key.

        All or nothing: every key, shape and dtype is checked before anything is
        assigned, so after an error the module is exactly as it was.

        Returns ``(missing_keys, unexpected_keys)``.
        """
        plan, missing, unexpected = self._prepare_load(state, strict)
        self._commit_load(plan)
        return missing, unexpected

    def _prepare_load(self, state, strict=True):
        """Check ``state`` against this module without changing anything.

        Returns ``(plan, missing_keys, unexpected_keys)``; ``plan`` is what
        :meth:`_commit_load` assigns (the converted, cast copies).
        """
        from collections.abc import Mapping

        if not isinstance(state, Mapping):
            raise TypeError(f"load_state_dict: state must be a mapping of names to arrays; "
                            f"got {type(state).__name__}")
        targets = {}
        for path, module in self.named_modules():
            for name in list(module._parameters) + [n for n, b in module._buffers.items()
                                                   if b is not None]:
                targets[f"{path}.{name}" if path else name] = (module, name)
        missing = [key for key in targets if key not in state]
        unexpected = [key for key in state if key not in targets]
        if strict and (missing or unexpected):
            raise KeyError(f"load_state_dict: missing keys {missing}, unexpected keys "
                           f"{unexpected}")
        plan = []
        for key, (module, name) in targets.items():
            if key not in state:
                continue
            value = state[key]
            try:
                if isinstance(value, Tensor):
                    value = value.data
                value = value.detach().cpu().numpy() if hasattr(value, "detach") else \
                    backend.to_numpy(value)
            except (TypeError, ValueError) as exc:
                raise TypeError(f"load_state_dict: {key!r} must be an array; got "
                                f"{type(value).__name__} ({exc})") from exc
            current = getattr(module, name)
            if current is None:  # a parameter slot left empty (bias=False)
                continue
            current_data = current.data if isinstance(current, Tensor) else current
            if value.dtype.hasobject or value.dtype.kind not in "biufc" or \
                    not np.can_cast(value.dtype, current_data.dtype, casting="same_kind"):
                raise TypeError(f"load_state_dict: {key!r} has dtype {value.dtype}, which "
                                f"cannot be cast to this module's {current_data.dtype}")
            value = module._convert_loaded(name, value, current_data.shape)
            if value.shape != current_data.shape:
                raise ValueError(f"load_state_dict: {key!r} has shape {value.shape}; this "
                                 f"module expects {current_data.shape}")
            value = value.astype(current_data.dtype, copy=True)
            # onto the target's device here, so that committing cannot fail
            value = backend.to_device(value, backend.device_of(current_data))
            plan.append((module, name, value))
        return plan, missing, unexpected

    @staticmethod
    def _commit_load(plan):
        """Assign what :meth:`_prepare_load` checked (cannot fail)."""
        for module, name, value in plan:
            current = getattr(module, name)
            if isinstance(current, Tensor):
                current.data = value
                current.grad = None
            else:
                setattr(module, name, value)

    def _convert_loaded(self, name, value, shape):
        """Hook: map another layout of parameter ``name`` to ``shape`` (default: as is)."""
        return value

    # -- calling and printing -------------------------------------------------------------
    def forward(self, *args, **kwargs):
        raise NotImplementedError(f"{type(self).__name__} does not define forward()")

    def __call__(self, *args, **kwargs):
        return self.forward(*args, **kwargs)

    def extra_repr(self):
        """One line of constructor arguments shown by ``repr``."""
        return ""

    def __repr__(self):
        head = f"{type(self).__name__}({self.extra_repr()}"
        if not self._modules:
            return head + ")"
        lines = [head]
        for name, child in self._modules.items():
            body = repr(child).replace("\n", "\n  ")
            lines.append(f"  ({name}): {body}")
        return "\n".join(lines) + "\n)"

    def input_spatial_size(self, out_size):
        """The input spatial size that gives ``out_size`` (identity for size-keeping layers)."""
        return out_size
