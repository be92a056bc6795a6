"""A sparsegrid network as a differentiable JAX function (``jax.custom_vjp``).

::

    import jax, jax.numpy as jnp
    from sparsegrid.interop import jax as sgjax

    f = sgjax.function(net, x)           # net: sparsegrid.nn.Module, x: SparseTensor (sites)
    params = sgjax.parameters(net)       # {dotted name: jax array}
    def loss(params, features):
        return jnp.mean(f(params, features) ** 2)
    value, (g_params, g_features) = jax.value_and_grad(loss, argnums=(0, 1))(params, feats)
    sgjax.load_parameters(net, params)   # trained JAX values back into the module

``f(params, features)`` runs ``net`` on ``x``'s sites with ``features`` (N, C) and the given
parameters and returns the output features (a sparse result; its sites are
``f.output_sites``, a SparseTensor) or the dense output. It works under ``jax.jit``,
``jax.grad``, ``jax.value_and_grad`` and ``jax.vjp``: the forward and the backward are
``jax.pure_callback`` calls into sparsegrid, and the backward recomputes the forward
(a rematerialisation: JAX residuals must be arrays, so sparsegrid's graph is not kept
between the two; the cost is one extra forward per gradient).

Where JAX allows it: callbacks hand host (NumPy) arrays, so the computation runs on
sparsegrid's CPU backend. With JAX on the CPU no device copy is involved; with JAX on a
GPU, JAX itself moves the arrays through the host for the callback. For zero-copy on a
GPU use CuPy arrays and :func:`sparsegrid.interop.to_jax` / DLPack directly, or the torch
bridge. ``jax.vmap`` is not supported (the sites are fixed per function); forward-mode
(``jax.jvp``, ``jax.jacfwd``) is not available (a custom VJP).

Side effects: a module in training mode updates its batch-norm running statistics once
per forward call, eager or jitted: its forward is then an ordered ``io_callback``, which
JAX neither drops nor repeats (a ``pure_callback`` otherwise); the recomputation in the
backward restores them. The mode is read when JAX traces the function: re-trace (a new
``jax.jit``) after ``train()``/``eval()``. Layers that draw
random numbers in training mode (Dropout) are refused, since the recomputed forward would
draw a different mask; call ``net.eval()`` or remove them.
"""

from __future__ import annotations

import numpy as np

import jax
import jax.numpy as jnp

from ..autodiff.core import Tensor, data_of, no_grad
from ..nn.layers import Dropout
from ..nn.module import Module
from ..tensor import SparseTensor

__all__ = ["function", "parameters", "load_parameters"]


def parameters(module):
    """``{dotted name: jax array}``: copies of ``module``'s parameters (JAX arrays are
    immutable, so the function never writes into them)."""
    _check_module(module)
    return {name: jnp.asarray(np.array(data_of(p), copy=True))
            for name, p in module.named_parameters()}


def load_parameters(module, params):
    """Copy ``params`` (``{name: array}``, e.g. trained JAX arrays) into ``module``'s
    parameters in place; every name must match, shapes must agree (ValueError/KeyError
    otherwise)."""
    _check_module(module)
    own = dict(module.named_parameters())
    missing, unexpected = set(own) - set(params), set(params) - set(own)
    if missing or unexpected:
        raise KeyError(f"params do not match the module's parameters: missing "
                       f"{sorted(missing)}, unexpected {sorted(unexpected)}")
    values = {}
    for name, value in params.items():
        array = np.asarray(value)
        if array.shape != own[name].shape:
            raise ValueError(f"params[{name!r}] has shape {array.shape}; the module's "
                             f"parameter has {own[name].shape}")
        values[name] = array
    for name, array in values.items():
        own[name].data[...] = array


def _check_module(module):
    if not isinstance(module, Module):
        raise TypeError(f"module must be a sparsegrid.nn.Module; got {type(module).__name__}")


def _updates_state(module):
    """Whether a forward changes the module's state: a layer in training mode with
    buffers (batch norm's running statistics)."""
    return any(m.training and any(b is not None for b in m._buffers.values())
               for _, m in module.named_modules())


def _buffers(module):
    return [(m, name) for _, m in module.named_modules()
            for name, b in m._buffers.items() if b is not None]


class _State:
    """Run ``module`` on fixed sites with given parameter values (host arrays)."""

    def __init__(self, module, sites):
        self.module = module
        self.sites = sites
        self.params = [p for _, p in module.named_parameters()]
        self.names = [n for n, _ in module.named_parameters()]

    def _bind(self, values):
        saved = [p.data for p in self.params]
        for p, v in zip(self.params, values):
            p.data = np.ascontiguousarray(v)
        return saved

    def _restore(self, saved):
        for p, v in zip(self.params, saved):
            p.data = v

    def _snapshot(self):
        return [(m, name, np.array(m._buffers[name], copy=True))
                for m, name in _buffers(self.module)]

    @staticmethod
    def _put_back(snapshot):
        for m, name, value in snapshot:
            m._buffers[name][...] = value

    def _refuse_random(self):
        for _, m in self.module.named_modules():
            if isinstance(m, Dropout) and m.training and getattr(m, "p", 0):
                raise ValueError(f"{type(m).__name__} in training mode draws a new random "
                                 "mask per call, and the JAX bridge recomputes the forward "
                                 "in its backward: call module.eval() (or remove it) first")

    def _output(self, result):
        if isinstance(result, SparseTensor):
            return result, result.features
        return None, result

    def forward(self, values, features):
        """The output array (no graph)."""
        self._refuse_random()
        saved = self._bind(values)
        try:
            with no_grad():
                _, out = self._output(self.module(
                    self.sites.with_features(np.ascontiguousarray(features))))
        finally:
            self._restore(saved)
        return np.ascontiguousarray(data_of(out))

    def backward(self, values, features, grad):
        """Gradients of (parameters..., features), recomputing the forward; the module's
        buffers are restored (the forward callback already updated them once)."""
        self._refuse_random()
        snapshot = self._snapshot()
        saved = self._bind(values)
        flags = [p.requires_grad for p in self.params]
        grads_before = [p.grad for p in self.params]
        try:
            for p in self.params:
                p.requires_grad, p.grad = True, None
            leaf = Tensor(np.array(features, copy=True), requires_grad=True)
            _, out = self._output(self.module(self.sites.with_features(leaf)))
            g = np.ascontiguousarray(grad, dtype=data_of(out).dtype)
            if isinstance(out, Tensor) and out.requires_grad:
                out.backward(g)
            grads = [np.zeros(v.shape, v.dtype) if p.grad is None else
                     p.grad.astype(v.dtype, copy=False) for p, v in zip(self.params, values)]
            grads.append(np.zeros(features.shape, features.dtype) if leaf.grad is None
                         else leaf.grad.astype(features.dtype, copy=False))
        finally:
            for p, flag, before in zip(self.params, flags, grads_before):
                p.requires_grad, p.grad = flag, before
            self._restore(saved)
            self._put_back(snapshot)
        return tuple(grads)


def function(module, sites):
    """A JAX function ``f(params, features)`` running ``module`` on ``sites``.

    Parameters
    ----------
    module : sparsegrid.nn.Module
        The network. Its current parameters are not used by ``f`` (``params`` are), but
        its structure, mode (``train``/``eval``) and buffers are.
    sites : SparseTensor
        The input's sites (its features are only used to infer the output's shape).

    Returns
    -------
    callable
        ``f(params, features) -> jax array``: ``params`` a dict ``{dotted name: array}``
        as :func:`parameters` returns, ``features`` (N, C). ``f.output_sites`` is the
        output SparseTensor's sites (None for a dense output), ``f.names`` the parameter
        names.
    """
    _check_module(module)
    if not isinstance(sites, SparseTensor):
        raise TypeError(f"sites must be a SparseTensor; got {type(sites).__name__}")
    sites = sites.detach()
    state = _State(module, sites)
    n, c = sites.n_active, sites.n_channels
    # The output's shape: one forward now (buffers restored afterwards).
    snapshot = state._snapshot()
    try:
        with no_grad():
            result = module(sites)
    finally:
        state._put_back(snapshot)
    out_sites, out = state._output(result)
    out_shape = tuple(data_of(out).shape)

    def check(params, features):
        if set(params) != set(state.names):
            raise KeyError(f"params must have exactly the module's parameter names "
                           f"{state.names}; got {sorted(params)}")
        if features.ndim != 2 or tuple(features.shape) != (n, c):
            raise ValueError(f"features must have shape ({n}, {c}) (the sites' rows and "
                             f"channels); got {tuple(features.shape)}")

    def spec(features):
        return jax.ShapeDtypeStruct(out_shape, features.dtype)

    def host_forward(features, *values):
        return state.forward(values, np.asarray(features))

    def host_backward(features, grad, *values):
        return state.backward(values, np.asarray(features), np.asarray(grad))

    @jax.custom_vjp
    def f(params, features):
        check(params, features)
        values = [params[k] for k in state.names]
        if _updates_state(module):
            # running statistics change: an ordered io_callback, which JAX neither drops
            # nor repeats (a pure_callback could be either under jit)
            from jax.experimental import io_callback
            return io_callback(host_forward, spec(features), features, *values,
                               ordered=True)
        return jax.pure_callback(host_forward, spec(features), features, *values)

    def f_fwd(params, features):
        return f(params, features), (params, features)

    def f_bwd(residual, grad):
        params, features = residual
        values = [params[k] for k in state.names]
        specs = tuple(jax.ShapeDtypeStruct(v.shape, v.dtype) for v in values) + \
            (jax.ShapeDtypeStruct(features.shape, features.dtype),)
        grads = jax.pure_callback(host_backward, specs, features, grad, *values)
        return {k: g for k, g in zip(state.names, grads[:-1])}, grads[-1]

    f.defvjp(f_fwd, f_bwd)
    f.output_sites = out_sites
    f.names = list(state.names)
    return f
