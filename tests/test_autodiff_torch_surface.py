"""The torch-named surface of ``sparsegrid.autodiff.Tensor`` that SparseConvNet scripts use:
values against NumPy, gradients against float64 finite differences (check_gradients), and
the failure modes it replaces (object arrays from np.asarray, identity ``==``, ...)."""

import numpy as np
import pytest

import sparsegrid.nn as scn
from sparsegrid import backend
from sparsegrid import autodiff as ad
from sparsegrid.autodiff import Size, Tensor, ValuesIndices, check_gradients, no_grad


def _distinct(rng, shape):
    """Random values with no ties (max/min/sort are smooth there)."""
    return rng.permutation(np.prod(shape)).reshape(shape) * 0.1 + rng.uniform(0, 0.01, shape)


# -- shapes and queries -----------------------------------------------------------------------
def test_size_shape_dim_numel():
    t = Tensor(np.zeros((2, 3, 4), np.float32))
    assert isinstance(t.shape, Size) and isinstance(t.size(), Size)
    assert t.size() == t.shape == (2, 3, 4) and repr(t.shape) == "(2, 3, 4)"
    assert (t.size(0), t.size(-1), t.size(dim=1)) == (2, 4, 3)
    assert t.shape[1:] == (3, 4) and isinstance(t.shape[1:], Size) and t.shape[0] == 2
    assert t.shape.numel() == 24 == t.numel() == t.nelement() and Size(()).numel() == 1
    assert t.dim() == 3 == t.ndim
    with pytest.raises(IndexError, match=r"range of \[-3, 2\], but got 3"):
        t.size(3)
    with pytest.raises(IndexError, match="out of range"):
        t.size(-4)
    with pytest.raises(TypeError, match="dim must be an int"):
        t.size(1.0)
    with pytest.raises(IndexError, match="0-d"):
        Tensor(np.float64(1.0)).size(0)
    assert scn.Parameter(np.zeros((3, 5), np.float32)).nelement() == 15


@pytest.mark.parametrize("args", [(3, 8), ((3, 8),), ([3, 8],), (Size((3, 8)),), (-1, 8),
                                  (3, -1), (24,), (2, 3, 4)])
def test_view_and_reshape_forms(rng, args):
    x = rng.standard_normal((4, 6))
    expected = x.reshape(args[0] if len(args) == 1 and not isinstance(args[0], int) else args)
    for method in ("view", "reshape"):
        out = getattr(Tensor(x), method)(*args)
        np.testing.assert_array_equal(out.data, expected)
    check_gradients(lambda a: a.view(*args), [x])


def test_view_errors():
    t = Tensor(np.zeros((3, 4)))
    with pytest.raises(ValueError, match=r"shape \(5,\) is invalid for a tensor of 12"):
        t.view(5)
    with pytest.raises(ValueError, match=r"shape \(5, -1\) is invalid"):
        t.view(5, -1)
    with pytest.raises(ValueError, match="at most one -1"):
        t.view(-1, -1)
    with pytest.raises(TypeError, match="must be ints"):
        t.view(3.0, 4)


def test_other_shape_methods(rng):
    x = rng.standard_normal((2, 1, 3))
    t = Tensor(x)
    cases = [
        (lambda a: a.view_as(np.zeros((3, 2))), x.reshape(3, 2)),
        (lambda a: a.reshape_as(Tensor(np.zeros(6))), x.reshape(6)),
        (lambda a: a.flatten(), x.reshape(-1)),
        (lambda a: a.flatten(1), x.reshape(2, 3)),
        (lambda a: a.squeeze(), x.reshape(2, 3)),
        (lambda a: a.squeeze(1), x.reshape(2, 3)),
        (lambda a: a.squeeze(0), x),                       # extent 2: kept, as in torch
        (lambda a: a.unsqueeze(0), x[None]),
        (lambda a: a.unsqueeze(-1), x[..., None]),
        (lambda a: a.permute(2, 0, 1), x.transpose(2, 0, 1)),
        (lambda a: a.permute((1, 2, 0)), x.transpose(1, 2, 0)),
        (lambda a: a.transpose(0, 2), x.swapaxes(0, 2)),
        (lambda a: a.expand(4, 2, 5, 3), np.broadcast_to(x, (4, 2, 5, 3))),
        (lambda a: a.expand(-1, 4, -1), np.broadcast_to(x, (2, 4, 3))),
        (lambda a: a.expand_as(np.zeros((2, 2, 3))), np.broadcast_to(x, (2, 2, 3))),
        (lambda a: a.contiguous(), x),
        (lambda a: a.view(2, 3).t(), x.reshape(2, 3).T),
    ]
    for fn, expected in cases:
        np.testing.assert_array_equal(fn(t).data, expected)
        check_gradients(fn, [x])
    with pytest.raises(ValueError, match="not a permutation"):
        t.permute(0, 0, 1)
    with pytest.raises(ValueError, match="<= 2 dimensions"):
        t.t()
    with pytest.raises(ValueError, match="new leading dimension"):
        t.expand(-1, 2, 1, 3)
    assert Tensor(np.float64(2.0)).flatten().shape == (1,)


# -- reductions ---------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["max", "min"])
def test_max_min_along_a_dimension(rng, name):
    x = _distinct(rng, (4, 5))
    reference, arg = getattr(np, name), getattr(np, "arg" + name)
    for dim in (0, 1, -1):
        for keepdim in (False, True):
            result = getattr(Tensor(x), name)(dim, keepdim)
            assert isinstance(result, ValuesIndices)
            values, indices = result                       # unpacks as a pair
            assert values is result.values and indices is result[1]
            np.testing.assert_array_equal(values.data, reference(x, axis=dim, keepdims=keepdim))
            np.testing.assert_array_equal(indices.data, arg(x, axis=dim, keepdims=keepdim))
            assert indices.dtype == np.int64 and not indices.requires_grad
            check_gradients(lambda a: getattr(a, name)(dim, keepdim)[0], [x])
    # keywords: torch's and NumPy's
    np.testing.assert_array_equal(getattr(Tensor(x), name)(dim=1, keepdim=True).indices.data,
                                  arg(x, axis=1, keepdims=True))
    np.testing.assert_array_equal(getattr(Tensor(x), name)(axis=0).values.data,
                                  reference(x, axis=0))


def test_max_dim_gradient_goes_to_the_first_maximum():
    t = Tensor(np.array([[1.0, 5.0, 5.0], [2.0, 2.0, 0.0]]), requires_grad=True)
    values, indices = t.max(1)
    np.testing.assert_array_equal(indices.data, [1, 0])
    values.sum().backward()
    np.testing.assert_array_equal(t.grad, [[0, 1, 0], [1, 0, 0]])


@pytest.mark.parametrize("name", ["max", "min"])
def test_global_max_min(rng, name):
    x = _distinct(rng, (3, 4))
    out = getattr(Tensor(x), name)()
    assert isinstance(out, Tensor) and out.shape == ()
    assert out.item() == getattr(np, name)(x)
    check_gradients(lambda a: getattr(a, name)(), [x])
    # ties share the gradient equally (torch's max() without dim)
    t = Tensor(np.array([1.0, 5.0, 5.0, -2.0]), requires_grad=True)
    (t.max() * 3.0).backward()
    np.testing.assert_array_equal(t.grad, [0, 1.5, 1.5, 0])
    # NumPy's reductions call the method
    assert isinstance(np.max(Tensor(x)), Tensor) and np.max(Tensor(x)).item() == x.max()


def test_max_min_errors_and_edges(rng):
    with pytest.raises(IndexError, match="empty"):
        Tensor(np.zeros((0, 3))).max(0)
    with pytest.raises(ValueError, match="empty tensor"):
        Tensor(np.zeros(0)).max()
    with pytest.raises(IndexError, match="out of range"):
        Tensor(np.zeros((2, 3))).max(2)
    empty_rows = Tensor(np.zeros((0, 3))).max(1)           # nothing to reduce per row: fine
    assert empty_rows.values.shape == (0,) and empty_rows.indices.shape == (0,)
    # NaN propagates, as in torch
    values, indices = Tensor(np.array([[1.0, np.nan, 3.0]])).max(1)
    assert np.isnan(values.data[0]) and indices.data[0] == 1
    assert np.isnan(Tensor(np.array([1.0, np.nan])).max().item())
    # integer and bool tensors: values without gradients
    assert Tensor(np.array([3, 7, 2])).max().item() == 7
    assert Tensor(np.array([True, False])).max(0).indices.item() == 0


@pytest.mark.parametrize("name", ["max", "min"])
def test_elementwise_max_min(rng, name):
    a, b = rng.standard_normal((3, 4)), rng.standard_normal((4,))
    out = getattr(Tensor(a), name)(Tensor(b))
    np.testing.assert_array_equal(out.data, getattr(np, name + "imum")(a, b))
    check_gradients(lambda x, y: getattr(x, name)(y), [a, b])
    x = Tensor(np.array([1.0, 2.0]), requires_grad=True)
    y = Tensor(np.array([1.0, 0.0]), requires_grad=True)
    getattr(ad, name + "imum")(x, y).sum().backward()      # a tie shares the gradient
    if name == "max":
        np.testing.assert_array_equal(x.grad, [0.5, 1.0])
        np.testing.assert_array_equal(y.grad, [0.5, 0.0])
    else:
        np.testing.assert_array_equal(x.grad, [0.5, 0.0])
        np.testing.assert_array_equal(y.grad, [0.5, 1.0])


@pytest.mark.parametrize("name", ["argmax", "argmin"])
def test_argmax_argmin(rng, name):
    x = _distinct(rng, (3, 4, 2))
    t = Tensor(x, requires_grad=True)
    reference = getattr(np, name)
    whole = getattr(t, name)()
    assert whole.shape == () and whole.item() == reference(x) and whole.dtype == np.int64
    assert getattr(t, name)(keepdim=True).shape == (1, 1, 1)
    for dim in (0, 1, -1):
        for keepdim in (False, True):
            out = getattr(t, name)(dim, keepdim)
            np.testing.assert_array_equal(out.data, reference(x, axis=dim, keepdims=keepdim))
            assert not out.requires_grad
    with pytest.raises(ValueError, match="empty"):
        getattr(Tensor(np.zeros(0)), name)()


def test_sum_and_mean_with_dim_and_keepdim(rng):
    x = rng.standard_normal((3, 4, 5))
    t = Tensor(x)
    for dim in (None, 0, -1, (0, 2), [1, -1]):
        axis = tuple(dim) if isinstance(dim, list) else dim
        for keepdim in (False, True):
            np.testing.assert_allclose(t.sum(dim, keepdim).data,
                                       x.sum(axis=axis, keepdims=keepdim), rtol=1e-12)
            np.testing.assert_allclose(t.mean(dim=dim, keepdim=keepdim).data,
                                       x.mean(axis=axis, keepdims=keepdim), rtol=1e-12)
            check_gradients(lambda a: a.sum(dim, keepdim), [x])
            check_gradients(lambda a: a.mean(dim, keepdim), [x])
    np.testing.assert_allclose(t.sum(axis=1, keepdims=True).data, x.sum(1, keepdims=True))
    assert Tensor(x.astype(np.float32)).sum(dtype=np.float64).dtype == np.float64
    assert np.sum(t).item() == pytest.approx(x.sum()) and isinstance(np.mean(t), Tensor)
    with pytest.raises(TypeError, match="dim or axis"):
        t.sum(0, axis=1)
    with pytest.raises(ValueError, match="repeated"):
        t.sum((0, -3))
    with pytest.raises(TypeError, match="out="):
        t.sum(out=np.zeros(()))


def test_sort(rng):
    x = np.array([[3.0, 1.0, 3.0, 2.0, 1.0], [0.5, -1.0, 2.0, 2.0, 0.0]])
    values, indices = Tensor(x).sort(1)
    np.testing.assert_array_equal(indices.data, np.argsort(x, axis=1, kind="stable"))
    np.testing.assert_array_equal(values.data, np.sort(x, axis=1))
    values, indices = Tensor(x).sort(1, descending=True)     # stable: ties keep their order
    np.testing.assert_array_equal(indices.data, [[0, 2, 3, 1, 4], [2, 3, 0, 4, 1]])
    np.testing.assert_array_equal(values.data, np.take_along_axis(x, indices.data, 1))
    y = _distinct(rng, (4, 3))
    for dim in (0, 1):
        for descending in (False, True):
            check_gradients(lambda a: a.sort(dim, descending)[0] * 1.0, [y])
    values, _ = Tensor(np.array([1.0, np.nan, 0.0])).sort(descending=True)
    assert np.isnan(values.data[0])                          # NaN is the largest, as in torch


# -- elementwise, copies, conversions ------------------------------------------------------------
def test_abs_and_elementwise_methods(rng):
    x = rng.standard_normal((3, 4))
    x[np.abs(x) < 1e-3] = 0.5
    t = Tensor(x)
    np.testing.assert_array_equal(t.abs().data, np.abs(x))
    np.testing.assert_array_equal(abs(t).data, np.abs(x))
    for fn in (lambda a: a.abs(), abs, lambda a: a.exp(), lambda a: a.tanh(),
               lambda a: a.sigmoid(), lambda a: a.relu(), lambda a: a.softmax(1),
               lambda a: a.log_softmax(-1), lambda a: a.pow(3), lambda a: a.neg()):
        check_gradients(fn, [x])
    np.testing.assert_allclose(t.softmax(1).data, np.exp(x) / np.exp(x).sum(1, keepdims=True))
    zero = Tensor(np.array([0.0, -2.0, 3.0]), requires_grad=True)
    zero.abs().sum().backward()
    np.testing.assert_array_equal(zero.grad, [0.0, -1.0, 1.0])   # sign, 0 at 0 (torch)


def test_clone_detach_item_numpy(rng):
    x = rng.standard_normal((2, 3))
    t = Tensor(x, requires_grad=True)
    c = t.clone()
    assert c.data is not x and np.array_equal(c.data, x) and c.requires_grad
    check_gradients(lambda a: a.clone() * 2.0, [x])
    d = t.detach()
    assert d.data is x and not d.requires_grad and d.is_leaf
    assert t.numpy() is x and isinstance((t * 2.0).numpy(), np.ndarray)
    assert t.tolist() == x.tolist()
    s = Tensor(np.float32(2.5))
    assert s.item() == 2.5 and float(s) == 2.5 and int(Tensor(np.array([7]))) == 7
    assert f"{s:.2f}" == "2.50" and "%.1f" % s == "2.5"
    assert bool(Tensor(np.array([1]))) and not bool(Tensor(np.array(0.0)))
    with pytest.raises(ValueError, match="one element"):
        bool(Tensor(np.array([1, 2])))
    with pytest.raises(ValueError, match="one element"):
        Tensor(np.zeros(3)).item()
    assert 2.0 in Tensor(np.array([1.0, 2.0])) and 5 not in Tensor(np.array([1, 2]))
    text = repr(Tensor(np.array([1.5, 2.0], np.float32), requires_grad=True))
    assert "1.5" in text and "float32" in text and "requires_grad=True" in text
    leaf = Tensor(np.zeros(2)).requires_grad_()
    assert leaf.requires_grad and leaf.is_leaf and not (leaf * 2.0).is_leaf
    with pytest.raises(RuntimeError, match="only leaf"):
        (leaf * 2.0).requires_grad_(False)


CASTS = [("float", np.float32), ("double", np.float64), ("half", np.float16),
         ("long", np.int64), ("int", np.int32), ("bool", np.bool_)]


@pytest.mark.parametrize("name, dtype", CASTS, ids=[c[0] for c in CASTS])
def test_dtype_casts(rng, name, dtype):
    x = rng.standard_normal((2, 3)) * 3
    t = Tensor(x, requires_grad=True)
    out = getattr(t, name)()
    assert out.dtype == dtype
    np.testing.assert_array_equal(out.data, x.astype(dtype))
    assert out.requires_grad == (np.dtype(dtype).kind == "f")
    if np.dtype(dtype).kind == "f":
        g = rng.standard_normal((2, 3)).astype(dtype)
        out.backward(g)
        assert t.grad.dtype == np.float64
        np.testing.assert_array_equal(t.grad, g.astype(np.float64))
    same = Tensor(x.astype(dtype))
    assert getattr(same, name)() is same                    # already that dtype: itself


def test_to_cpu_and_dtype(rng):
    x = rng.standard_normal(3)
    t = Tensor(x, requires_grad=True)
    assert t.cpu() is t and t.to("cpu") is t and t.to(device="cpu") is t
    assert t.to(np.float32).dtype == np.float32 and t.to("float32").dtype == np.float32
    assert t.to(dtype=np.float16).dtype == np.float16 and t.to(np.int64).dtype == np.int64
    assert t.to("cpu", np.float32).dtype == np.float32
    assert t.to(Tensor(np.zeros(1, np.float32))).dtype == np.float32
    copied = t.to("cpu", copy=True)
    assert copied is not t and copied.data is not x and copied.requires_grad
    out = t.to("cpu", np.float32)
    out.backward(np.ones(3, np.float32))
    np.testing.assert_array_equal(t.grad, np.ones(3))
    with pytest.raises(ValueError, match="neither a device"):
        t.to("floaty")
    with pytest.raises(TypeError, match="at most 2"):
        t.to("cpu", np.float32, 1)
    with pytest.raises(ValueError, match="must be a GPU"):
        t.cuda("cpu")
    if not backend.cuda_available():
        with pytest.raises(RuntimeError, match="GPU"):
            t.cuda()
        with pytest.raises(RuntimeError, match="GPU"):
            t.type("torch.cuda.FloatTensor")


def test_type_names_and_conversions(rng):
    x = rng.standard_normal((2, 2))
    names = {np.float32: "torch.FloatTensor", np.float64: "torch.DoubleTensor",
             np.float16: "torch.HalfTensor", np.int64: "torch.LongTensor",
             np.int32: "torch.IntTensor", np.int16: "torch.ShortTensor",
             np.int8: "torch.CharTensor", np.uint8: "torch.ByteTensor",
             np.bool_: "torch.BoolTensor"}
    for dtype, name in names.items():
        assert Tensor(x.astype(dtype)).type() == name
        converted = Tensor(x).type(name)
        assert converted.dtype == dtype and converted.type() == name
    t = Tensor(x, requires_grad=True)
    out = t.type("torch.FloatTensor")
    assert out.dtype == np.float32 and out.requires_grad and out.device == "cpu"
    assert t.type(np.float32).dtype == np.float32
    assert not t.type("torch.LongTensor").requires_grad
    with pytest.raises(ValueError, match="invalid type: 'torch.Foo'"):
        t.type("torch.Foo")
    with pytest.raises(ValueError, match="invalid type"):
        t.type("FloatTensor")
    with pytest.raises(ValueError, match="no torch tensor-type name"):
        Tensor(np.zeros(2, np.uint32)).type()


# -- comparisons, hashing, NumPy conversion -----------------------------------------------------
def test_comparisons_are_elementwise(rng):
    a = rng.integers(0, 3, (4, 5)).astype(np.float32)
    b = rng.integers(0, 3, (4, 5)).astype(np.float32)
    ta, tb = Tensor(a, requires_grad=True), Tensor(b)
    pairs = [("__eq__", np.equal), ("__ne__", np.not_equal), ("__lt__", np.less),
             ("__le__", np.less_equal), ("__gt__", np.greater), ("__ge__", np.greater_equal)]
    for name, reference in pairs:
        for other in (tb, b, 1.0, np.float32(1)):
            out = getattr(ta, name)(other)
            assert isinstance(out, Tensor) and out.dtype == np.bool_ and not out.requires_grad
            np.testing.assert_array_equal(out.data, reference(a, b if other is tb else
                                                               np.asarray(other)))
        method = getattr(ta, name.strip("_"))
        np.testing.assert_array_equal(method(tb).data, reference(a, b))
    # an ndarray on the left gives a Tensor too
    assert isinstance(b == ta, Tensor) and np.array_equal((b < ta).data, b < a)
    # masks combine as in torch
    keep = (ta > 0) & ~(tb == 2)
    np.testing.assert_array_equal(keep.data, (a > 0) & ~(b == 2))
    np.testing.assert_array_equal(((ta > 1) | (b > 1)).data, (a > 1) | (b > 1))
    np.testing.assert_array_equal(((b > 1) ^ (ta > 1)).data, (a > 1) ^ (b > 1))
    assert (+ta) is ta
    # two different Tensors with the same values: elementwise, not identity
    same = Tensor(a.copy())
    assert (Tensor(a) == same).data.all() and (Tensor(a) != same).data.sum() == 0
    nan = Tensor(np.array([np.nan, 1.0]))
    np.testing.assert_array_equal((nan == nan).data, [False, True])
    # other objects: Python's fallback (torch: t == None is False)
    assert (ta == None) is False and (ta != None) is True  # noqa: E711
    assert (ta == "a") is False


def test_tensors_hash_by_identity():
    a, b = Tensor(np.zeros(3)), Tensor(np.zeros(3))
    table = {a: "a", b: "b"}
    assert table[a] == "a" and table[b] == "b" and len({a, b, a}) == 2
    assert a in [a] and a in {a} and [a, b].index(a) == 0
    assert hash(a) != hash(b)


def test_numpy_conversion_is_numeric(rng):
    x = rng.standard_normal((3, 2)).astype(np.float32)
    t = Tensor(x, requires_grad=True)
    converted = np.asarray(t)
    assert converted.dtype == np.float32 and converted is x          # no object array
    assert np.asarray(t, dtype=np.float64).dtype == np.float64
    assert np.array(t, copy=True) is not x
    assert np.asarray(t, copy=False) is x
    with pytest.raises(ValueError, match="copy is needed"):
        np.asarray(t, dtype=np.float64, copy=False)
    joined = np.concatenate([t, Tensor(x * 2)])
    assert joined.dtype == np.float32 and joined.shape == (6, 2)
    np.testing.assert_array_equal(joined, np.concatenate([x, x * 2]))
    stacked = np.asarray([Tensor(np.float64(1.0)), Tensor(np.float64(2.0))])
    assert stacked.dtype == np.float64 and stacked.tolist() == [1.0, 2.0]
    np.testing.assert_array_equal(np.zeros(3)[Tensor(np.array([True, False, True]))], 0)
    assert np.arange(5)[Tensor(np.array([4, 1]))].tolist() == [4, 1]


def test_numpy_operands_keep_the_gradient(rng):
    a = rng.standard_normal((3, 4))
    const = rng.uniform(0.5, 2.0, (3, 4))
    row = rng.standard_normal((1, 4))
    cases = [lambda t: const * t, lambda t: t * const, lambda t: const + t,
             lambda t: const - t, lambda t: const / (t * t + 1.0), lambda t: row @ t.T,
             lambda t: np.float32(2.0) * t, lambda t: np.float64(3.0) - t,
             lambda t: np.exp(t), lambda t: np.tanh(t) * const, lambda t: np.abs(t),
             lambda t: np.maximum(t, 0.1), lambda t: np.power(t, 2), lambda t: -t]
    for fn in cases:
        out = fn(Tensor(a, requires_grad=True))
        assert isinstance(out, Tensor) and out.requires_grad
        check_gradients(fn, [a])
    np.testing.assert_allclose((const * Tensor(a)).data, const * a)


def test_numpy_ufuncs_without_a_gradient(rng):
    a = rng.uniform(0.5, 2.0, (2, 3))
    t = Tensor(a, requires_grad=True)
    with pytest.raises(TypeError, match="numpy.sqrt on a Tensor that requires a gradient"):
        np.sqrt(t)
    with pytest.raises(TypeError, match="requires a gradient"):
        np.add.reduce(t)
    out = np.sqrt(t.detach())
    assert isinstance(out, Tensor) and np.allclose(out.data, np.sqrt(a))
    with no_grad():
        assert np.allclose(np.sqrt(t).data, np.sqrt(a))
    assert np.isnan(t).dtype == np.bool_ and isinstance(np.floor(t), Tensor)
    target = np.zeros((2, 3))
    target += t                                 # in place into the plain array
    assert isinstance(target, np.ndarray) and np.array_equal(target, a)
    total = 0
    total += t.detach().numpy()                 # SCN's store(): 0 += array
    assert np.array_equal(total, a)


def test_getitem_with_a_boolean_tensor(rng):
    x = rng.standard_normal((6, 3))
    labels = Tensor(np.array([1, -100, 0, 2, -100, 1]))
    keep = labels >= 0
    np.testing.assert_array_equal(Tensor(x)[keep].data, x[keep.data])
    check_gradients(lambda a: a[keep], [x])
    check_gradients(lambda a: a[1:, keep.data[:3]], [x])


def test_gpu_tensor_surface(rng, gpu_device):
    x = rng.standard_normal((4, 3)).astype(np.float32)
    t = Tensor(x, requires_grad=True)
    g = t.cuda()
    assert g.is_cuda and g.device.startswith("cuda") and g.type() == "torch.cuda.FloatTensor"
    assert t.to(gpu_device).is_cuda and t.type("torch.cuda.FloatTensor").is_cuda
    assert g.type("torch.cuda.FloatTensor").device == g.device
    with pytest.raises(TypeError, match="implicit conversion"):
        np.asarray(g)
    np.testing.assert_array_equal(g.numpy(), x)
    back = g.type("torch.FloatTensor")              # a CPU name moves it to the CPU
    assert not back.is_cuda and np.array_equal(back.data, x)
    assert g.cpu().device == "cpu" and g.size() == (4, 3) and g.max(1)[1].is_cuda
    np.testing.assert_array_equal(g.max(1)[1].numpy(), x.argmax(1))
    (g.max(1)[0].sum() + (g * 2.0).sum()).backward()
    expected = 2.0 + (np.arange(3) == x.argmax(1)[:, None])
    np.testing.assert_array_equal(t.grad, expected)
    assert (g == g).numpy().all() and g.sort(0)[1].is_cuda
    store = Tensor(np.zeros((5, 3), np.float32)).cuda()
    index = Tensor(np.array([4, 0, 4, 2])).cuda()
    source = Tensor(rng.standard_normal((4, 3)).astype(np.float32)).cuda()
    store.index_add_(0, index, source)
    expected = np.zeros((5, 3), np.float32)
    np.add.at(expected, [4, 0, 4, 2], source.numpy())
    np.testing.assert_allclose(store.numpy(), expected, rtol=1e-6)
    counts = Tensor(np.zeros(3, np.int64)).cuda().index_add_(0, index.data[:3] % 3,
                                                             index.data[:3])
    np.testing.assert_array_equal(counts.numpy(), [0, 8, 0])


# -- index_add_ -------------------------------------------------------------------------------
def _reference_index_add(base, dim, index, source, alpha=1):
    out = np.moveaxis(base.copy(), dim, 0)
    np.add.at(out, index, np.moveaxis(source, dim, 0) * alpha)
    return np.moveaxis(out, 0, dim)


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.float16, np.int64, np.int32,
                                   np.uint8])
@pytest.mark.parametrize("dim", [0, 1, -1])
def test_index_add_matches_numpy(rng, dtype, dim):
    shape = (5, 4, 3)
    base = (rng.standard_normal(shape) * 4).astype(dtype)
    n = 7
    index = rng.integers(0, shape[dim], n)                 # repeats accumulate
    source_shape = list(shape)
    source_shape[dim] = n
    source = (rng.standard_normal(source_shape) * 4).astype(dtype)
    t = Tensor(base.copy())
    data = t.data
    out = t.index_add_(dim, index, source)
    assert out is t and t.data is data                     # in place, returns self
    floating = np.dtype(dtype).kind == "f"
    wide = np.float64 if floating else np.int64         # the reference: exact sums
    for alpha in (1, 2):
        expected = _reference_index_add(base.astype(wide), dim, index, source.astype(wide),
                                        alpha).astype(dtype)
        if alpha == 1:
            t = Tensor(base.copy())
            data = t.data
            out = t.index_add_(dim, index, source)
            assert out is t and t.data is data           # in place, returns self
        else:
            t = Tensor(base.copy()).index_add_(dim, Tensor(index), Tensor(source), alpha=alpha)
        assert t.dtype == dtype
        if floating:   # float16: summed in float32 and rounded once
            tolerance = 1e-2 if dtype == np.float16 else 1e-5
            np.testing.assert_allclose(t.data, expected, rtol=tolerance, atol=tolerance)
        else:          # integers: exact, wrapping as integer arithmetic does
            np.testing.assert_array_equal(t.data, expected)


def test_index_add_is_deterministic_and_avoids_ufunc_at(rng, monkeypatch):
    store = np.zeros((1000, 20), np.float32)
    index = rng.integers(0, 1000, 30000)
    source = rng.standard_normal((30000, 20)).astype(np.float32)

    class NoAt:
        def __getattr__(self, name):
            if name == "at":
                raise AssertionError("index_add_ used np.add.at")
            return getattr(np.add, name)

    monkeypatch.setattr(np, "add", NoAt())
    first = Tensor(store.copy()).index_add_(0, index, source).data
    second = Tensor(store.copy()).index_add_(0, index, source).data
    monkeypatch.undo()
    assert np.array_equal(first, second)                   # the same bits
    reference = np.zeros((1000, 20))
    np.add.at(reference, index, source.astype(np.float64))
    np.testing.assert_allclose(first, reference, rtol=1e-4, atol=1e-4)


def test_index_add_bool_empty_and_out_of_place(rng):
    flags = Tensor(np.zeros(3, np.bool_))
    flags.index_add_(0, np.array([0, 0]), np.array([True, True]))
    np.testing.assert_array_equal(flags.data, [True, False, False])     # as torch
    base = rng.standard_normal((3, 2))
    t = Tensor(base.copy())
    t.index_add_(0, np.zeros(0, np.int64), np.zeros((0, 2)))
    np.testing.assert_array_equal(t.data, base)
    no_columns = Tensor(np.zeros((3, 0))).index_add_(0, [1, 1], np.zeros((2, 0)))
    assert no_columns.shape == (3, 0)
    src = rng.standard_normal((2, 2))
    out = Tensor(base).index_add(0, [2, 2], src)
    np.testing.assert_allclose(out.data, _reference_index_add(base, 0, [2, 2], src))
    assert out.data is not base and np.array_equal(Tensor(base).data, base)


def test_index_add_errors():
    t = Tensor(np.zeros((4, 3), np.float32))
    src = np.ones((2, 3), np.float32)
    with pytest.raises(TypeError, match=r"self \(float32\) and source \(float64\)"):
        t.index_add_(0, [0, 1], src.astype(np.float64))
    with pytest.raises(ValueError, match=r"source must have shape \(2, 3\)"):
        t.index_add_(0, [0, 1], np.ones((3, 3), np.float32))
    with pytest.raises(IndexError, match=r"values must be in \[0, 4\).*\[0, 4\]"):
        t.index_add_(0, [0, 4], src)
    with pytest.raises(IndexError, match="out of range"):
        t.index_add_(0, [-1, 0], src)
    with pytest.raises(TypeError, match="integer"):
        t.index_add_(0, np.array([0.0, 1.0]), src)
    with pytest.raises(TypeError, match="integer"):
        t.index_add_(0, [0.5, 1], src)                     # never truncated to [0, 1]
    with pytest.raises(ValueError, match="1-D"):
        t.index_add_(0, np.zeros((2, 1), np.int64), src)
    with pytest.raises(IndexError, match="out of range"):
        t.index_add_(2, [0, 1], src)
    with pytest.raises(TypeError, match="alpha must be an int"):
        Tensor(np.zeros(3, np.int64)).index_add_(0, [0], np.ones(1, np.int64), alpha=0.5)
    assert not t.data.any()                                # nothing was changed
    leaf = Tensor(np.zeros((4, 3)), requires_grad=True)
    with pytest.raises(RuntimeError, match="leaf Tensor that requires grad"):
        leaf.index_add_(0, [0], np.ones((1, 3)))
    with no_grad():                                         # allowed without recording
        leaf.index_add_(0, [0], np.ones((1, 3)))
    assert leaf.data[0].tolist() == [1.0, 1.0, 1.0] and leaf.is_leaf


def test_index_add_gradients(rng):
    base = rng.standard_normal((4, 3))
    source = rng.standard_normal((5, 3))
    index = np.array([3, 0, 3, 1, 3])
    # out of place: both inputs
    check_gradients(lambda b, s: b.index_add(0, index, s, alpha=0.5), [base, source])
    check_gradients(lambda b, s: (b * 2.0).index_add(1, [2, 2, 0], s),
                    [base, rng.standard_normal((4, 3))])

    # in place into a constant (scatter-add of a differentiable source)
    def into_zeros(s):
        store = Tensor(np.zeros((4, 3)))
        store.index_add_(0, index, s)
        return store * store

    check_gradients(into_zeros, [source])

    # in place on a non-leaf: differentiable in both
    def on_a_result(b, s):
        h = b * 3.0
        h.index_add_(0, index, s)
        return h.tanh()

    check_gradients(on_a_result, [base, source])


def test_in_place_change_after_use_is_refused_at_backward(rng):
    b = Tensor(rng.standard_normal((3, 2)), requires_grad=True)
    h = b.exp()
    used = h * 2.0                       # uses h before the in-place change
    h.index_add_(0, [0], np.ones((1, 2)))
    with pytest.raises(RuntimeError, match="modified by an in-place operation"):
        used.sum().backward()
    const = Tensor(np.ones((3, 2)))
    y = b * const                        # mul's gradient for b reads const
    const.index_add_(0, [1], np.ones((1, 2)))
    with pytest.raises(RuntimeError, match="in-place"):
        y.sum().backward()


# -- one return type through nn --------------------------------------------------------------
def test_a_model_output_means_the_same_in_training_and_evaluation(rng):
    scn.manual_seed(0)
    coords = np.unique(rng.integers(0, 8, (40, 2)), axis=0)
    coords = np.concatenate([coords, np.zeros((len(coords), 1), np.int64)], axis=1)
    feats = rng.standard_normal((len(coords), 1)).astype(np.float32)
    model = scn.Sequential(scn.InputLayer(2, 8, mode=4),
                           scn.SubmanifoldConvolution(2, 1, 4, 3, False),
                           scn.BatchNormReLU(4), scn.OutputLayer(2), scn.Linear(4, 3))
    train = model.train()([coords, feats])
    with no_grad():
        evaluation = model.eval()([coords, feats])
        evaluation_again = model([coords, feats])
    for out in (train, evaluation, evaluation_again):
        assert isinstance(out, Tensor) and isinstance(out.data, np.ndarray)
        assert isinstance(out.numpy(), np.ndarray) and out.size() == (len(coords), 3)
        predictions = out.max(1)[1]
        assert isinstance(predictions, Tensor) and predictions.dtype == np.int64
        np.testing.assert_array_equal(predictions.numpy(), out.numpy().argmax(1))
    assert train.requires_grad and not evaluation.requires_grad
    np.testing.assert_array_equal(evaluation.data, evaluation_again.data)


def test_detach_shares_the_version_counter():
    """An in-place change through a detached view is seen by backward (as in torch)."""
    w = Tensor(np.ones(3), requires_grad=True)
    c = Tensor(np.array([1.0, 2.0, 3.0]))
    y = (w * c).sum()
    c.detach().index_add_(0, np.array([0]), Tensor(np.array([10.0])))
    with pytest.raises(RuntimeError, match="in-place"):
        y.backward()
