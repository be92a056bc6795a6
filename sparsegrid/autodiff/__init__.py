"""Tape-style reverse-mode autodiff for sparsegrid (see :mod:`.core`).

``Tensor`` wraps a NumPy/CuPy array; the functions below are its differentiable
primitives; :func:`check_gradients` compares any function's backward pass with float64
finite differences.
"""

from .core import Tensor, as_tensor, is_grad_enabled, no_grad, record
from .gradcheck import check_gradients, numerical_gradient
from .ops import (add, binary_cross_entropy_with_logits, concatenate, div, dropout, elu, exp,
                  getitem, leaky_relu, log, log_softmax, matmul, mean, mse_loss, mul, neg,
                  power, put_rows, relu, reshape, selu, sigmoid, softmax_cross_entropy, sub,
                  sum, take_rows, tanh, to_device, transpose, unbroadcast)

__all__ = [
    "add", "as_tensor", "binary_cross_entropy_with_logits", "check_gradients", "concatenate",
    "div", "dropout", "elu", "exp", "getitem", "is_grad_enabled", "leaky_relu", "log",
    "log_softmax", "matmul", "mean", "mse_loss", "mul", "neg", "no_grad",
    "numerical_gradient", "power", "put_rows", "record", "relu", "reshape", "selu", "sigmoid",
    "softmax_cross_entropy", "sub", "sum", "take_rows", "tanh", "Tensor", "to_device", "transpose",
    "unbroadcast",
]
