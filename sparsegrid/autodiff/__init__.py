"""Tape-style reverse-mode autodiff for sparsegrid (see :mod:`.core`).

``Tensor`` wraps a NumPy/CuPy array; the functions below are its differentiable
primitives; :func:`check_gradients` compares any function's backward pass with float64
finite differences. ``Tensor`` also has the torch-named methods SparseConvNet scripts use
(``size``, ``view``, ``max(dim)``, ``float()``, ``type('torch.FloatTensor')``,
``index_add_``, elementwise comparisons, ``np.asarray(t)``; see :mod:`.ops`).
"""

from .core import Size, Tensor, as_tensor, is_grad_enabled, no_grad, record
from .gradcheck import check_gradients, numerical_gradient
from .ops import (ValuesIndices, absolute, add, amax, amin, argmax, argmin,
                  binary_cross_entropy_with_logits, cast, clone, concatenate, div, dropout, elu,
                  exp, expand, getitem, index_add, leaky_relu, log, log_softmax, matmul,
                  maximum, mean, minimum, mse_loss, mul, neg, power, put_rows, relu, reshape,
                  selu, sigmoid, softmax, softmax_cross_entropy, sort, sub, sum, take_rows, tanh,
                  tensor_type, to_device, transpose, unbroadcast)

__all__ = [
    "absolute", "add", "amax", "amin", "argmax", "argmin", "as_tensor",
    "binary_cross_entropy_with_logits", "cast", "check_gradients", "clone", "concatenate",
    "div", "dropout", "elu", "exp", "expand", "getitem", "index_add", "is_grad_enabled",
    "leaky_relu", "log", "log_softmax", "matmul", "maximum", "mean", "minimum", "mse_loss",
    "mul", "neg", "no_grad", "numerical_gradient", "power", "put_rows", "record", "relu",
    "reshape", "selu", "sigmoid", "Size", "softmax", "softmax_cross_entropy", "sort", "sub",
    "sum", "take_rows", "tanh", "Tensor", "tensor_type", "to_device", "transpose",
    "unbroadcast", "ValuesIndices",
]
