"""Loss scaling for float16 training: :class:`GradScaler`, with ``torch.cuda.amp``'s API.

float16 gradients below 6e-8 flush to zero and those below 6e-5 lose precision, and the
gradients of a network's early layers are often that small. The scaler multiplies the loss
by a large factor before ``backward()`` (so every gradient is that much larger in float16),
divides the gradients by it again -- in float32 -- before the optimizer steps, and adapts
the factor: when a gradient overflowed (inf or NaN), the step is skipped, a
:class:`SkippedStepWarning` says so, and the scale is halved; after ``growth_interval``
steps without overflow it doubles. The usual loop::

    scaler = scn.GradScaler()
    for inputs, labels in batches:
        optimizer.zero_grad()
        loss = loss_fn(model(inputs).float(), labels)
        scaler.scale(loss).backward()
        scaler.step(optimizer)          # unscales, checks, steps (or skips)
        scaler.update()

The optimizers of :mod:`sparsegrid.nn.optim` keep float32 master weights for float16
parameters, so small updates are not lost either (docs/mixed_precision.md).
"""

from __future__ import annotations

import math
import numbers
import warnings
from collections.abc import Mapping

import numpy as np

from .. import backend
from ..autodiff import ops
from ..autodiff.core import Tensor

__all__ = ["GradScaler", "SkippedStepWarning"]

_FLOAT32_MAX = float(np.finfo(np.float32).max)


class SkippedStepWarning(UserWarning):
    """:meth:`GradScaler.step` skipped an optimizer step: a gradient was inf or NaN."""


def _positive(name, value, low=0.0, high=None, high_open=True):
    """``value`` as a float in ``(low, high)``; TypeError / ValueError naming ``name``."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise TypeError(f"GradScaler: {name} must be a real number; got "
                        f"{type(value).__name__} {value!r}")
    number = float(value)
    bad = not math.isfinite(number) or number <= low or (
        high is not None and (number >= high if high_open else number > high))
    if bad:
        where = f"> {low}" if high is None else f"in ({low}, {high}{')' if high_open else ']'}"
        raise ValueError(f"GradScaler: {name} must be a finite number {where}; got {value!r}")
    return number


def _interval(value):
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
        raise TypeError(f"GradScaler: growth_interval must be an int >= 1; got "
                        f"{type(value).__name__} {value!r}")
    if value < 1:
        raise ValueError(f"GradScaler: growth_interval must be an int >= 1; got {value!r}")
    return int(value)


def _all_finite(arrays):
    """Whether every value of every array is finite, with one host read per device."""
    flags = {}
    for array in arrays:
        xp = backend.array_namespace(array)
        flags.setdefault((backend.device_of(array), xp), []).append(xp.isfinite(array).all())
    for (_, xp), found in flags.items():
        if not bool(xp.stack(found).all()):
            return False
    return True


class GradScaler:
    """Dynamic loss scaling (``torch.cuda.amp.GradScaler``'s API and update rule).

    Parameters
    ----------
    init_scale : float
        The first scale, > 0 (default 2**16).
    growth_factor : float
        Multiplies the scale after ``growth_interval`` steps without inf/NaN, > 1.
    backoff_factor : float
        Multiplies the scale after a step with inf/NaN gradients, in (0, 1).
    growth_interval : int
        Consecutive good steps before the scale grows, >= 1.
    enabled : bool
        False makes every method a pass-through (``scale`` returns the loss, ``step``
        calls ``optimizer.step()``), so one loop serves float32 and float16.

    Attributes
    ----------
    skipped_steps : int
        How many optimizer steps :meth:`step` has skipped so far.

    Raises
    ------
    TypeError, ValueError
        For a hyper-parameter of the wrong type or out of range, naming it.

    Notes
    -----
    After :meth:`unscale_` (and so after :meth:`step`), the gradients of float16
    parameters are float32 arrays: unscaling in float16 would flush the small gradients
    loss scaling exists to keep. The optimizers take them as they are (master weights).
    The scale grows only while it stays a finite float32.
    """

    def __init__(self, init_scale=2.0 ** 16, growth_factor=2.0, backoff_factor=0.5,
                 growth_interval=2000, enabled=True):
        if not isinstance(enabled, (bool, np.bool_)):
            raise TypeError(f"GradScaler: enabled must be a bool; got "
                            f"{type(enabled).__name__} {enabled!r}")
        self._enabled = bool(enabled)
        self._scale = _positive("init_scale", init_scale)
        self._growth_factor = _positive("growth_factor", growth_factor, low=1.0)
        self._backoff_factor = _positive("backoff_factor", backoff_factor, high=1.0)
        self._growth_interval = _interval(growth_interval)
        self._growth_tracker = 0
        self._per_optimizer = {}        # id(optimizer) -> this iteration's record
        self.skipped_steps = 0

    # -- queries ------------------------------------------------------------------------------
    def is_enabled(self):
        """Whether the scaler scales (``enabled``)."""
        return self._enabled

    def get_scale(self):
        """The current scale as a Python float (1.0 when disabled)."""
        return self._scale if self._enabled else 1.0

    def get_growth_factor(self):
        return self._growth_factor

    def get_backoff_factor(self):
        return self._backoff_factor

    def get_growth_interval(self):
        return self._growth_interval

    # -- the loop -----------------------------------------------------------------------------
    def scale(self, outputs):
        """``outputs`` times the scale: a Tensor (differentiable), an array, or a list /
        tuple of them. A float16 loss is cast to float32 first, which keeps the scaled
        value finite but not its backward pass: the gradient reaching the float16 loss
        is the scale itself, 65536 by default, above float16's 65504, so every step
        would be skipped. Compute the loss in float32 (``logits.float()``), as with
        torch. float32 and float64 keep their dtype. Disabled: ``outputs`` as given.

        Raises
        ------
        TypeError
            For anything that is not a floating Tensor or array (or a list / tuple of them).
        """
        if not self._enabled:
            return outputs
        if isinstance(outputs, (list, tuple)):
            return type(outputs)(self.scale(value) for value in outputs)
        data = outputs.data if isinstance(outputs, Tensor) else outputs
        if not hasattr(data, "dtype") or data.dtype.kind != "f":
            raise TypeError(f"GradScaler.scale: outputs must be a floating Tensor or array "
                            f"(the loss), or a list / tuple of them; got "
                            f"{type(outputs).__name__}"
                            + (f" of dtype {data.dtype}" if hasattr(data, "dtype") else ""))
        if data.dtype == np.float16:
            outputs = ops.cast(outputs, np.float32)
        return ops.mul(outputs, self._scale)   # a Python float: the loss keeps its dtype

    def _record(self, optimizer):
        from .optim import Optimizer
        if not isinstance(optimizer, Optimizer):
            raise TypeError(f"GradScaler: optimizer must be a sparsegrid.nn.optim Optimizer; "
                            f"got {type(optimizer).__name__}")
        return self._per_optimizer.setdefault(
            id(optimizer), {"unscaled": False, "stepped": False, "found_inf": False})

    def unscale_(self, optimizer):
        """Divide the gradients of ``optimizer``'s parameters by the scale (in place of
        ``param.grad``; float16 gradients become float32) and record whether any is inf
        or NaN. Call it before clipping gradients; :meth:`step` calls it otherwise.

        Raises
        ------
        RuntimeError
            When called twice for one optimizer before :meth:`update`, or after
            :meth:`step` (torch's rules).
        TypeError
            When ``optimizer`` is not a :mod:`sparsegrid.nn.optim` optimizer.
        """
        if not self._enabled:
            return
        record = self._record(optimizer)
        if record["unscaled"]:
            raise RuntimeError("GradScaler.unscale_() has already been called on this "
                               "optimizer since the last update()")
        if record["stepped"]:
            raise RuntimeError("GradScaler.unscale_() is being called after step()")
        inverse = 1.0 / self._scale
        unscaled = []
        for group in optimizer.param_groups:
            for param in group["params"]:
                if param.grad is None:
                    continue
                grad = param.grad.data if isinstance(param.grad, Tensor) else param.grad
                if grad.dtype == np.float16:
                    grad = grad.astype(np.float32)
                param.grad = grad * grad.dtype.type(inverse)
                unscaled.append(param.grad)
        record["found_inf"] = not _all_finite(unscaled)
        record["unscaled"] = True
        record["checked"] = len(unscaled)

    def step(self, optimizer, *args, **kwargs):
        """Unscale (unless :meth:`unscale_` already did) and call ``optimizer.step()`` --
        or skip it when a gradient is inf or NaN, with a :class:`SkippedStepWarning`
        naming the scale and the one :meth:`update` will set. Returns what
        ``optimizer.step`` returns (None when skipped). Disabled: ``optimizer.step()``.

        Raises
        ------
        RuntimeError
            For a closure (the gradients it computes would not be scaled), a second
            ``step`` for one optimizer before :meth:`update`, or an optimizer none of
            whose parameters has a gradient (torch's rule).
        """
        if not self._enabled:
            return optimizer.step(*args, **kwargs)
        if "closure" in kwargs or args:
            raise RuntimeError("GradScaler.step: closures are not supported (their "
                               "gradients would not be scaled); call backward() on "
                               "scaler.scale(loss) first")
        record = self._record(optimizer)
        if record["stepped"]:
            raise RuntimeError("GradScaler.step() has already been called for this optimizer "
                               "since the last update()")
        if not record["unscaled"]:
            self.unscale_(optimizer)
        if not record.get("checked"):
            raise RuntimeError("GradScaler.step: no inf checks were recorded for this "
                               "optimizer: none of its parameters has a gradient (call "
                               "backward() on scaler.scale(loss) first)")
        record["stepped"] = True
        if record["found_inf"]:
            self.skipped_steps += 1
            warnings.warn(f"GradScaler skipped the optimizer step: a gradient was inf or NaN "
                          f"at loss scale {self._scale:g}; update() lowers the scale to "
                          f"{self._scale * self._backoff_factor:g} (skipped steps so far: "
                          f"{self.skipped_steps})", SkippedStepWarning, stacklevel=2)
            return None
        return optimizer.step()

    def update(self, new_scale=None):
        """Adapt the scale after this iteration's steps: times ``backoff_factor`` when any
        unscaled gradient was inf or NaN (the growth count restarts), else one more good
        step, and times ``growth_factor`` after ``growth_interval`` of them. ``new_scale``
        (a positive finite number) sets the scale instead. Disabled: nothing.

        Raises
        ------
        RuntimeError
            When no optimizer was unscaled or stepped since the last update (there is
            nothing to decide from), unless ``new_scale`` is given.
        TypeError, ValueError
            For a ``new_scale`` that is not a positive finite number.
        """
        if not self._enabled:
            return
        if new_scale is not None:
            if isinstance(new_scale, Tensor) or hasattr(new_scale, "shape"):
                new_scale = backend.to_numpy(getattr(new_scale, "data", new_scale))
                new_scale = new_scale.reshape(-1)[0].item() if new_scale.size == 1 else \
                    new_scale
            self._scale = _positive("new_scale", new_scale)
        else:
            checked = [r for r in self._per_optimizer.values() if r["unscaled"]]
            if not checked:
                raise RuntimeError("GradScaler.update(): no inf checks were recorded since "
                                   "the last update (call scaler.step(optimizer) first)")
            if any(r["found_inf"] for r in checked):
                self._scale *= self._backoff_factor
                self._growth_tracker = 0
            else:
                self._growth_tracker += 1
                if self._growth_tracker == self._growth_interval:
                    grown = self._scale * self._growth_factor
                    if grown <= _FLOAT32_MAX:
                        self._scale = grown
                    self._growth_tracker = 0
        self._per_optimizer = {}

    # -- state --------------------------------------------------------------------------------
    def state_dict(self):
        """``{"scale", "growth_factor", "backoff_factor", "growth_interval",
        "_growth_tracker"}`` (torch's keys; plain numbers), empty when disabled."""
        if not self._enabled:
            return {}
        return {"scale": self._scale, "growth_factor": self._growth_factor,
                "backoff_factor": self._backoff_factor,
                "growth_interval": self._growth_interval,
                "_growth_tracker": self._growth_tracker}

    def load_state_dict(self, state_dict):
        """Restore what :meth:`state_dict` saved (torch's too). All or nothing: every
        value is checked before any is assigned.

        Raises
        ------
        RuntimeError
            For an empty state (saved from a disabled scaler) loaded into an enabled one.
        KeyError
            For a missing key; TypeError / ValueError for a value out of range.
        """
        if not self._enabled:
            return
        if not isinstance(state_dict, Mapping):
            raise TypeError(f"GradScaler.load_state_dict: state_dict must be a dict; got "
                            f"{type(state_dict).__name__}")
        if not state_dict:
            raise RuntimeError("GradScaler.load_state_dict: the state dict is empty, possibly "
                               "because it was saved from a disabled GradScaler")
        missing = [key for key in ("scale", "growth_factor", "backoff_factor",
                                   "growth_interval", "_growth_tracker")
                   if key not in state_dict]
        if missing:
            raise KeyError(f"GradScaler.load_state_dict: missing keys {missing}")
        scale = state_dict["scale"]
        if hasattr(scale, "shape") or isinstance(scale, Tensor):   # torch saves a tensor
            scale = backend.to_numpy(getattr(scale, "data", scale)).reshape(-1)[0].item()
        values = dict(
            scale=_positive("scale", scale),
            growth_factor=_positive("growth_factor", state_dict["growth_factor"], low=1.0),
            backoff_factor=_positive("backoff_factor", state_dict["backoff_factor"],
                                     high=1.0),
            growth_interval=_interval(state_dict["growth_interval"]))
        tracker = state_dict["_growth_tracker"]
        if hasattr(tracker, "shape"):
            tracker = backend.to_numpy(tracker).reshape(-1)[0].item()
        if isinstance(tracker, (bool, np.bool_)) or not isinstance(tracker, numbers.Integral) \
                or not 0 <= tracker < values["growth_interval"]:
            raise ValueError(f"GradScaler.load_state_dict: _growth_tracker must be an int in "
                             f"[0, growth_interval = {values['growth_interval']}); got "
                             f"{tracker!r}")
        self._scale = values["scale"]
        self._growth_factor = values["growth_factor"]
        self._backoff_factor = values["backoff_factor"]
        self._growth_interval = values["growth_interval"]
        self._growth_tracker = int(tracker)

    def __repr__(self):
        return (f"GradScaler(scale={self.get_scale():g}, growth_factor={self._growth_factor}, "
                f"backoff_factor={self._backoff_factor}, "
                f"growth_interval={self._growth_interval}, enabled={self._enabled})")
