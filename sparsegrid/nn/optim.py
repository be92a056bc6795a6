"""Optimizers and learning-rate schedules with PyTorch's interface and update rules.

The optimizers (:class:`SGD`, :class:`Adam`, :class:`AdamW`) update ``param.data`` in
place from ``param.grad``, parameter by parameter, with whole-array NumPy (or CuPy)
operations. They follow ``torch.optim``'s conventions:

* ``param_groups`` is a list of dicts, each holding ``"params"`` (a list of
  :class:`~sparsegrid.nn.Parameter`/:class:`~sparsegrid.autodiff.Tensor`) and that group's
  hyper-parameters; the constructor takes an iterable of parameters (one group) or a list
  of such dicts (missing hyper-parameters come from the constructor's arguments).
* ``state_dict()`` returns ``{"state": {index: {name: value}}, "param_groups": [...]}``
  where parameters are numbered by their position across all groups, in order, and each
  group lists the numbers of its parameters under ``"params"``. Arrays are NumPy copies.
* Parameters whose ``grad`` is None are skipped by ``step()`` (no state is created).
* Updates keep the parameter's dtype: a float32 parameter is updated in float32
  arithmetic (hyper-parameters are cast to the parameter dtype before use).
* float16 parameters (mixed precision, docs/mixed_precision.md) get float32 master
  weights: the optimizer keeps a float32 copy of the parameter (state ``"master_param"``)
  and every state array in float32, applies the update there (to a float32 gradient) and
  writes the rounded value back into the float16 parameter. An update too small to move a
  float16 value accumulates in the master copy, and Adam's ``eps`` (1e-8, below float16's
  smallest subnormal) keeps its value. When the parameter's array was replaced (a
  ``load_state_dict`` of the model, a ``.to(device)``) and the master copy no longer
  rounds to it, the master copy is taken again from the parameter.
* Devices: every update runs in the parameter's array library (NumPy, or CuPy on the
  parameter's GPU). State follows its parameter: after ``model.to(device)`` the next
  ``step()`` moves each state array that is not on its parameter's device there (so an
  optimizer needs no ``.to``); a gradient on another device than its parameter raises.
  ``state_dict()`` holds NumPy copies; ``load_state_dict`` puts each array on its
  parameter's device.

The schedules (:class:`LambdaLR`, :class:`StepLR`, :class:`MultiStepLR`,
:class:`ExponentialLR`, :class:`CosineAnnealingLR`, :class:`ExponentialDecayLR`) follow
``torch.optim.lr_scheduler``: construction records ``initial_lr`` in every group and
applies epoch 0's learning rate (``last_epoch == 0``); each later ``step()`` adds one to
``last_epoch`` and writes the closed-form rate for it into every group's ``"lr"``.
"""

from __future__ import annotations

import bisect
import copy
import math
import numbers
from collections.abc import Iterable, Mapping

import numpy as np

from .. import backend
from ..autodiff.core import Tensor

__all__ = [
    "Optimizer", "SGD", "Adam", "AdamW",
    "LRScheduler", "LambdaLR", "StepLR", "MultiStepLR", "ExponentialLR",
    "CosineAnnealingLR", "ExponentialDecayLR",
]


def _is_array(value):
    return isinstance(value, np.ndarray) or backend.is_cupy_array(value)


def state_dtype(param):
    """The dtype of an optimizer's floating state for a parameter array: float32 for a
    float16 parameter (master weights), the parameter's own dtype otherwise."""
    return np.dtype(np.float32) if param.dtype == np.float16 else param.dtype


def _to_array_like(value, like):
    """``value`` (an array, a torch tensor or a number) as a fresh array on ``like``'s
    device (NumPy, or CuPy on ``like``'s GPU); floating arrays take ``like``'s state dtype
    (:func:`state_dtype`), as torch casts optimizer state."""
    if hasattr(value, "detach") and hasattr(value, "cpu"):  # a torch tensor
        value = value.detach().cpu().numpy()
    array = backend.to_device(value, backend.device_of(like))
    if array is value:                         # already there: copy it, on its own device
        array = _on_device_of(array, array.copy)
    target = state_dtype(like)
    if array.dtype.kind == "f" and like.dtype.kind == "f" and array.dtype != target:
        array = _on_device_of(array, lambda: array.astype(target))
    return array


def _on_device_of(array, fn):
    """``fn()`` with ``array``'s GPU current (CuPy allocates on the current device), or
    plainly for a NumPy array."""
    if backend.is_cupy_array(array):
        with array.device:
            return fn()
    return fn()


def _follow(state, param):
    """Move every state array of ``param`` that is not on the parameter's device there
    (after ``module.to(device)``): an optimizer's state follows its parameters."""
    device = backend.device_of(param)
    for name, value in state.items():
        if _is_array(value) and backend.device_of(value) != device:
            state[name] = backend.to_device(value, device)


def _copy_value(value):
    """A deep copy of a state value; arrays become NumPy copies (a state dict lives on the
    host, whatever the parameters' device)."""
    if _is_array(value):
        return value.get() if backend.is_cupy_array(value) else value.copy()
    if isinstance(value, dict):
        return {k: _copy_value(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_copy_value(v) for v in value)
    return copy.deepcopy(value)


def _describe(value):
    return f"{value!r} ({type(value).__name__})"


def _check_real(name, value, low=None, high=None, low_open=False, high_open=True,
                finite=True):
    """Raise unless ``value`` is a (finite) real number in the range: a TypeError for a
    value that is not a real number (strings, None, bools), a ValueError for NaN, an
    infinity or a number outside the range; the message names ``name``, the range and
    the value given."""
    lo = "" if low is None else ("(" if low_open else "[") + f"{low}"
    hi = "" if high is None else f"{high}" + (")" if high_open else "]")
    where = f"in {lo}, {hi}" if low is not None and high is not None else (
        f"{'>' if low_open else '>='} {low}" if low is not None else
        f"{'<' if high_open else '<='} {high}" if high is not None else "")
    expected = ("a finite real number" if finite else "a real number") + \
        (f" {where}" if where else "")
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise TypeError(f"Invalid {name}: expected {expected}; got {_describe(value)}")
    number = float(value)
    bad = math.isnan(number) or (finite and math.isinf(number))
    if low is not None:
        bad = bad or (number <= low if low_open else number < low)
    if high is not None:
        bad = bad or (number >= high if high_open else number > high)
    if bad:
        raise ValueError(f"Invalid {name}: {value!r} (must be {expected})")


def _check_int(name, value, low):
    """Raise unless ``value`` is an int (not a bool) >= ``low``."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
        raise TypeError(f"Invalid {name}: expected an int >= {low}; got {_describe(value)}")
    if value < low:
        raise ValueError(f"Invalid {name}: {value!r} (an int >= {low})")


def _check_bool(name, value):
    """Raise TypeError unless ``value`` is bool-like (a bool, NumPy bool, or the ints 0
    and 1); strings such as ``"False"`` are refused (they would be truthy)."""
    if isinstance(value, (bool, np.bool_)):
        return
    if isinstance(value, numbers.Integral) and value in (0, 1):
        return
    raise TypeError(f"Invalid {name}: expected a bool; got {_describe(value)}")


# -- optimizers -----------------------------------------------------------------------------
class Optimizer:
    """Base class: parameter groups, state, ``zero_grad`` and (de)serialisation.

    Parameters
    ----------
    params : iterable of Tensor, or iterable of dict
        The parameters to optimise, or parameter groups: dicts with a ``"params"`` entry
        (a Tensor or an iterable of Tensors) and optional per-group hyper-parameters.
    defaults : dict
        The hyper-parameters every group gets unless it sets its own.

    Attributes
    ----------
    param_groups : list of dict
        One dict per group: ``"params"`` (list of Tensors) and hyper-parameters. Changing
        a group's ``"lr"`` (as schedulers do) takes effect at the next :meth:`step`.
    state : dict
        Per-parameter state (moment buffers, step counts), keyed by ``id(param)``; see
        :meth:`state_of`.
    defaults : dict
        The constructor's hyper-parameters.
    """

    def __init__(self, params, defaults):
        self.defaults = dict(defaults)
        self._validate(self.defaults)
        self.param_groups = []
        self.state = {}
        if isinstance(params, dict):
            raise TypeError("params should be an iterable of Parameters/Tensors or a list of "
                            "parameter-group dicts; wrap a single group dict in a list")
        if isinstance(params, (Tensor, np.ndarray)) or not isinstance(params, Iterable):
            raise TypeError("params should be an iterable of Parameters/Tensors or of "
                            f"dicts (parameter groups); got {type(params).__name__}")
        groups = list(params)
        if not groups:
            raise ValueError("optimizer got an empty parameter list")
        if not isinstance(groups[0], dict):
            groups = [{"params": groups}]
        for group in groups:
            self.add_param_group(group)

    # -- groups ------------------------------------------------------------------------------
    def add_param_group(self, param_group):
        """Add a group of parameters with its own hyper-parameters.

        Parameters
        ----------
        param_group : dict
            ``"params"``: a Tensor or an iterable of Tensors; other keys override the
            optimizer's defaults for this group.

        Raises
        ------
        TypeError
            If ``param_group`` is not a dict or a parameter is not a Tensor.
        ValueError
            If the group is empty, repeats a parameter, shares one with another group, or
            has an invalid hyper-parameter.
        """
        if not isinstance(param_group, dict):
            raise TypeError(f"a parameter group must be a dict; got {type(param_group).__name__}")
        if "params" not in param_group:
            raise ValueError("a parameter group needs a 'params' entry")
        params = param_group["params"]
        if isinstance(params, Tensor):
            params = [params]
        elif isinstance(params, (set, frozenset)):
            raise TypeError("optimizer parameters must be an ordered collection; a set's "
                            "order changes between runs, so convert it to a list")
        elif isinstance(params, np.ndarray) or not isinstance(params, Iterable):
            raise TypeError("'params' should be a Tensor or an iterable of Tensors; got "
                            f"{type(params).__name__}")
        params = list(params)
        if not params:
            raise ValueError("optimizer got an empty parameter list")
        for i, param in enumerate(params):
            if not isinstance(param, Tensor):
                raise TypeError("optimizer can only optimize Parameters/Tensors; element "
                                f"{i} is a {type(param).__name__}")
            if param.dtype.kind not in "fc":
                raise TypeError(f"optimizer can only optimize floating-point parameters; "
                                f"element {i} has dtype {param.dtype}")
        ids = [id(p) for p in params]
        if len(set(ids)) != len(ids):
            raise ValueError("a parameter appears more than once in a parameter group")
        existing = {id(p) for group in self.param_groups for p in group["params"]}
        if existing.intersection(ids):
            raise ValueError("some parameters appear in more than one parameter group")
        group = {key: value for key, value in param_group.items() if key != "params"}
        for key, value in self.defaults.items():
            group.setdefault(key, value)
        self._validate(group)
        group["params"] = params
        self.param_groups.append(group)

    # The per-parameter state entries this kind of optimizer keeps (subclasses set).
    _state_names = None

    def _validate(self, group):
        """Raise ValueError/TypeError for an invalid hyper-parameter (subclasses extend)."""
        if "lr" in group:
            _check_real("lr", group["lr"], low=0.0)

    # -- gradients ---------------------------------------------------------------------------
    def zero_grad(self, set_to_none=True):
        """Forget the gradients of every optimised parameter.

        Parameters
        ----------
        set_to_none : bool
            True (default) sets ``grad`` to None; False fills existing gradients with
            zeros in place.
        """
        for group in self.param_groups:
            for param in group["params"]:
                if set_to_none:
                    param.grad = None
                elif param.grad is not None:
                    param.grad[...] = 0

    def step(self, closure=None):
        """Update every parameter that has a gradient, once.

        Parameters
        ----------
        closure : callable, optional
            Called first (re-evaluating the model and its gradients); its value is
            returned.

        Returns
        -------
        The closure's value, or None.

        Raises
        ------
        TypeError, ValueError
            For a gradient on another device than its parameter (naming both devices).
            State arrays on another device (after ``model.to``) are moved to the
            parameter's device instead: the state follows the parameters.
        """
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            for param in group["params"]:
                if param.grad is None:
                    continue
                grad = param.grad.data if isinstance(param.grad, Tensor) else param.grad
                if grad.shape != param.data.shape:
                    raise ValueError(f"gradient of shape {grad.shape} for a parameter of "
                                     f"shape {param.data.shape}")
                p = param.data
                if backend.device_of(grad) != backend.device_of(p):
                    raise backend.mixed_devices_error("a parameter", backend.device_of(p), "its gradient",
                                         backend.device_of(grad),
                                         " (Module.to(device) moves both)")
                state = self.state.setdefault(id(param), {})
                if backend.is_cupy_array(p):
                    with p.device:            # new state and temporaries on p's GPU
                        self._step_one(param, p, grad, state, group)
                else:
                    self._step_one(param, p, grad, state, group)
        return loss

    def _step_one(self, param, p, grad, state, group):
        """One parameter's update: cast the gradient, bring its state to ``p``'s device;
        a float16 ``p`` is updated through its float32 master copy."""
        _follow(state, p)
        if p.dtype == np.float16:
            master = self._master_copy(param, p, state)
            if grad.dtype != master.dtype:
                grad = grad.astype(master.dtype)
            self._update(master, grad, state, group)
            p[...] = master                   # rounded once to float16
            return
        if grad.dtype != p.dtype:
            grad = grad.astype(p.dtype)
        self._update(p, grad, state, group)

    def _master_copy(self, param, p, state):
        """The float32 master copy of the float16 array ``p`` (state ``"master_param"``):
        made from ``p`` at the first step; afterwards each element is kept where it still
        rounds to ``p``'s value and taken from ``p`` where ``p`` was changed behind the
        optimizer's back (written in place, a loaded state dict, a replaced array), so an
        outside change is never undone. Elementwise: no host read on a GPU."""
        master = state.get("master_param")
        if master is None or master.shape != p.shape:
            master = state["master_param"] = p.astype(np.float32)
            return master
        xp = backend.array_namespace(p)
        stale = master.astype(p.dtype) != p
        master[...] = xp.where(stale, p.astype(np.float32), master)
        return master

    def _update(self, p, grad, state, group):
        """Update array ``p`` in place from ``grad`` (never modify ``grad``)."""
        raise NotImplementedError

    # -- state -------------------------------------------------------------------------------
    def _all_params(self):
        return [p for group in self.param_groups for p in group["params"]]

    def state_of(self, param):
        """The state dict of ``param`` (empty before its first update)."""
        return self.state.get(id(param), {})

    def state_dict(self):
        """The optimizer's state, as ``torch.optim.Optimizer.state_dict`` lays it out.

        Returns
        -------
        dict
            ``"state"``: ``{index: {name: value}}`` for every parameter that has state,
            ``index`` being the parameter's position across all groups; arrays are
            NumPy copies (on the host, whatever the parameters' device).
            ``"param_groups"``: one dict per group with its hyper-parameters and
            ``"params"``, the list of its parameters' indices.
        """
        index = {}
        groups = []
        for group in self.param_groups:
            packed = {key: _copy_value(value) for key, value in group.items()
                      if key != "params"}
            packed["params"] = []
            for param in group["params"]:
                index[id(param)] = len(index)
                packed["params"].append(index[id(param)])
            groups.append(packed)
        state = {}
        for param in self._all_params():
            if self.state.get(id(param)):
                state[index[id(param)]] = _copy_value(self.state[id(param)])
        return {"state": state, "param_groups": groups}

    def load_state_dict(self, state_dict):
        """Restore hyper-parameters and per-parameter state saved by :meth:`state_dict`.

        The optimizer must have been built with the same groups of the same sizes, as in
        PyTorch. Arrays are copied; floating-point state takes its parameter's dtype and
        device (NumPy, or CuPy on the parameter's GPU). NumPy, CuPy and torch arrays are
        accepted.

        All or nothing: the whole state dict is checked (structure, the optimizer's kind
        as far as the hyper-parameter and state names tell it, every hyper-parameter,
        every array's shape and dtype) before anything changes.

        Raises
        ------
        ValueError
            If the number of groups or of parameters in a group does not match, if the
            state is another kind of optimizer's (Adam state into SGD), or if a value is
            invalid.
        TypeError
            For a value of the wrong type.
        KeyError
            If ``state_dict`` lacks ``"state"`` or ``"param_groups"``.
        """
        self._commit_load(self._prepare_load(state_dict))

    @staticmethod
    def _guess_kind(group_keys, state_names):
        keys = set(group_keys) | set(state_names)
        if keys & {"betas", "amsgrad", "exp_avg", "exp_avg_sq", "max_exp_avg_sq"}:
            return "Adam/AdamW"
        if keys & {"momentum", "dampening", "nesterov", "momentum_buffer"}:
            return "SGD"
        return None

    def _kind_error(self, what, group_keys, state_names):
        kind = self._guess_kind(group_keys, state_names)
        mine = type(self).__name__
        if kind is not None and mine not in kind.split("/"):
            return ValueError(f"optimizer state_dict holds {kind} state; the optimizer is "
                              f"{mine} ({what})")
        return ValueError(f"optimizer state_dict does not fit this {mine}: {what}")

    def _prepare_load(self, state_dict):
        """Check ``state_dict`` and build the new groups and state without changing
        anything; :meth:`_commit_load` installs them."""
        if not isinstance(state_dict, Mapping):
            raise TypeError("optimizer state_dict must be a dict with 'state' and "
                            f"'param_groups'; got {type(state_dict).__name__}")
        for key in ("state", "param_groups"):
            if key not in state_dict:
                raise KeyError(f"optimizer state_dict has no {key!r} entry")
        saved_state = state_dict["state"]
        if not isinstance(saved_state, Mapping):
            raise TypeError("optimizer state_dict['state'] must be a dict of parameter "
                            f"index to dict; got {type(saved_state).__name__}")
        saved_groups = state_dict["param_groups"]
        if isinstance(saved_groups, (str, bytes, Mapping)) or \
                not isinstance(saved_groups, Iterable):
            raise TypeError("optimizer state_dict['param_groups'] must be a list of dicts; "
                            f"got {type(saved_groups).__name__}")
        saved_groups = list(saved_groups)
        for i, saved in enumerate(saved_groups):
            if not isinstance(saved, Mapping) or "params" not in saved:
                raise TypeError(f"optimizer state_dict['param_groups'][{i}] must be a dict "
                                f"with a 'params' entry; got {type(saved).__name__}")
        all_group_keys = {k for saved in saved_groups for k in saved if k != "params"}
        all_state_names = {name for entries in saved_state.values()
                           if isinstance(entries, Mapping) for name in entries}
        # the kind first: its message is the useful one when everything else differs too
        foreign = all_state_names - set(self._state_names or all_state_names) - {
            "master_param"}
        if foreign:
            raise self._kind_error(f"per-parameter state {sorted(foreign)} is not "
                                   f"{type(self).__name__}'s", (), foreign)
        for i, saved in enumerate(saved_groups):
            lacking = [key for key in self.defaults if key not in saved]
            if lacking:
                raise self._kind_error(f"parameter group {i} lacks {lacking}",
                                       all_group_keys, all_state_names)
        if len(saved_groups) != len(self.param_groups):
            raise ValueError(f"loaded state has {len(saved_groups)} parameter groups; this "
                             f"optimizer has {len(self.param_groups)}")
        position = {}
        for i, (saved, group) in enumerate(zip(saved_groups, self.param_groups)):
            indices = saved["params"]
            if isinstance(indices, (str, bytes)) or not isinstance(indices, Iterable):
                raise TypeError(f"parameter group {i}'s 'params' must be a list of ints; got "
                                f"{type(indices).__name__}")
            indices = list(indices)
            if len(indices) != len(group["params"]):
                raise ValueError(f"parameter group {i} has {len(indices)} parameters "
                                 f"in the loaded state; this optimizer's has "
                                 f"{len(group['params'])}")
            for saved_index, param in zip(indices, group["params"]):
                saved_index = self._index(saved_index, f"parameter group {i}'s 'params'")
                if saved_index in position:
                    raise ValueError(f"parameter index {saved_index} appears more than once "
                                     "in the loaded parameter groups")
                position[saved_index] = param
        new_groups = []
        for saved, group in zip(saved_groups, self.param_groups):
            merged = {}
            for key, value in saved.items():
                if key == "params":
                    continue
                value = _copy_value(value)
                if isinstance(group.get(key), tuple) and isinstance(value, list):
                    value = tuple(value)  # betas after a JSON round trip
                merged[key] = value
            merged["params"] = group["params"]
            self._validate(merged)
            new_groups.append(merged)
        new_state = {}
        for saved_index, entries in saved_state.items():
            saved_index = self._index(saved_index, "a key of state_dict['state']")
            if saved_index not in position:
                raise ValueError(f"loaded state refers to parameter {saved_index}, which "
                                 "no parameter group lists")
            if not isinstance(entries, Mapping):
                raise TypeError(f"state of parameter {saved_index} must be a dict; got "
                                f"{type(entries).__name__}")
            param = position[saved_index]
            restored = {}
            for name, value in entries.items():
                where = f"state {name!r} of parameter {saved_index}"
                if name == "step":
                    value = self._step_count(value, where)
                elif _is_array(value) or hasattr(value, "detach"):
                    value = _to_array_like(value, param.data)
                    target = state_dtype(param.data)
                    if value.dtype.kind not in "biufc" or not np.can_cast(
                            value.dtype, target, casting="same_kind"):
                        raise TypeError(f"{where} has dtype {value.dtype}, which cannot be "
                                        f"cast to the parameter's {target}")
                    if value.shape != param.data.shape:
                        raise ValueError(f"{where} has shape {value.shape}; the parameter "
                                         f"has {param.data.shape}")
                    if value.dtype != target:
                        value = value.astype(target)
                elif value is None:
                    pass  # torch's SGD keeps momentum_buffer None without momentum
                else:
                    raise TypeError(f"{where} must be an array; got {_describe(value)}")
                restored[name] = value
            new_state[id(param)] = restored
        return new_groups, new_state

    @staticmethod
    def _index(value, where):
        if isinstance(value, str) and value.strip().lstrip("-").isdigit():
            value = int(value)   # a JSON object's key
        if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
            raise TypeError(f"{where}: parameter indices must be ints; got "
                            f"{_describe(value)}")
        return int(value)

    @staticmethod
    def _step_count(value, where):
        raw = value
        if hasattr(value, "detach"):
            value = value.detach().cpu().numpy()
        value = backend.to_numpy(value) if _is_array(value) else value
        if isinstance(value, np.ndarray):
            if value.size != 1:
                raise ValueError(f"{where} must be a number; got an array of shape "
                                 f"{value.shape}")
            value = value.reshape(()).item()
        if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
            raise TypeError(f"{where} must be a number; got {_describe(raw)}")
        if not math.isfinite(value) or value < 0 or value != int(value):
            raise ValueError(f"{where} must be a whole number >= 0; got {raw!r}")
        return int(value)

    def _commit_load(self, prepared):
        """Install what :meth:`_prepare_load` built (cannot fail)."""
        new_groups, new_state = prepared
        for group, merged in zip(self.param_groups, new_groups):
            group.clear()
            group.update(merged)
        self.state = new_state

    def __getstate__(self):
        # ``state`` is keyed by id(param), which a copy or an unpickled object does not
        # share: key it by position meanwhile.
        attributes = self.__dict__.copy()
        attributes["state"] = {i: self.state[id(p)] for i, p in enumerate(self._all_params())
                               if id(p) in self.state}
        return attributes

    def __setstate__(self, attributes):
        self.__dict__.update(attributes)
        params = self._all_params()
        self.state = {id(params[i]): entry for i, entry in attributes["state"].items()}

    def __repr__(self):
        lines = [f"{type(self).__name__} ("]
        for i, group in enumerate(self.param_groups):
            lines.append(f"Parameter Group {i}")
            lines.append(f"    params: {len(group['params'])} tensors")
            for key in sorted(k for k in group if k != "params"):
                lines.append(f"    {key}: {group[key]}")
        lines.append(")")
        return "\n".join(lines)


def _scalar(value, like):
    """``value`` as a scalar of ``like``'s dtype (keeps float32 arithmetic in float32)."""
    return like.dtype.type(value)


class SGD(Optimizer):
    r"""Stochastic gradient descent with optional momentum, as ``torch.optim.SGD``.

    With gradient :math:`g_t`, weight decay :math:`\lambda`, momentum :math:`\mu`,
    dampening :math:`\tau` and learning rate :math:`\gamma`:

    .. math::
        g_t &\leftarrow g_t + \lambda\,\theta_{t-1} \\
        b_t &\leftarrow g_t \text{ at the first step, else } \mu b_{t-1} + (1-\tau) g_t \\
        g_t &\leftarrow g_t + \mu b_t \text{ (Nesterov) or } b_t \text{ (otherwise)} \\
        \theta_t &\leftarrow \theta_{t-1} - \gamma g_t

    (the momentum lines only when :math:`\mu \ne 0`).

    Parameters
    ----------
    params : iterable of Tensor or of dict
        Parameters or parameter groups (see :class:`Optimizer`).
    lr : float
        Learning rate, >= 0.
    momentum : float, optional
        Momentum factor, >= 0.
    dampening : float, optional
        Dampening of the momentum's gradient term.
    weight_decay : float, optional
        L2 penalty coefficient added to the gradient, >= 0.
    nesterov : bool, optional
        Nesterov momentum; needs ``momentum > 0`` and ``dampening == 0``.

    Notes
    -----
    State per parameter: ``"momentum_buffer"`` (only when momentum is non-zero), and
    ``"master_param"`` for a float16 parameter (float32 master weights; the momentum
    buffer is float32 too).
    """

    _state_names = ("momentum_buffer",)

    def __init__(self, params, lr, momentum=0, dampening=0, weight_decay=0, nesterov=False):
        super().__init__(params, dict(lr=lr, momentum=momentum, dampening=dampening,
                                      weight_decay=weight_decay, nesterov=nesterov))

    def _validate(self, group):
        super()._validate(group)
        _check_real("momentum", group["momentum"], low=0.0)
        _check_real("dampening", group["dampening"], low=0.0)
        _check_real("weight_decay", group["weight_decay"], low=0.0)
        _check_bool("nesterov", group["nesterov"])
        group["nesterov"] = bool(group["nesterov"])
        if group["nesterov"] and (group["momentum"] <= 0 or group["dampening"] != 0):
            raise ValueError("Invalid nesterov=True: Nesterov momentum needs momentum > 0 "
                             f"and dampening == 0 (got momentum={group['momentum']}, "
                             f"dampening={group['dampening']})")

    def _update(self, p, grad, state, group):
        lr, momentum = group["lr"], group["momentum"]
        dampening, weight_decay = group["dampening"], group["weight_decay"]
        d_p = grad
        if weight_decay != 0:
            d_p = d_p + _scalar(weight_decay, p) * p
        if momentum != 0:
            buf = state.get("momentum_buffer")
            if buf is None:
                buf = state["momentum_buffer"] = d_p.copy()
            else:
                buf *= _scalar(momentum, p)
                buf += _scalar(1 - dampening, p) * d_p
            d_p = d_p + _scalar(momentum, p) * buf if group["nesterov"] else buf
        p -= _scalar(lr, p) * d_p


class Adam(Optimizer):
    r"""Adam (and AMSGrad), as ``torch.optim.Adam``.

    With gradient :math:`g_t` (plus :math:`\lambda\theta_{t-1}` when ``weight_decay``
    :math:`\lambda \ne 0`: L2 regularisation through the gradient):

    .. math::
        m_t &= \beta_1 m_{t-1} + (1-\beta_1) g_t, \qquad
        v_t = \beta_2 v_{t-1} + (1-\beta_2) g_t^2 \\
        \hat v_t &= v_t \text{, or with AMSGrad } \hat v_t = \max(\hat v_{t-1}, v_t) \\
        \theta_t &= \theta_{t-1} - \frac{\gamma}{1-\beta_1^t}\,
        \frac{m_t}{\sqrt{\hat v_t}/\sqrt{1-\beta_2^t} + \epsilon}

    AMSGrad keeps the running maximum of the *raw* second moment :math:`v_t` and applies
    the bias correction afterwards, as PyTorch's implementation does.

    Parameters
    ----------
    params : iterable of Tensor or of dict
        Parameters or parameter groups (see :class:`Optimizer`).
    lr : float, optional
        Learning rate :math:`\gamma`, >= 0.
    betas : (float, float), optional
        Decay rates of the first and second moments, each in [0, 1).
    eps : float, optional
        Added to the denominator, >= 0.
    weight_decay : float, optional
        L2 penalty coefficient, >= 0.
    amsgrad : bool, optional
        Use the AMSGrad variant.

    Notes
    -----
    State per parameter: ``"step"`` (int), ``"exp_avg"``, ``"exp_avg_sq"`` and, with
    AMSGrad, ``"max_exp_avg_sq"``. For a float16 parameter, ``"master_param"`` too
    (float32 master weights), and every moment is float32: ``eps`` = 1e-8 is below
    float16's smallest subnormal (6e-8), and squared gradients below 2.4e-4 would flush
    to zero in float16.
    """

    _decoupled = False
    _state_names = ("step", "exp_avg", "exp_avg_sq", "max_exp_avg_sq")

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0,
                 amsgrad=False):
        super().__init__(params, dict(lr=lr, betas=tuple(betas) if isinstance(
            betas, (list, tuple)) else betas, eps=eps, weight_decay=weight_decay,
            amsgrad=amsgrad))

    def _validate(self, group):
        super()._validate(group)
        betas = group["betas"]
        if not isinstance(betas, (tuple, list)):
            raise TypeError(f"Invalid betas: expected a pair of floats in [0, 1); got "
                            f"{_describe(betas)}")
        if len(betas) != 2:
            raise ValueError(f"Invalid betas: {betas!r} (expected a pair of floats)")
        _check_real("betas[0]", betas[0], low=0.0, high=1.0)
        _check_real("betas[1]", betas[1], low=0.0, high=1.0)
        _check_real("eps", group["eps"], low=0.0)
        _check_real("weight_decay", group["weight_decay"], low=0.0)
        _check_bool("amsgrad", group["amsgrad"])
        group["amsgrad"] = bool(group["amsgrad"])

    def _update(self, p, grad, state, group):
        xp = backend.array_namespace(p)
        lr, (beta1, beta2) = group["lr"], group["betas"]
        eps, weight_decay = group["eps"], group["weight_decay"]
        if not state.keys() - {"master_param"}:    # new (a float16 master copy aside)
            state["step"] = 0
            state["exp_avg"] = xp.zeros_like(p)
            state["exp_avg_sq"] = xp.zeros_like(p)
            if group["amsgrad"]:
                state["max_exp_avg_sq"] = xp.zeros_like(p)
        elif group["amsgrad"] and "max_exp_avg_sq" not in state:
            state["max_exp_avg_sq"] = xp.zeros_like(p)
        state["step"] += 1
        step = state["step"]
        if weight_decay != 0:
            if self._decoupled:
                p *= _scalar(1 - lr * weight_decay, p)
            else:
                grad = grad + _scalar(weight_decay, p) * p
        exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
        exp_avg *= _scalar(beta1, p)
        exp_avg += _scalar(1 - beta1, p) * grad
        exp_avg_sq *= _scalar(beta2, p)
        exp_avg_sq += _scalar(1 - beta2, p) * (grad * grad)
        second = exp_avg_sq
        if group["amsgrad"]:
            second = xp.maximum(state["max_exp_avg_sq"], exp_avg_sq,
                                out=state["max_exp_avg_sq"])
        step_size = lr / (1 - beta1 ** step)
        denom = xp.sqrt(second)
        denom /= _scalar(math.sqrt(1 - beta2 ** step), p)
        denom += _scalar(eps, p)
        p -= _scalar(step_size, p) * (exp_avg / denom)


class AdamW(Adam):
    r"""Adam with decoupled weight decay, as ``torch.optim.AdamW``.

    Before the Adam update (with no L2 term in the gradient) the parameter decays:
    :math:`\theta \leftarrow \theta (1 - \gamma\lambda)`.

    Parameters
    ----------
    params : iterable of Tensor or of dict
        Parameters or parameter groups (see :class:`Optimizer`).
    lr : float, optional
        Learning rate :math:`\gamma`, >= 0.
    betas : (float, float), optional
        Decay rates of the first and second moments, each in [0, 1).
    eps : float, optional
        Added to the denominator, >= 0.
    weight_decay : float, optional
        Decoupled decay coefficient :math:`\lambda`, >= 0 (default 0.01).
    amsgrad : bool, optional
        Use the AMSGrad variant.
    """

    _decoupled = True

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2,
                 amsgrad=False):
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                         amsgrad=amsgrad)


# -- learning-rate schedules ----------------------------------------------------------------
def _check_optimizer(optimizer):
    if not isinstance(optimizer, Optimizer):
        raise TypeError("Invalid optimizer: expected a sparsegrid.nn.optim.Optimizer; got "
                        f"{type(optimizer).__name__}")


class LRScheduler:
    """Base class of learning-rate schedules (``torch.optim.lr_scheduler.LRScheduler``).

    Every schedule here is a closed form ``lr = f(base_lr, last_epoch)`` per group.
    Construction (with ``last_epoch=-1``) stores each group's current ``"lr"`` as
    ``"initial_lr"`` (kept if already there), then makes the first step: ``last_epoch``
    becomes 0 and epoch 0's rate is applied. Call :meth:`step` once per epoch, after that
    epoch's optimizer steps: after ``n`` calls ``last_epoch == n``.

    Parameters
    ----------
    optimizer : Optimizer
        Whose groups' ``"lr"`` this schedule sets.
    last_epoch : int, optional
        -1 for a new schedule. To resume, pass the last finished epoch: every group must
        then already hold ``"initial_lr"`` (as in PyTorch), and the rate for
        ``last_epoch + 1`` is applied.

    Attributes
    ----------
    base_lrs : list of float
        Each group's ``"initial_lr"``.
    last_epoch : int
        Number of :meth:`step` calls since epoch 0.
    """

    def __init__(self, optimizer, last_epoch=-1):
        _check_optimizer(optimizer)
        _check_int("last_epoch", last_epoch, -1)
        self.optimizer = optimizer
        if last_epoch == -1:
            for group in optimizer.param_groups:
                group.setdefault("initial_lr", group["lr"])
        else:
            for i, group in enumerate(optimizer.param_groups):
                if "initial_lr" not in group:
                    raise KeyError(f"param 'initial_lr' is not specified in param_groups[{i}] "
                                   "when resuming a schedule (last_epoch != -1)")
        self.base_lrs = [group["initial_lr"] for group in optimizer.param_groups]
        self.last_epoch = int(last_epoch)
        self._last_lr = []
        self.step()

    def get_lr(self):
        """The learning rate of every group at epoch ``last_epoch``."""
        return [self._closed_form(base_lr, i) for i, base_lr in enumerate(self.base_lrs)]

    def _closed_form(self, base_lr, group_index):
        raise NotImplementedError

    def step(self, epoch=None):
        """Advance one epoch (or jump to ``epoch``) and set every group's ``"lr"``.

        Parameters
        ----------
        epoch : int, optional
            Set ``last_epoch`` to this value instead of adding one (the schedules are
            closed forms, so any epoch is well defined).
        """
        self.last_epoch = self.last_epoch + 1 if epoch is None else int(epoch)
        lrs = self.get_lr()
        for group, lr in zip(self.optimizer.param_groups, lrs):
            group["lr"] = lr
        self._last_lr = [group["lr"] for group in self.optimizer.param_groups]

    def get_last_lr(self):
        """The learning rates the last :meth:`step` (or construction) set, one per group."""
        return list(self._last_lr)

    _skip_in_state = ("optimizer",)

    def state_dict(self):
        """Every attribute but the optimizer (and, for :class:`LambdaLR`, the functions):
        ``last_epoch``, ``base_lrs``, ``_last_lr`` and the schedule's parameters."""
        return {key: _copy_value(value) for key, value in self.__dict__.items()
                if key not in self._skip_in_state}

    # What a torch schedule's state dict holds besides ours: accepted and ignored.
    _torch_bookkeeping = ("_step_count", "verbose", "_get_lr_called_within_step",
                          "_is_initial")

    def load_state_dict(self, state_dict):
        """Restore attributes saved by :meth:`state_dict` (does not touch the optimizer's
        ``"lr"``: the optimizer's own state dict carries it).

        All or nothing: every entry is checked first (the schedule's own keys must all be
        there and no foreign one may be, which tells a StepLR's state from an
        ExponentialLR's; values are checked as the constructor checks them).
        """
        self._commit_load(self._prepare_load(state_dict))

    def _prepare_load(self, state_dict):
        mine = type(self).__name__
        if not isinstance(state_dict, Mapping):
            raise TypeError(f"{mine}.load_state_dict: expected a dict; got "
                            f"{type(state_dict).__name__}")
        own = set(self.state_dict())
        given = {k for k in state_dict if k not in self._skip_in_state
                 and k not in self._torch_bookkeeping}
        if own != given:
            raise ValueError(f"schedule state_dict does not fit this {mine}: missing "
                             f"{sorted(own - given)}, unexpected {sorted(given - own)} "
                             "(state of another kind of schedule?)")
        values = {key: _copy_value(state_dict[key]) for key in own}
        _check_int("last_epoch", values["last_epoch"], -1)
        n = len(self.optimizer.param_groups)
        for key in ("base_lrs", "_last_lr"):
            rates = values[key]
            if not isinstance(rates, (list, tuple)) or len(rates) != n:
                raise ValueError(f"schedule state {key!r} must be a list of {n} rates (one "
                                 f"per parameter group); got {rates!r}")
            for i, rate in enumerate(rates):
                _check_real(f"{key}[{i}]", rate, low=0.0)
            values[key] = list(rates)
        self._check_params(values)
        values["last_epoch"] = int(values["last_epoch"])
        return values

    def _check_params(self, values):
        """Check the schedule's own parameters in a state dict (subclasses extend)."""

    def _commit_load(self, values):
        self.__dict__.update(values)

    def __repr__(self):
        params = ", ".join(f"{k}={v!r}" for k, v in self.__dict__.items()
                           if k not in ("optimizer", "base_lrs", "_last_lr", "lr_lambdas"))
        return f"{type(self).__name__}({params}, last_lr={self._last_lr})"


class LambdaLR(LRScheduler):
    """``lr = initial_lr * lr_lambda(last_epoch)``.

    Parameters
    ----------
    optimizer : Optimizer
    lr_lambda : callable or list of callables
        A function of the epoch (int) returning a factor, or one function per group.
    last_epoch : int, optional
        See :class:`LRScheduler`.

    Notes
    -----
    The functions are not part of :meth:`state_dict`; the restored schedule uses the
    ones it was constructed with.
    """

    _skip_in_state = ("optimizer", "lr_lambdas")

    def __init__(self, optimizer, lr_lambda, last_epoch=-1):
        _check_optimizer(optimizer)
        n = len(optimizer.param_groups)
        if isinstance(lr_lambda, (list, tuple)):
            if len(lr_lambda) != n:
                raise ValueError(f"Invalid lr_lambda: expected {n} functions (one per group), "
                                 f"got {len(lr_lambda)}")
            self.lr_lambdas = list(lr_lambda)
        else:
            self.lr_lambdas = [lr_lambda] * n
        for fn in self.lr_lambdas:
            if not callable(fn):
                raise TypeError(f"Invalid lr_lambda: {fn!r} is not callable")
        super().__init__(optimizer, last_epoch)

    def _closed_form(self, base_lr, group_index):
        return base_lr * self.lr_lambdas[group_index](self.last_epoch)


class StepLR(LRScheduler):
    """``lr = initial_lr * gamma ** (last_epoch // step_size)``.

    Parameters
    ----------
    optimizer : Optimizer
    step_size : int
        Epochs between decays, >= 1.
    gamma : float, optional
        Multiplicative decay factor.
    last_epoch : int, optional
        See :class:`LRScheduler`.
    """

    def __init__(self, optimizer, step_size, gamma=0.1, last_epoch=-1):
        _check_optimizer(optimizer)
        self._check_params(dict(step_size=step_size, gamma=gamma))
        self.step_size = int(step_size)
        self.gamma = gamma
        super().__init__(optimizer, last_epoch)

    def _check_params(self, values):
        _check_int("step_size", values["step_size"], 1)
        _check_real("gamma", values["gamma"], low=0.0)
        values["step_size"] = int(values["step_size"])

    def _closed_form(self, base_lr, group_index):
        return base_lr * self.gamma ** (self.last_epoch // self.step_size)


class MultiStepLR(LRScheduler):
    """``lr = initial_lr * gamma ** (number of milestones <= last_epoch)``.

    Parameters
    ----------
    optimizer : Optimizer
    milestones : iterable of int
        Epochs at which the rate is multiplied by ``gamma`` (a repeated milestone
        multiplies once per repetition, as in PyTorch).
    gamma : float, optional
        Multiplicative decay factor.
    last_epoch : int, optional
        See :class:`LRScheduler`.
    """

    def __init__(self, optimizer, milestones, gamma=0.1, last_epoch=-1):
        _check_optimizer(optimizer)
        values = dict(milestones=milestones, gamma=gamma)
        self._check_params(values)
        self.milestones = values["milestones"]
        self.gamma = gamma
        super().__init__(optimizer, last_epoch)

    def _check_params(self, values):
        milestones = values["milestones"]
        if isinstance(milestones, Mapping):   # torch keeps a Counter {milestone: count}
            for count in milestones.values():
                _check_int("milestones count", count, 0)
            milestones = [m for m, count in milestones.items() for _ in range(int(count))]
        if isinstance(milestones, (str, bytes)) or not isinstance(milestones, Iterable) \
                or isinstance(milestones, (np.ndarray, Tensor)) and milestones.ndim != 1:
            raise TypeError("Invalid milestones: expected an iterable of ints >= 0; got "
                            f"{_describe(milestones)}")
        milestones = list(milestones)
        for m in milestones:
            if isinstance(m, (bool, np.bool_)) or not isinstance(m, numbers.Integral):
                raise TypeError(f"Invalid milestones: {m!r} is not an int (expected an "
                                f"iterable of ints >= 0; got {milestones!r})")
            if m < 0:
                raise ValueError(f"Invalid milestones: {m!r} is negative (expected ints "
                                 f">= 0; got {milestones!r})")
        _check_real("gamma", values["gamma"], low=0.0)
        values["milestones"] = sorted(int(m) for m in milestones)

    def _closed_form(self, base_lr, group_index):
        return base_lr * self.gamma ** bisect.bisect_right(self.milestones, self.last_epoch)


class ExponentialLR(LRScheduler):
    """``lr = initial_lr * gamma ** last_epoch``.

    Parameters
    ----------
    optimizer : Optimizer
    gamma : float
        Multiplicative decay factor per epoch.
    last_epoch : int, optional
        See :class:`LRScheduler`.
    """

    def __init__(self, optimizer, gamma, last_epoch=-1):
        _check_optimizer(optimizer)
        self._check_params(dict(gamma=gamma))
        self.gamma = gamma
        super().__init__(optimizer, last_epoch)

    def _check_params(self, values):
        _check_real("gamma", values["gamma"], low=0.0)

    def _closed_form(self, base_lr, group_index):
        return base_lr * self.gamma ** self.last_epoch


class CosineAnnealingLR(LRScheduler):
    r"""Cosine annealing (closed form, without restarts):

    ``lr = eta_min + (initial_lr - eta_min) * (1 + cos(pi * last_epoch / T_max)) / 2``.

    PyTorch computes the same curve recursively from the previous rate; the two agree to
    rounding while nobody else changes the rate. Past ``T_max`` the curve rises again
    (period ``2 * T_max``), as PyTorch's does.

    Parameters
    ----------
    optimizer : Optimizer
    T_max : int
        Epochs from ``initial_lr`` down to ``eta_min``, >= 1.
    eta_min : float, optional
        Minimum rate.
    last_epoch : int, optional
        See :class:`LRScheduler`.
    """

    def __init__(self, optimizer, T_max, eta_min=0, last_epoch=-1):  # noqa: N803 - torch's name
        _check_optimizer(optimizer)
        self._check_params(dict(T_max=T_max, eta_min=eta_min))
        self.T_max = int(T_max)
        self.eta_min = eta_min
        super().__init__(optimizer, last_epoch)

    def _check_params(self, values):
        _check_int("T_max", values["T_max"], 1)
        _check_real("eta_min", values["eta_min"], low=0.0)
        values["T_max"] = int(values["T_max"])

    def _closed_form(self, base_lr, group_index):
        return self.eta_min + (base_lr - self.eta_min) * (
            1 + math.cos(math.pi * self.last_epoch / self.T_max)) / 2


class ExponentialDecayLR(LRScheduler):
    """SparseConvNet's schedule: ``lr = initial_lr * exp((1 - epoch) * decay)``.

    SparseConvNet (``ClassificationTrainValidate``) numbers epochs from 1 and sets this
    rate at the start of epoch ``epoch = 1, 2, ...``. Here the epoch in effect is
    ``epoch = last_epoch + 1``:

    * right after construction (``last_epoch == 0``) the rate is epoch 1's, ``initial_lr``;
    * after ``n`` calls of :meth:`step` (``last_epoch == n``) it is epoch ``n + 1``'s,
      ``initial_lr * exp(-n * decay)``.

    So train epoch 1, call ``step()``, train epoch 2, call ``step()``, ... exactly as
    SparseConvNet's loop does. (Equivalently: ``ExponentialLR`` with
    ``gamma = exp(-decay)``.)

    Parameters
    ----------
    optimizer : Optimizer
    decay : float
        SparseConvNet's ``lr_decay``, >= 0 for a decaying rate.
    last_epoch : int, optional
        See :class:`LRScheduler`; to resume before SparseConvNet epoch ``e``, pass
        ``last_epoch = e - 2`` (the rate applied is then epoch ``e``'s).
    """

    def __init__(self, optimizer, decay, last_epoch=-1):
        _check_optimizer(optimizer)
        self._check_params(dict(decay=decay))
        self.decay = decay
        super().__init__(optimizer, last_epoch)

    def _check_params(self, values):
        _check_real("decay", values["decay"])

    @property
    def epoch(self):
        """SparseConvNet's 1-based number of the epoch whose rate is in effect."""
        return self.last_epoch + 1

    def _closed_form(self, base_lr, group_index):
        return base_lr * math.exp((1 - self.epoch) * self.decay)
