"""The Module forms of :mod:`sparsegrid.nn.functional`'s losses, as ``torch.nn``'s.

``nn.CrossEntropyLoss(weight=w, ignore_index=-100)(logits, labels)`` is
``functional.cross_entropy(logits, labels, weight=w, ignore_index=-100)``. Constructors
take torch's arguments in torch's order and check them when the loss is built; ``weight``
and ``pos_weight`` are buffers (in ``state_dict`` under torch's names, moved by
``.to`` / ``.cuda()`` / ``.cpu()``, converted by ``.float()`` / ``.double()``), so
``criterion.cuda()`` and ``criterion.forward(x, y)`` work as in SCN's scripts.
"""

from __future__ import annotations

from . import functional as F
from .module import Module

__all__ = ["BCELoss", "BCEWithLogitsLoss", "CrossEntropyLoss", "L1Loss", "MSELoss",
           "NLLLoss", "SmoothL1Loss"]


def _buffer(value, name):
    """None, or the floating array inside ``value`` (a Tensor, an array, an array-like)."""
    if value is None:
        return None
    _, data = F._operand(value, name)
    return data


class _Loss(Module):
    """A loss module: holds its reduction (checked here) and calls the functional form."""

    _init_frames = 1      # constructors between the caller and _Loss.__init__ (warnings)

    def __init__(self, size_average=None, reduce=None, reduction="mean"):
        Module.__init__(self)
        self.reduction = F._reduction(reduction, size_average, reduce,
                                      stacklevel=3 + self._init_frames)


class _WeightedLoss(_Loss):
    _init_frames = 2

    def __init__(self, weight=None, size_average=None, reduce=None, reduction="mean"):
        super().__init__(size_average, reduce, reduction)
        self.register_buffer("weight", _buffer(weight, "weight"))


class CrossEntropyLoss(_WeightedLoss):
    """``torch.nn.CrossEntropyLoss``: :func:`~sparsegrid.nn.functional.cross_entropy` of
    scores against class indices or class probabilities.

    Parameters
    ----------
    weight : array or Tensor (C,), optional
        Per-class weight (a buffer: ``state_dict()['weight']``).
    size_average, reduce : bool, optional
        torch's deprecated flags (override ``reduction`` with a warning).
    ignore_index : int
        Targets equal to it are left out of the loss and of the mean's denominator.
    reduction : {'mean', 'sum', 'none'}
    label_smoothing : float in [0, 1]

    ``forward(input, target)``: input (N, C), (N, C, d1, ...) or (C,); see
    :func:`~sparsegrid.nn.functional.cross_entropy` for the shapes, the formula and the
    errors (arguments are checked here, at construction, as well).
    """

    def __init__(self, weight=None, size_average=None, ignore_index=-100, reduce=None,
                 reduction="mean", label_smoothing=0.0):
        super().__init__(weight, size_average, reduce, reduction)
        self.ignore_index = F._ignore_index(ignore_index)
        self.label_smoothing = F._real(label_smoothing, "label_smoothing", 0.0, 1.0)

    def forward(self, input, target):
        return F.cross_entropy(input, target, weight=self.weight,
                               ignore_index=self.ignore_index, reduction=self.reduction,
                               label_smoothing=self.label_smoothing)


class NLLLoss(_WeightedLoss):
    """``torch.nn.NLLLoss``: :func:`~sparsegrid.nn.functional.nll_loss` of
    log-probabilities against class indices (``weight``, ``ignore_index``, ``reduction``
    as in :class:`CrossEntropyLoss`)."""

    def __init__(self, weight=None, size_average=None, ignore_index=-100, reduce=None,
                 reduction="mean"):
        super().__init__(weight, size_average, reduce, reduction)
        self.ignore_index = F._ignore_index(ignore_index)

    def forward(self, input, target):
        return F.nll_loss(input, target, weight=self.weight, ignore_index=self.ignore_index,
                          reduction=self.reduction)


class BCELoss(_WeightedLoss):
    """``torch.nn.BCELoss``: :func:`~sparsegrid.nn.functional.binary_cross_entropy` of
    probabilities; ``weight`` (a buffer) broadcasts to the input's shape."""

    def __init__(self, weight=None, size_average=None, reduce=None, reduction="mean"):
        super().__init__(weight, size_average, reduce, reduction)

    def forward(self, input, target):
        return F.binary_cross_entropy(input, target, weight=self.weight,
                                      reduction=self.reduction)


class BCEWithLogitsLoss(_Loss):
    """``torch.nn.BCEWithLogitsLoss``:
    :func:`~sparsegrid.nn.functional.binary_cross_entropy_with_logits` of scores;
    ``weight`` and ``pos_weight`` are buffers that broadcast to the input's shape."""

    def __init__(self, weight=None, size_average=None, reduce=None, reduction="mean",
                 pos_weight=None):
        super().__init__(size_average, reduce, reduction)
        self.register_buffer("weight", _buffer(weight, "weight"))
        self.register_buffer("pos_weight", _buffer(pos_weight, "pos_weight"))

    def forward(self, input, target):
        return F.binary_cross_entropy_with_logits(input, target, weight=self.weight,
                                                  reduction=self.reduction,
                                                  pos_weight=self.pos_weight)


class MSELoss(_Loss):
    """``torch.nn.MSELoss``: :func:`~sparsegrid.nn.functional.mse_loss` (same shapes)."""

    def __init__(self, size_average=None, reduce=None, reduction="mean"):
        super().__init__(size_average, reduce, reduction)

    def forward(self, input, target):
        return F.mse_loss(input, target, reduction=self.reduction)


class L1Loss(_Loss):
    """``torch.nn.L1Loss``: :func:`~sparsegrid.nn.functional.l1_loss` (same shapes)."""

    def __init__(self, size_average=None, reduce=None, reduction="mean"):
        super().__init__(size_average, reduce, reduction)

    def forward(self, input, target):
        return F.l1_loss(input, target, reduction=self.reduction)


class SmoothL1Loss(_Loss):
    """``torch.nn.SmoothL1Loss``: :func:`~sparsegrid.nn.functional.smooth_l1_loss`;
    ``beta >= 0`` is checked here."""

    def __init__(self, size_average=None, reduce=None, reduction="mean", beta=1.0):
        super().__init__(size_average, reduce, reduction)
        self.beta = F._real(beta, "beta", 0.0)

    def forward(self, input, target):
        return F.smooth_l1_loss(input, target, reduction=self.reduction, beta=self.beta)
