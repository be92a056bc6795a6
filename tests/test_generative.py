"""Generative ops: generative transposed convolution, prune, union, cat and their layers,
against dense references on the zero-filled grid, finite differences and the GPU."""

import numpy as np
import pytest

import reference as ref
import sparsegrid as sg
import sparsegrid.nn as scn
from sparsegrid import autodiff as ad, backend
from sparsegrid.autodiff.core import data_of
from sparsegrid.generative import cat, generative_transposed_conv, prune, union

SHAPES = [(7,), (5, 6), (4, 3, 5)]


def _tensor(rng, shape, batch=2, channels=3, density=0.3, dtype=np.float64, empty=()):
    idx = ref.random_sites(rng, shape, batch, density, empty_batches=empty)
    feats = rng.standard_normal((len(idx), channels)).astype(dtype)
    return sg.SparseTensor(feats, idx, shape, batch)


def _dense(x):
    return ref.to_dense(np.asarray(data_of(x.features)), x.indices, x.batch_size,
                        x.spatial_shape)


def _on(x, f):
    return x.with_features(f)


# -- generative transposed convolution ---------------------------------------------------

@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("filter_size,stride", [(2, 2), (3, 2), (2, 1), (3, 3)])
def test_generative_transposed_conv_is_the_dense_transposed_conv(rng, shape, filter_size,
                                                                  stride):
    x = _tensor(rng, shape)
    d = len(shape)
    f, s = (filter_size,) * d, (stride,) * d
    k = int(np.prod(f))
    w = rng.standard_normal((k, 3, 4))
    b = rng.standard_normal(4)
    out = generative_transposed_conv(x, w, b, filter_size, stride)
    occ = ref.transposed_occupancy(ref.occupancy(x.indices, 2, shape), f, s)
    np.testing.assert_array_equal(out.indices, ref.active_sites(occ))
    assert out.spatial_shape == tuple((n - 1) * st + ff for n, ff, st in zip(shape, f, s))
    assert out.grid is not x.grid and ref.is_lexsorted(out.indices)
    dense = ref.transposed_conv(_dense(x), w, f, s)
    np.testing.assert_allclose(out.features, ref.at_sites(dense, out.indices) + b,
                               rtol=1e-12, atol=1e-12)
    same = sg.full_conv(x, w, b, filter_size, stride)      # the same op, SCN's name
    np.testing.assert_array_equal(same.indices, out.indices)
    np.testing.assert_array_equal(same.features, out.features)


def test_generative_transposed_conv_mixed_sizes_and_gradients(rng):
    x = _tensor(rng, (3, 4), channels=2)
    w, b = rng.standard_normal((6, 2, 3)), rng.standard_normal(3)
    out = generative_transposed_conv(x, w, b, (2, 3), (1, 2))
    dense = ref.transposed_conv(_dense(x), w, (2, 3), (1, 2))
    np.testing.assert_allclose(out.features, ref.at_sites(dense, out.indices) + b, rtol=1e-12)
    ad.check_gradients(lambda f, w, b: generative_transposed_conv(
        _on(x, f), w, b, (2, 3), (1, 2)).features, [x.features, w, b])


def test_generative_transposed_conv_empty_input(rng):
    x = _tensor(rng, (4, 4), batch=2, empty=(0, 1))
    out = generative_transposed_conv(x, rng.standard_normal((4, 3, 2)), None, 2, 2)
    assert out.n_active == 0 and out.features.shape == (0, 2) and out.spatial_shape == (8, 8)


# -- prune --------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", SHAPES)
def test_prune_is_selection(rng, shape):
    x = sg.from_dense(_dense(_tensor(rng, shape)))      # sorted rows, as ops make them
    keep = rng.random(x.n_active) < 0.5
    out = prune(x, keep)
    np.testing.assert_array_equal(out.indices, x.indices[keep])
    np.testing.assert_array_equal(out.features, x.features[keep])
    assert ref.is_lexsorted(out.indices) and out.grid is not x.grid
    assert out.spatial_shape == x.spatial_shape and out.batch_size == x.batch_size
    # the result's sites are consistent: a submanifold op on them matches the dense one
    w = rng.standard_normal((3 ** len(shape), 3, 2))
    conv = sg.submanifold_conv(out, w, None, 3)
    dense = ref.submanifold_conv(_dense(out), w, (3,) * len(shape), (1,) * len(shape))
    np.testing.assert_allclose(conv.features, ref.at_sites(dense, out.indices), rtol=1e-12,
                               atol=1e-12)
    ints = prune(x, keep.astype(np.int8))
    np.testing.assert_array_equal(ints.indices, out.indices)
    listed = prune(x, keep.tolist())
    np.testing.assert_array_equal(listed.features, out.features)


def test_prune_gradient_scatters_back_with_zeros(rng):
    x = _tensor(rng, (5, 5))
    keep = np.arange(x.n_active) % 3 != 0
    ad.check_gradients(lambda f: prune(_on(x, f), keep).features, [x.features])
    f = ad.Tensor(x.features, requires_grad=True)
    out = prune(_on(x, f), keep)
    g = rng.standard_normal(out.features.shape)
    out.features.backward(g)
    expected = np.zeros_like(x.features)
    expected[keep] = g
    np.testing.assert_array_equal(f.grad, expected)


def test_prune_empty_results_and_inputs(rng):
    x = _tensor(rng, (4, 4))
    none = prune(x, np.zeros(x.n_active, bool))
    assert none.n_active == 0 and none.features.shape == (0, 3) and none.batch_size == 2
    empty = _tensor(rng, (4, 4), empty=(0, 1))
    assert prune(empty, np.zeros(0, bool)).n_active == 0
    all_kept = prune(x, np.ones(x.n_active, bool))
    np.testing.assert_array_equal(all_kept.indices, x.indices)


def test_prune_bad_masks(rng):
    x = _tensor(rng, (4, 4))
    n = x.n_active
    with pytest.raises(ValueError, match=rf"shape \({n},\)"):
        prune(x, np.ones(n + 1, bool))
    with pytest.raises(ValueError, match="shape"):
        prune(x, np.ones((n, 1), bool))
    with pytest.raises(TypeError, match="dtype float64"):
        prune(x, np.ones(n))
    with pytest.raises(ValueError, match="only 0 and 1"):
        prune(x, np.full(n, 2))
    with pytest.raises(TypeError, match="boolean"):
        prune(x, "yes")
    with pytest.raises(TypeError, match="SparseTensor"):
        prune(x.features, np.ones(n, bool))


# -- union ---------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("count", [2, 3])
def test_union_is_the_dense_sum_at_the_active_sites(rng, shape, count):
    tensors = [_tensor(rng, shape, density=0.4) for _ in range(count)]   # shuffled rows
    out = union(*tensors)
    occ = np.zeros((2, *shape), bool)
    for t in tensors:
        occ |= ref.occupancy(t.indices, 2, shape)
    np.testing.assert_array_equal(out.indices, ref.active_sites(occ))
    dense = sum(_dense(t) for t in tensors)
    np.testing.assert_allclose(out.features, ref.at_sites(dense, out.indices), rtol=1e-12,
                               atol=1e-12)
    assert all(out.grid is not t.grid for t in tensors)
    np.testing.assert_array_equal(union(tensors).features, out.features)     # a list too
    ad.check_gradients(lambda *fs: union(*[_on(t, f) for t, f in zip(tensors, fs)]).features,
                       [t.features for t in tensors])


def test_union_gradient_is_the_output_gradient_at_each_inputs_sites(rng):
    a, b = _tensor(rng, (5, 5), density=0.5), _tensor(rng, (5, 5), density=0.5)
    fa, fb = ad.Tensor(a.features, requires_grad=True), ad.Tensor(b.features, requires_grad=True)
    out = union(_on(a, fa), _on(b, fb))
    g = rng.standard_normal(out.features.shape)
    out.features.backward(g)
    rows = {tuple(r): i for i, r in enumerate(out.indices.tolist())}
    for t, f in ((a, fa), (b, fb)):
        np.testing.assert_array_equal(f.grad, g[[rows[tuple(r)] for r in t.indices.tolist()]])


def test_union_same_sites_keeps_them_and_plain_arrays_stay_plain(rng):
    x = sg.from_dense(_dense(_tensor(rng, (4, 5))))
    y = x.with_features(x.features * 2)
    out = union(x, y)
    assert out.sites is x.sites and out.grid is x.grid
    np.testing.assert_allclose(out.features, 3 * x.features)
    assert isinstance(out.features, np.ndarray)
    ad.check_gradients(lambda f, g: union(_on(x, f), _on(x, g)).features,
                       [x.features, y.features])
    f = ad.Tensor(x.features, requires_grad=True)     # the same Tensor twice: twice the grad
    union(_on(x, f), _on(x, f)).features.backward(np.ones_like(x.features))
    np.testing.assert_array_equal(f.grad, 2 * np.ones_like(x.features))
    single = union(_tensor(rng, (4, 5)))              # one tensor: its sites, sorted
    assert ref.is_lexsorted(single.indices)


def test_union_empty_inputs(rng):
    a = _tensor(rng, (4, 4), empty=(0, 1))
    b = _tensor(rng, (4, 4), empty=(1,))
    out = union(a, b)
    np.testing.assert_array_equal(out.indices, ref.active_sites(ref.occupancy(b.indices, 2,
                                                                              (4, 4))))
    both = union(a, a.with_features(a.features.copy()))
    assert both.n_active == 0 and both.features.shape == (0, 3)


def test_union_bad_inputs(rng):
    a = _tensor(rng, (4, 4))
    with pytest.raises(ValueError, match="spatial_shape"):
        union(a, _tensor(rng, (4, 5)))
    with pytest.raises(ValueError, match="batch_size"):
        union(a, _tensor(rng, (4, 4), batch=3))
    with pytest.raises(ValueError, match="n_channels"):
        union(a, _tensor(rng, (4, 4), channels=2))
    with pytest.raises(TypeError, match="dtype"):
        union(a, _tensor(rng, (4, 4), dtype=np.float32))
    with pytest.raises(TypeError, match="input 1 must be a SparseTensor"):
        union(a, a.features)
    with pytest.raises(TypeError, match="at least one"):
        union()


# -- cat -------------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", SHAPES)
def test_cat_concatenates_channels(rng, shape):
    x = _tensor(rng, shape)
    y = x.with_features(rng.standard_normal((x.n_active, 2)))
    out = cat(x, y)
    assert out.sites is x.sites and out.grid is x.grid and out.n_channels == 5
    np.testing.assert_array_equal(_dense(out), np.concatenate([_dense(x), _dense(y)], axis=1))
    rebuilt = sg.SparseTensor(y.features, x.indices, shape, 2)      # equal indices, new Sites
    np.testing.assert_array_equal(cat([x, rebuilt]).features, out.features)
    ad.check_gradients(lambda f, g: cat(_on(x, f), _on(y, g)).features,
                       [x.features, y.features])
    assert isinstance(out.features, np.ndarray)


def test_cat_refuses_other_sites(rng):
    x = _tensor(rng, (4, 4))
    with pytest.raises(ValueError, match="same row order"):
        cat(x, _tensor(rng, (4, 4)))
    perm = np.roll(np.arange(x.n_active), 1)       # the same site set in another order
    with pytest.raises(ValueError, match="same row order"):
        cat(x, sg.SparseTensor(x.features[perm], x.indices[perm], (4, 4), 2))
    with pytest.raises(TypeError, match="dtype"):
        cat(x, x.with_features(x.features.astype(np.float32)))
    empty = _tensor(rng, (4, 4), empty=(0, 1))
    assert cat(empty, empty).features.shape == (0, 6)


# -- layers ------------------------------------------------------------------------------------

def test_layers_train_a_small_generative_block(rng):
    x = _tensor(rng, (4, 4), channels=2, dtype=np.float32)
    up = scn.GenerativeConvolutionTranspose(2, 2, 3, 2, 2, True)
    assert up.__class__ is scn.FullConvolution
    y = up(x)
    score = y.features.data[:, 0]
    pruned = scn.Pruning()(y, score > 0)
    assert pruned.n_active == int((score > 0).sum())
    joined = scn.Cat()(pruned, pruned)
    assert joined.n_channels == 6
    merged = scn.Union()([pruned, scn.Pruning()(y, score <= 0)])     # everything back
    np.testing.assert_array_equal(merged.indices, y.indices)
    np.testing.assert_allclose(merged.features.data, y.features.data)
    loss = ad.sum(joined.features * joined.features) + ad.sum(merged.features)
    loss.backward()
    assert up.weight.grad is not None and np.abs(up.weight.grad).sum() > 0
    assert isinstance(scn.Union()(x).features, ad.Tensor)
    with pytest.raises(ValueError, match="same sites"):
        scn.Cat()(x, pruned)
    with pytest.raises(TypeError):
        scn.Union()()


# -- GPU (real or emulated) --------------------------------------------------------------------

def test_gpu_matches_the_cpu(gpu_device, rng):
    a, b = _tensor(rng, (5, 4, 3), density=0.4), _tensor(rng, (5, 4, 3), density=0.4)
    da, db = a.to(gpu_device), b.to(gpu_device)
    cpu, gpu = union(a, b), union(da, db)
    assert gpu.device != "cpu"
    np.testing.assert_array_equal(backend.to_numpy(gpu.indices), cpu.indices)
    np.testing.assert_allclose(backend.to_numpy(gpu.features), cpu.features, rtol=1e-12)
    keep = cpu.features[:, 0] > 0
    pc, pg = prune(cpu, keep), prune(gpu, backend.to_device(keep, gpu_device))
    np.testing.assert_array_equal(backend.to_numpy(pg.indices), pc.indices)
    np.testing.assert_allclose(backend.to_numpy(pg.features), pc.features, rtol=1e-12)
    with pytest.raises(TypeError, match="keep"):
        prune(gpu, keep)                                   # a host mask for a device tensor
    cc, cg = cat(pc, pc), cat(pg, pg)
    np.testing.assert_allclose(backend.to_numpy(cg.features), cc.features, rtol=1e-12)
    w = rng.standard_normal((8, 3, 2))
    gc, gg = generative_transposed_conv(pc, w, None), generative_transposed_conv(
        pg, backend.to_device(w, gpu_device), None)
    np.testing.assert_array_equal(backend.to_numpy(gg.indices), gc.indices)
    np.testing.assert_allclose(backend.to_numpy(gg.features), gc.features, rtol=1e-10,
                               atol=1e-12)
    with pytest.raises(TypeError):
        union(a, db)
    # gradients through union on the device equal the CPU's
    fa = ad.Tensor(da.features, requires_grad=True)
    ad.sum(union(_on(da, fa), db).features ** 2).backward()
    ra = ad.Tensor(a.features, requires_grad=True)
    ad.sum(union(_on(a, ra), b).features ** 2).backward()
    np.testing.assert_allclose(backend.to_numpy(fa.grad), ra.grad, rtol=1e-12)
    empty = _tensor(rng, (5, 4, 3), empty=(0, 1)).to(gpu_device)
    assert union(empty, empty).n_active == 0
    assert prune(empty, backend.to_device(np.zeros(0, bool), gpu_device)).n_active == 0
