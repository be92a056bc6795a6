"""The autodiff core: values against NumPy, gradients against float64 finite differences."""

import numpy as np
import pytest

from sparsegrid import autodiff as ad
from sparsegrid.autodiff import Tensor, ops


def shapes_case(rng, *shapes):
    return [rng.standard_normal(s) for s in shapes]


# (name, function, input shapes, NumPy reference of the value)
UNARY = [
    ("neg", ad.neg, lambda x: -x),
    ("exp", ad.exp, np.exp),
    ("tanh", ad.tanh, np.tanh),
    ("sigmoid", ad.sigmoid, lambda x: 1 / (1 + np.exp(-x))),
    ("relu", ad.relu, lambda x: np.maximum(x, 0)),
    ("leaky_relu", lambda a: ad.leaky_relu(a, 0.2), lambda x: np.where(x > 0, x, 0.2 * x)),
    ("elu", lambda a: ad.elu(a, 1.5), lambda x: np.where(x > 0, x, 1.5 * (np.exp(x) - 1))),
    ("selu", ad.selu, lambda x: 1.0507009873554805 * np.where(
        x > 0, x, 1.6732632423543772 * (np.exp(x) - 1))),
    ("square", lambda a: a ** 2, lambda x: x ** 2),
    ("sum_axis", lambda a: ad.sum(a, axis=1), lambda x: x.sum(axis=1)),
    ("mean_keepdims", lambda a: ad.mean(a, axis=0, keepdims=True),
     lambda x: x.mean(axis=0, keepdims=True)),
    ("mean_all", ad.mean, np.mean),
    ("reshape", lambda a: a.reshape(4, 3), lambda x: x.reshape(4, 3)),
    ("transpose", lambda a: a.T, lambda x: x.T),
    ("getitem_rows", lambda a: a[np.array([0, 2, 0])], lambda x: x[[0, 2, 0]]),
    ("getitem_slice", lambda a: a[1:, ::2], lambda x: x[1:, ::2]),
    ("log_softmax", ad.log_softmax,
     lambda x: x - x.max(1, keepdims=True) - np.log(np.exp(x - x.max(1, keepdims=True)).sum(
         1, keepdims=True))),
]


@pytest.mark.parametrize("name,fn,reference", UNARY, ids=[u[0] for u in UNARY])
def test_unary(rng, name, fn, reference):
    x = rng.standard_normal((3, 4))
    x[np.abs(x) < 1e-3] = 0.5  # keep away from kinks
    np.testing.assert_allclose(fn(Tensor(x)).data, reference(x), rtol=1e-12, atol=1e-12)
    ad.check_gradients(fn, [x])


def test_log_of_positive(rng):
    x = rng.uniform(0.5, 2.0, (3, 4))
    np.testing.assert_allclose(ad.log(Tensor(x)).data, np.log(x))
    ad.check_gradients(ad.log, [x])


BINARY = [("add", ad.add, np.add), ("sub", ad.sub, np.subtract), ("mul", ad.mul, np.multiply),
          ("div", ad.div, np.divide)]


@pytest.mark.parametrize("shape_b", [(3, 4), (4,), (1, 4), (3, 1), ()])
@pytest.mark.parametrize("name,fn,reference", BINARY, ids=[b[0] for b in BINARY])
def test_binary_with_broadcasting(rng, name, fn, reference, shape_b):
    a = rng.standard_normal((3, 4))
    b = rng.uniform(0.5, 2.0, shape_b)  # positive: safe divisor
    np.testing.assert_allclose(fn(Tensor(a), Tensor(b)).data, reference(a, b))
    ad.check_gradients(fn, [a, b])


def test_operators_and_constants(rng):
    a, b = rng.standard_normal((2, 3)), rng.standard_normal((3, 2))
    ad.check_gradients(lambda x, y: 2.0 * (x @ y) - 1.0 + (x @ y) / 3.0, [a, b])
    ad.check_gradients(lambda x: 1.0 - x / 2.0 + 3.0 * x, [a])


def test_matmul_batched(rng):
    ad.check_gradients(ad.matmul, shapes_case(rng, (2, 3, 4), (4, 5)))
    with pytest.raises(ValueError, match="ndim >= 2"):
        ad.matmul(Tensor(np.ones(3)), Tensor(np.ones((3, 2))))


def test_concatenate(rng):
    a, b = shapes_case(rng, (2, 3), (4, 3))
    out = ad.concatenate([Tensor(a), Tensor(b)], axis=0)
    assert np.array_equal(out.data, np.concatenate([a, b]))
    ad.check_gradients(lambda x, y: ad.concatenate([x, y], axis=0), [a, b])
    c, d = shapes_case(rng, (2, 3), (2, 1))
    ad.check_gradients(lambda x, y: ad.concatenate([x, y], axis=1), [c, d])


def test_softmax_cross_entropy_matches_reference_and_ignores(rng):
    logits = rng.standard_normal((5, 4))
    labels = np.array([0, 3, -100, 1, 3])
    keep = labels != -100
    logp = logits - np.log(np.exp(logits).sum(1, keepdims=True))
    expected = -logp[np.flatnonzero(keep), labels[keep]]
    loss = ad.softmax_cross_entropy(Tensor(logits), labels)
    np.testing.assert_allclose(loss.data, expected.mean())
    np.testing.assert_allclose(ad.softmax_cross_entropy(Tensor(logits), labels, reduction="sum")
                               .data, expected.sum())
    per_row = ad.softmax_cross_entropy(Tensor(logits), labels, reduction="none").data
    np.testing.assert_allclose(per_row[keep], expected)
    assert per_row[~keep] == 0
    for reduction in ("mean", "sum", "none"):
        ad.check_gradients(lambda x: ad.softmax_cross_entropy(x, labels, reduction=reduction),
                           [logits])
    with pytest.raises(ValueError, match="labels must be in"):
        ad.softmax_cross_entropy(Tensor(logits), np.array([0, 4, 0, 0, 0]))


def test_binary_cross_entropy_with_logits(rng):
    x = rng.standard_normal((6,)) * 30  # large magnitudes: must stay finite
    t = rng.uniform(0, 1, (6,))
    expected = np.mean(np.logaddexp(0, x) - x * t)
    np.testing.assert_allclose(ad.binary_cross_entropy_with_logits(Tensor(x), t).data, expected)
    small = rng.standard_normal((6,))
    for reduction in ("mean", "sum", "none"):
        ad.check_gradients(
            lambda a, b: ad.binary_cross_entropy_with_logits(a, b, reduction=reduction),
            [small, t])


def test_mse(rng):
    a, b = shapes_case(rng, (3, 2), (3, 2))
    np.testing.assert_allclose(ad.mse_loss(Tensor(a), Tensor(b)).data, np.mean((a - b) ** 2))
    ad.check_gradients(ad.mse_loss, [a, b])


def test_dropout_is_inverted_and_masks_gradient(rng):
    x = np.ones((200, 50))
    t = Tensor(x, requires_grad=True)
    out = ad.dropout(t, 0.25, training=True, rng=np.random.default_rng(1))
    kept = out.data != 0
    assert 0.7 < kept.mean() < 0.8
    np.testing.assert_allclose(out.data[kept], 1 / 0.75)
    out.backward(np.ones_like(x))
    np.testing.assert_array_equal(t.grad, np.where(kept, 1 / 0.75, 0))
    assert ad.dropout(t, 0.25, training=False).data is x
    with pytest.raises(ValueError, match="p must be in"):
        ad.dropout(t, 1.0)


def test_gradients_accumulate_over_uses_and_calls(rng):
    x = Tensor(rng.standard_normal(3), requires_grad=True)
    (x * x + x).sum().backward()
    np.testing.assert_allclose(x.grad, 2 * x.data + 1)
    (x * 3.0).sum().backward()
    np.testing.assert_allclose(x.grad, 2 * x.data + 4)


def test_no_grad_records_nothing(rng):
    x = Tensor(rng.standard_normal(3), requires_grad=True)
    with ad.no_grad():
        y = x * 2.0
        assert not ad.is_grad_enabled()
    assert ad.is_grad_enabled()
    assert not y.requires_grad and y._vjp is None
    with pytest.raises(RuntimeError, match="does not require a gradient"):
        y.sum().backward()
    plain = Tensor(np.ones(3)) * 2.0
    assert not plain.requires_grad


def test_backward_argument_checks(rng):
    x = Tensor(rng.standard_normal((2, 2)), requires_grad=True)
    y = x * 2.0
    with pytest.raises(ValueError, match="needs grad"):
        y.backward()
    with pytest.raises(ValueError, match="expected"):
        y.backward(np.ones(3))


def test_deep_chain_has_no_recursion_limit():
    x = Tensor(np.ones(2), requires_grad=True)
    y = x
    for _ in range(5000):
        y = y * 1.0
    y.sum().backward()
    np.testing.assert_array_equal(x.grad, np.ones(2))


def test_check_gradients_catches_a_wrong_vjp():
    def wrong(a):
        return ad.record(a.data ** 2, (a,), lambda g: (g * a.data,))  # should be 2 * a

    with pytest.raises(AssertionError, match="gradient of input 0"):
        ad.check_gradients(wrong, [np.array([1.0, 2.0])])


def test_check_gradients_refuses_a_vacuous_point(rng):
    """Zero backward and zero finite differences prove nothing: refused unless allowed."""
    negative = -rng.uniform(0.5, 2.0, (3, 4))            # every ReLU off: nothing flows
    with pytest.raises(AssertionError, match=r"input 0 .*vacuous.*allow_zero=\(0,\)"):
        ad.check_gradients(ad.relu, [negative])
    other = rng.standard_normal((3, 4))
    with pytest.raises(AssertionError, match="input 1 .*vacuous"):   # an unused input
        ad.check_gradients(lambda a, b: a * 2.0, [other, other])
    # Gradients below atol count as zero; a tighter atol makes the same check meaningful.
    with pytest.raises(AssertionError, match="vacuous"):
        ad.check_gradients(lambda a: a * 1e-9, [other])
    ad.check_gradients(lambda a: a * 1e-9, [other], atol=1e-15)
    # Opting out, for all inputs or by position; the values are still compared.
    ad.check_gradients(ad.relu, [negative], allow_zero=True)
    ad.check_gradients(lambda a, b: ad.relu(a) * b, [negative, other], allow_zero=(0, 1))
    ad.check_gradients(lambda a, b: ad.relu(a) + b, [negative, other], allow_zero=(0,))
    ad.check_gradients(lambda a, b: ad.relu(a) + b, [negative, other], allow_zero=0)
    with pytest.raises(AssertionError, match="input 0 .*vacuous"):
        ad.check_gradients(lambda a, b: ad.relu(a) + b, [negative, other], allow_zero=(1,))

    def zero_vjp(a):
        return ad.record(a.data ** 2, (a,), lambda g: (g * 0.0,))

    with pytest.raises(AssertionError, match="gradient of input 0 at"):
        ad.check_gradients(zero_vjp, [np.array([1.0, 2.0])], allow_zero=True)
    with pytest.raises(ValueError, match="allow_zero names input 1"):
        ad.check_gradients(ad.relu, [negative], allow_zero=(1,))
    with pytest.raises(TypeError, match="allow_zero"):
        ad.check_gradients(ad.relu, [negative], allow_zero=("0",))


def test_residual_pattern_sums_both_paths():
    """x used directly and through another op (every residual block): both paths count."""
    x = Tensor(np.array([1.0, 2.0]), requires_grad=True)
    ad.sum(ad.add(x, ad.mul(x, 2.0))).backward()
    np.testing.assert_array_equal(x.grad, [3.0, 3.0])
    h = ad.mul(x, 1.0)
    ad.sum(ad.add(ad.mul(h, 3.0), h)).backward()
    np.testing.assert_array_equal(x.grad, [7.0, 7.0])
    ad.check_gradients(lambda a: ad.add(a, ad.tanh(ad.mul(a, a))) * a, [np.array([0.3, -1.2])])


def test_leaf_gradients_are_independent_arrays():
    a, b = Tensor(np.ones(2), requires_grad=True), Tensor(np.ones(2), requires_grad=True)
    ad.sum(ad.add(a, b)).backward()
    assert a.grad is not b.grad
    a.grad *= 0
    np.testing.assert_array_equal(b.grad, [1.0, 1.0])


def test_losses_refuse_broadcasting_shapes(rng):
    scores, targets = rng.standard_normal((5, 1)), rng.random(5)
    with pytest.raises(ValueError, match="same shape"):
        ops.mse_loss(scores, targets)
    with pytest.raises(ValueError, match="same shape"):
        ops.binary_cross_entropy_with_logits(scores, targets)


def test_take_rows_and_put_rows():
    """The distinct-row gather and its adjoint: values, gradients by finite differences,
    and the return rule (plain in -> plain out, Tensor in -> Tensor out)."""
    from sparsegrid.autodiff import check_gradients, put_rows, take_rows
    rng = np.random.default_rng(5)
    values = rng.standard_normal((6, 3))
    rows = np.array([4, 0, 5])
    np.testing.assert_array_equal(take_rows(values, rows), values[rows])
    placed = put_rows(values[:3], rows, 6)
    assert isinstance(placed, np.ndarray) and placed.shape == (6, 3)
    np.testing.assert_array_equal(placed[rows], values[:3])
    np.testing.assert_array_equal(placed[[1, 2, 3]], 0)
    assert isinstance(take_rows(Tensor(values), rows), Tensor)
    check_gradients(lambda v: take_rows(v, rows), [values])
    check_gradients(lambda v: put_rows(v, rows, 6), [values[:3]])


def test_numerical_gradient_of_a_non_contiguous_array():
    """A transposed view is perturbed element by element too (a C-order working copy)."""
    from sparsegrid.autodiff import numerical_gradient
    a = np.arange(6.0).reshape(2, 3).T          # (3, 2), not C-contiguous
    weights = np.arange(1.0, 7.0).reshape(3, 2)
    grad = numerical_gradient(lambda v: float(np.sum(v * weights)), a)
    np.testing.assert_allclose(grad, weights, rtol=1e-8)
