"""Generative layers (MinkowskiEngine's names): Pruning, Union, Cat.

The generative transposed convolution is SCN's ``FullConvolution`` (also
``TransposeConvolution``), exposed under MinkowskiEngine's name as
``GenerativeConvolutionTranspose`` (the same class, SCN's constructor arguments).
``Cat`` is ``JoinTable`` (same rule: tensors on the same sites in the same row order)
that also takes its tensors as separate arguments.
"""

from __future__ import annotations

from .. import generative as G
from .containers import JoinTable
from .layers import FullConvolution, _check_input
from .module import Module

GenerativeConvolutionTranspose = FullConvolution


def _inputs(module, tensors):
    """``forward(a, b, ...)`` or ``forward([a, b, ...])`` (after a ConcatTable)."""
    if len(tensors) == 1 and isinstance(tensors[0], (list, tuple)):
        tensors = tuple(tensors[0])
    if not tensors:
        raise TypeError(f"{type(module).__name__} expects one or more SparseTensors")
    return [_check_input(module, t) for t in tensors]


class Pruning(Module):
    """``forward(x, keep)``: the sites of ``x`` where the boolean (or 0/1) mask ``keep``
    (N,) is true, on a new Grid (MinkowskiPruning; :func:`sparsegrid.generative.prune`).
    The kept features carry the gradient; pruned rows get zero."""

    def forward(self, x, keep):
        return G.prune(_check_input(self, x), keep)


class Union(Module):
    """``forward(a, b, ...)`` or ``forward([a, b, ...])``: the union of the inputs' sites,
    features summed where they overlap, rows sorted (MinkowskiUnion;
    :func:`sparsegrid.generative.union`). ``AddTable`` is the special case of one site set."""

    def forward(self, *tensors):
        return G.union(_inputs(self, tensors))


class Cat(JoinTable):
    """``forward(a, b, ...)`` or ``forward([a, b, ...])``: channel concatenation of tensors
    on the same sites in the same row order (MinkowskiEngine's ``cat``): ``JoinTable``."""

    def forward(self, *tensors):
        if len(tensors) == 1 and isinstance(tensors[0], (list, tuple)):
            tensors = tuple(tensors[0])
        return super().forward(list(tensors))


__all__ = ["Cat", "GenerativeConvolutionTranspose", "Pruning", "Union"]
