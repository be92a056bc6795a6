"""sparsegrid against golden outputs of the real SparseConvNet (tests/golden/scn/*.npz).

One test per golden file (2-D cases; format in tests/golden/scn/README.md). Every case
builds its input in sparsegrid's convention (batch-FIRST int32 indices; the files have the
batch LAST), runs the op, and compares with SCN:

- output coordinates as a SET (and ours hold no duplicate site), output features BY
  COORDINATE (never by row number: SCN numbers new sites in hash / first-appearance order,
  sparsegrid sorts them);
- gradients w.r.t. input features, weight and bias. There is no autodiff yet, so gradients
  come from the backward kernels of ``sparsegrid.cpu`` called with the rulebook the op used
  (taken from the Grid's cache, so it is the very object the forward used);
- every key of every file is either used or explicitly ignored with a reason (``Golden``
  records which keys were read and the test fails on an unread one); a file that no case
  handles fails ``test_every_golden_file_has_a_case``.

Tolerance: results are float32 and the files were produced in float32 by a different
summation order, so values are compared with ``rtol = 1e-4`` and ``atol = 1e-4 * max(1,
max|expected|)`` per array (weight gradients reach ~60, so their atol is ~6e-3); copies
(to_dense, gather, max pooling values) are compared exactly; the batch-norm forward output
with rtol = atol = 5e-6 (measured error ~1e-6; the default could not see eps) and the
running statistics also through the batch statistic their update implies.

Deliberate deviations from SCN that these tests state explicitly (DESIGN.md, "nn"):

1. MaxPooling: sparsegrid returns the true maximum of the active inputs; SCN zero-fills its
   output buffer, so it returns ``max(0, true max)``. Asserted: SCN == max(0, true max)
   everywhere (the premise), ours == true max everywhere, ours == SCN where SCN > 0, and
   where SCN == 0, ours <= 0. SCN's backward gives the whole gradient to EVERY input equal
   to the output (ties included, and nothing at all when the output was clamped to 0),
   ours to one arg-max. Gradients are therefore compared with SCN only at input entries all
   of whose windows have an output > 0 with a unique arg-max; elsewhere ours is checked
   against an independent reference that routes each window's gradient to its arg-max.
2. Row order of new site sets: ours sorted by (batch, x...), SCN's hash / first-appearance
   order: compared by coordinate.
3. Deconvolution / UnPooling find their rulebook from the tensor that the matching strided
   op produced (SCN looks it up by spatial size), so the coarse input is made here by
   running sg.conv / sg.avg_pool on the finer sites (out_coords) and the golden coarse
   features are placed on its rows by coordinate.
4. BatchNorm backward in evaluation mode raises in SCN, so bnrelu_eval has no golden
   gradient; ours is checked against the closed form of the (affine + ReLU) map.
5. Grouped convolution given as a dense (K, Cin, Cout) block-diagonal weight: the
   gradient of a dense weight is non-zero off the diagonal blocks (no structural zeros),
   while SCN's ``grad_weight_kio`` is its grouped gradient laid out block-diagonally; the
   two are compared on the diagonal blocks.
"""

from __future__ import annotations

import math
import re

import numpy as np
import pytest

import sparsegrid as sg
from sparsegrid.coords import submanifold_offsets

from conftest import GOLDEN
from reference import expand_groups


# every test here runs on each available kernel set; ``kern`` is that set's module
pytestmark = pytest.mark.usefixtures("bind_kernels")
kern = None

RTOL = 1e-4
ATOL_REL = 1e-4
BN_TOL = 5e-6   # batch-norm forward only (see case_batchnorm)

# Every case listed in tests/golden/scn/README.md; the files must be exactly these.
EXPECTED_CASES = {
    *(f"2d_inputlayer_mode{m}" for m in range(5)),
    "2d_subm_f3", "2d_subm_f5", "2d_subm_f3x5", "2d_subm_f2_even", "2d_subm_f3_groups2",
    "2d_conv_f2_s2", "2d_conv_f3_s2", "2d_maxpool_f2_s2", "2d_maxpool_f3_s2",
    "2d_avgpool_f2_s2", "2d_avgpool_f3_s2", "2d_deconv_f2_s2", "2d_deconv_f3_s2",
    "2d_unpool_f2_s2", "2d_unpool_f3_s2", "2d_fullconv_f2_s2", "2d_fullconv_f3_s1",
    "2d_bn_train", "2d_bnrelu_train", "2d_bnrelu_eval", "2d_bnleaky_train",
    "2d_sparsetodense", "2d_networkinnetwork",
}


# --------------------------------------------------------------------------------------
# Golden file access and comparison helpers
# --------------------------------------------------------------------------------------

class Golden:
    """A golden .npz that records which keys a test read (so none is silently ignored)."""

    def __init__(self, path):
        self.name = path.stem
        with np.load(path) as data:
            self._data = {k: data[k] for k in data.files}
        self._read = set()

    def __getitem__(self, key):
        self._read.add(key)
        return self._data[key]

    def __contains__(self, key):
        return key in self._data

    def ignore(self, key, reason):
        """Mark a key as deliberately not compared; ``reason`` documents why."""
        assert key in self._data, f"{self.name}: ignored key {key!r} is not in the file"
        assert reason
        self._read.add(key)

    def unread(self):
        return sorted(set(self._data) - self._read)

    def ints(self, key):
        return tuple(int(v) for v in np.atleast_1d(self[key]))


def to_ours(scn_coords):
    """SCN coordinates (N, D+1), batch LAST -> sparsegrid indices int32, batch FIRST."""
    c = np.asarray(scn_coords)
    return np.ascontiguousarray(np.concatenate([c[:, -1:], c[:, :-1]], axis=1), np.int32)


def to_scn(indices):
    """sparsegrid indices (batch first) -> SCN layout (batch last), int64."""
    i = np.asarray(indices, np.int64)
    return np.concatenate([i[:, 1:], i[:, :1]], axis=1)


def _site_keys(scn_coords):
    return [tuple(r) for r in np.asarray(scn_coords, np.int64).tolist()]


def match_sites(our_indices, golden_scn_coords, what="output"):
    """Golden row of each of our rows, after asserting the two site sets are equal.

    Also asserts that neither side lists a site twice. Returns int64 (N,) ``p`` with
    ``golden[p]`` row-aligned with ours.
    """
    ours = _site_keys(to_scn(our_indices))
    gold = _site_keys(golden_scn_coords)
    assert len(set(ours)) == len(ours), f"{what}: sparsegrid lists a site twice"
    assert len(set(gold)) == len(gold), f"{what}: golden file lists a site twice"
    missing, extra = set(gold) - set(ours), set(ours) - set(gold)
    assert not missing and not extra, (
        f"{what} site sets differ: {len(missing)} golden sites missing from ours "
        f"(e.g. {sorted(missing)[:3]}), {len(extra)} extra sites in ours "
        f"(e.g. {sorted(extra)[:3]}) [coordinates as (x..., batch)]")
    row_of = {site: row for row, site in enumerate(gold)}
    return np.array([row_of[s] for s in ours], np.int64)


def assert_close(actual, expected, what, rtol=RTOL, atol=None):
    """float32 comparison: rtol 1e-4, atol 1e-4 scaled to the expected magnitude."""
    actual, expected = np.asarray(actual), np.asarray(expected)
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    if atol is None:
        atol = ATOL_REL * max(1.0, float(np.abs(expected).max(initial=0.0)))
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=atol, err_msg=what)


def tensor_from(g, coords_key="in_coords", feats_key="in_feats", spatial=None):
    """Our SparseTensor of a golden coordinate/feature pair (rows in the golden order)."""
    indices = to_ours(g[coords_key])
    if spatial is None:
        spatial = tuple(int(v) for v in indices[:, 1:].max(axis=0) + 1)
    return sg.SparseTensor(np.ascontiguousarray(g[feats_key]), indices, spatial)


def check_geometry(rulebook, in_indices, out_indices, offsets, stride, centred, what):
    """Every pair of offset k satisfies SCN's geometry for golden ``kernel_offsets[k]``.

    submanifold (``centred``): input = output + offsets[k];
    strided / pooling: input = output * stride + offsets[k];
    transposed (deconv, unpool, full): fine output = coarse input * stride + offsets[k].
    """
    assert rulebook.n_offsets == len(offsets), what
    assert rulebook.n_pairs > 0, f"{what}: empty rulebook"
    s = np.asarray(stride, np.int64)
    for k in range(rulebook.n_offsets):
        rows_in, rows_out = rulebook.pairs(k)
        a = in_indices[rows_in].astype(np.int64)
        b = out_indices[rows_out].astype(np.int64)
        assert np.array_equal(a[:, 0], b[:, 0]), f"{what}: offset {k} pairs across batches"
        if centred:
            expected_in = b[:, 1:] + offsets[k]
        elif rulebook.kind == "strided" and not rulebook.transposed:
            expected_in = b[:, 1:] * s + offsets[k]
        else:  # transposed / full: the input side is coarse
            expected_in = None
            assert np.array_equal(b[:, 1:], a[:, 1:] * s + offsets[k]), \
                f"{what}: offset {k} pairs violate fine = coarse * stride + offset"
        if expected_in is not None:
            assert np.array_equal(a[:, 1:], expected_in), \
                f"{what}: offset {k} pairs violate the kernel-offset geometry"


# --------------------------------------------------------------------------------------
# Convolutions (submanifold, strided, deconvolution, full)
# --------------------------------------------------------------------------------------

def check_weighted(g, x, apply, rulebook):
    """Compare a convolution ``apply(weight, bias) -> SparseTensor`` on input ``x``.

    Runs it twice: with ``weight_kio`` as our (K, Cin, Cout) weight and with ``weight_scn``
    as our grouped (K, G, Cin/G, Cout/G) weight (G = 1 for ungrouped cases).
    """
    groups = int(g["groups"])
    bias = g["bias"]
    q = match_sites(x.indices, g["in_coords"], "input")
    assert np.array_equal(g["weight_kio"], expand_groups(g["weight_scn"])), \
        "golden weight_kio is not the block-diagonal layout of weight_scn"
    assert g["weight_scn"].shape[1] == groups
    grad_in_expected = g["grad_in"][q]
    for form in ("kio", "scn"):
        weight = g[f"weight_{form}"]
        label = f"{g.name} [weight_{form} {weight.shape}]"
        out = apply(weight, bias)
        p = match_sites(out.indices, g["out_coords"], label)
        assert out.spatial_shape == g.ints("spatial_size_out"), label
        assert_close(out.features, g["out_feats"][p], f"{label}: output features")
        grad_out = np.ascontiguousarray(g["grad_out"][p])
        grad_in, grad_w = kern.conv_backward(grad_out, x.features, weight, rulebook)
        assert_close(grad_in, grad_in_expected, f"{label}: grad w.r.t. input features")
        expected_w = g[f"grad_weight_{form}"]
        if form == "kio" and groups > 1:  # deviation 5: compare on the diagonal blocks
            blocks = expand_groups(np.ones_like(g["weight_scn"])).astype(bool)
            assert not expected_w[~blocks].any(), "golden grad_weight_kio not block-diagonal"
            assert_close(grad_w[blocks], expected_w[blocks], f"{label}: grad weight (blocks)")
        else:
            assert_close(grad_w, expected_w, f"{label}: grad w.r.t. weight")
        assert_close(grad_out.sum(axis=0), g["grad_bias"], f"{label}: grad w.r.t. bias")


def case_submanifold(g):
    f = g.ints("filter_size")
    assert g.ints("stride") == (1,), "submanifold cases have stride 1"
    assert g.ints("spatial_size_in") == g.ints("spatial_size_out")
    offsets = g["kernel_offsets"]
    assert np.array_equal(offsets, submanifold_offsets(f, (1,) * len(f))), \
        "kernel offsets (centred, row-major, last axis fastest) differ from SCN's"
    x = tensor_from(g, spatial=g.ints("spatial_size_in"))
    rulebook = x.grid.submanifold(x.sites, f, 1)
    check_geometry(rulebook, x.indices, x.indices, offsets, 1, True, g.name)

    def apply(weight, bias):
        out = sg.submanifold_conv(x, weight, bias, filter_size=f)
        assert np.array_equal(out.indices, x.indices), "submanifold conv must keep the rows"
        return out

    check_weighted(g, x, apply, rulebook)


def case_conv(g):
    f, s = g.ints("filter_size"), g.ints("stride")
    assert np.array_equal(g["kernel_offsets"], sg.kernel_offsets(f))
    x = tensor_from(g, spatial=g.ints("spatial_size_in"))
    rulebook, out_sites = x.grid.strided(x.sites, f, s)
    check_geometry(rulebook, x.indices, out_sites.indices, g["kernel_offsets"], s, False,
                   g.name)
    check_weighted(g, x, lambda w, b: sg.conv(x, w, b, filter_size=f, stride=s), rulebook)


def coarse_from_fine(g, make_coarse):
    """Deviation 3: the coarse input of Deconvolution / UnPooling, on the fine tensor's grid.

    The fine tensor is built from ``out_coords`` (its features are irrelevant);
    ``make_coarse(fine)`` runs the matching strided op. Its sites must be the golden
    ``in_coords``; the golden ``in_feats`` are placed on its rows by coordinate.
    """
    fine_indices = to_ours(g["out_coords"])
    fine = sg.SparseTensor(np.zeros((len(fine_indices), 1), np.float32), fine_indices,
                           g.ints("spatial_size_out"))
    coarse = make_coarse(fine)
    assert coarse.spatial_shape == g.ints("spatial_size_in"), g.name
    p = match_sites(coarse.indices, g["in_coords"], f"{g.name}: coarse sites")
    return fine, coarse.with_features(np.ascontiguousarray(g["in_feats"][p]))


def case_deconv(g):
    f, s = g.ints("filter_size"), g.ints("stride")
    assert np.array_equal(g["kernel_offsets"], sg.kernel_offsets(f))
    cin = g["weight_kio"].shape[2]  # the preceding Convolution maps Cout -> Cin of deconv
    fine, coarse = coarse_from_fine(g, lambda t: sg.conv(
        t, np.zeros((math.prod(f), 1, cin), np.float32), filter_size=f, stride=s))
    rulebook, fine_sites = coarse.grid.transposed(coarse.sites, f, s)
    assert fine_sites is fine.sites, "deconv must return onto the fine tensor's sites"
    check_geometry(rulebook, coarse.indices, fine.indices, g["kernel_offsets"], s, False,
                   g.name)
    check_weighted(g, coarse, lambda w, b: sg.deconv(coarse, w, b, filter_size=f, stride=s),
                   rulebook)


def case_fullconv(g):
    f, s = g.ints("filter_size"), g.ints("stride")
    assert np.array_equal(g["kernel_offsets"], sg.kernel_offsets(f))
    x = tensor_from(g, spatial=g.ints("spatial_size_in"))
    rulebook, out_sites, _ = x.grid.full(x.sites, f, s)
    check_geometry(rulebook, x.indices, out_sites.indices, g["kernel_offsets"], s, False,
                   g.name)
    check_weighted(g, x, lambda w, b: sg.full_conv(x, w, b, filter_size=f, stride=s),
                   rulebook)


# --------------------------------------------------------------------------------------
# Pooling
# --------------------------------------------------------------------------------------

def pool_header(g):
    f, s = g.ints("filter_size"), g.ints("stride")
    assert int(g["groups"]) == 1, "pooling has no groups"
    assert np.array_equal(g["kernel_offsets"], sg.kernel_offsets(f))
    return f, s


def pooled(g, pool):
    """Run ``pool`` on the golden input; check its sites, geometry and size.

    Returns (filter, stride, input tensor, output, rulebook, golden row of each output row).
    """
    f, s = pool_header(g)
    x = tensor_from(g, spatial=g.ints("spatial_size_in"))
    out = pool(x, filter_size=f, stride=s)
    rulebook, out_sites = x.grid.strided(x.sites, f, s)
    assert out.sites is out_sites
    check_geometry(rulebook, x.indices, out_sites.indices, g["kernel_offsets"], s, False,
                   g.name)
    assert out.spatial_shape == g.ints("spatial_size_out")
    return f, s, x, out, rulebook, match_sites(out.indices, g["out_coords"], g.name)


def case_avgpool(g):
    f, s, x, out, rulebook, p = pooled(g, sg.avg_pool)
    assert_close(out.features, g["out_feats"][p], f"{g.name}: output (sum / prod(f))")
    grad_out = np.ascontiguousarray(g["grad_out"][p])
    back = rulebook.transpose()
    grad_in = kern.rule_sum(grad_out, back)
    grad_in /= np.float32(math.prod(f))
    q = match_sites(x.indices, g["in_coords"], "input")
    assert_close(grad_in, g["grad_in"][q], f"{g.name}: grad w.r.t. input features")


def case_unpool(g):
    f, s = pool_header(g)
    fine, coarse = coarse_from_fine(g, lambda t: sg.avg_pool(t, filter_size=f, stride=s))
    out = sg.unpool(coarse, filter_size=f, stride=s)
    rulebook, fine_sites = coarse.grid.transposed(coarse.sites, f, s)
    assert out.sites is fine_sites and fine_sites is fine.sites
    check_geometry(rulebook, coarse.indices, fine.indices, g["kernel_offsets"], s, False,
                   g.name)
    assert out.spatial_shape == g.ints("spatial_size_out")
    p = match_sites(out.indices, g["out_coords"], g.name)
    assert_close(out.features, g["out_feats"][p], f"{g.name}: output (sum over parents)")
    grad_out = np.ascontiguousarray(g["grad_out"][p])
    strided = rulebook.transpose()  # the AveragePooling rulebook: fine -> coarse
    grad_in = kern.rule_sum(grad_out, strided)
    q = match_sites(coarse.indices, g["in_coords"], "coarse input")
    assert_close(grad_in, g["grad_in"][q], f"{g.name}: grad w.r.t. input features")


def golden_windows(g, s):
    """Independent of our rulebooks: (n_out, K) golden input row of each window tap or -1."""
    row_of = {site: row for row, site in enumerate(_site_keys(g["in_coords"]))}
    out = np.asarray(g["out_coords"], np.int64)
    offsets = g["kernel_offsets"]
    windows = np.full((len(out), len(offsets)), -1, np.int64)
    for k, off in enumerate(offsets):
        taps = np.concatenate([out[:, :-1] * np.asarray(s) + off, out[:, -1:]], axis=1)
        windows[:, k] = [row_of.get(t, -1) for t in _site_keys(taps)]
    return windows


def case_maxpool(g):
    """Deviation 1 (see the module docstring): ours is the true max; SCN max(0, true max)."""
    f, s, x, out, rulebook, p = pooled(g, sg.max_pool)
    q = match_sites(x.indices, g["in_coords"], "input")

    # Reference from the golden coordinates alone (rows in golden order).
    in_feats, golden_out = g["in_feats"], g["out_feats"]
    windows = golden_windows(g, s)
    present = windows >= 0
    assert present.any(axis=1).all(), "every SCN output window holds an active input"
    values = np.where(present[:, :, None], in_feats[np.maximum(windows, 0)], -np.inf)
    true_max = values.max(axis=1)                                # (n_out, C)
    n_at_max = (values == true_max[:, None, :]).sum(axis=1)
    assert np.array_equal(golden_out, np.maximum(true_max, 0)), \
        "premise: SCN's MaxPooling output is max(0, true max)"

    ours = out.features
    np.testing.assert_array_equal(ours, true_max[p], err_msg="ours is the true maximum")
    clamped = golden_out[p] == 0
    assert clamped.any(), "the case should exercise SCN's clamp at 0"
    np.testing.assert_array_equal(ours[~clamped], golden_out[p][~clamped],
                                  err_msg="ours == SCN where SCN > 0")
    assert (ours[clamped] <= 0).all(), "where SCN clamps to 0 the true max is <= 0"

    # Gradients: the backward kernel, with the arg-max of the forward over the same rulebook.
    grad_out_g = g["grad_out"]
    _, argmax = kern.max_pool_forward(x.features, rulebook)
    ours_grad = kern.max_pool_backward(np.ascontiguousarray(grad_out_g[p]), argmax,
                                      rulebook.n_in)
    grad = np.empty_like(ours_grad)
    grad[q] = ours_grad                                          # golden input row order

    # Independent reference for ours: each window's gradient to its (unique) arg-max input.
    n_in, channels = in_feats.shape
    unique = n_at_max == 1
    assert unique.mean() > 0.99, "random golden inputs should rarely tie"
    reference = np.zeros((n_in, channels), np.float64)
    tied_in = np.zeros((n_in, channels), bool)
    for c in range(channels):
        tap = np.argmax(values[:, :, c], axis=1)
        winner = windows[np.arange(len(windows)), tap]
        np.add.at(reference[:, c], winner[unique[:, c]], grad_out_g[unique[:, c], c])
        for k in range(windows.shape[1]):  # inputs of a tied window: not referenced
            rows = windows[~unique[:, c] & present[:, k], k]
            tied_in[rows, c] = True
    assert_close(grad[~tied_in], reference[~tied_in].astype(np.float32),
                 f"{g.name}: our gradient goes to the true arg-max")

    # Against SCN: only input entries all of whose windows are positive with a unique arg-max.
    good = (true_max > 0) & unique
    comparable = np.ones((n_in, channels), bool)
    for k in range(windows.shape[1]):
        has = present[:, k]
        np.logical_and.at(comparable, windows[has, k], good[has])
    assert comparable.mean() > 0.5, f"too few comparable entries ({comparable.mean():.0%})"
    assert_close(grad[comparable], g["grad_in"][comparable],
                 f"{g.name}: grad w.r.t. input features (comparable entries)")


# --------------------------------------------------------------------------------------
# Input / output layers
# --------------------------------------------------------------------------------------

def case_inputlayer(g):
    mode = int(re.search(r"mode(\d)$", g.name).group(1))
    name = sg.functional.input_mode_name(mode)
    feats = np.ascontiguousarray(g["feats"])
    tensor, input_map = sg.input_layer(to_ours(g["coords"]), feats, g.ints("spatial_size"),
                                       mode=mode)
    assert input_map.n_rows == len(feats)
    p = match_sites(tensor.indices, g["out_coords"], g.name)
    assert_close(tensor.features, g["out_feats"][p], f"{g.name}: merged features")

    # Backward of the input layer: per input row, same row order as the golden coords.
    grad_in = kern.segment_reduce_backward(
        np.ascontiguousarray(g["grad_out"][p]), input_map.segment_ids, input_map.n_sites,
        "sum" if name == "unique" else name, input_map.chosen, input_map.n_rows)
    assert_close(grad_in, g["grad_in"], f"{g.name}: grad w.r.t. input rows")

    # OutputLayer round trip on the input layer's output: one row per input row.
    rows = sg.output_layer(tensor, input_map)
    assert_close(rows, g["outputlayer_out"], f"{g.name}: OutputLayer forward")
    row_grad = np.ascontiguousarray(g["outputlayer_grad_out"])
    if name in ("first", "last"):   # only the kept row received the site's features
        site_grad = row_grad[input_map.chosen]
    else:                           # every row received them: the transpose sums
        site_grad, _ = kern.segment_reduce(row_grad, input_map.segment_ids,
                                          input_map.n_sites, "sum")
    assert_close(site_grad, g["outputlayer_grad_in"][p], f"{g.name}: OutputLayer backward")


# --------------------------------------------------------------------------------------
# Batch normalisation, NetworkInNetwork, SparseToDense
# --------------------------------------------------------------------------------------

def case_batchnorm(g):
    training = bool(g["train"])
    eps, momentum, leakiness = float(g["eps"]), float(g["momentum"]), float(g["leakiness"])
    weight, bias = g["weight"], g["bias"]
    x = tensor_from(g)
    q = match_sites(x.indices, g["in_coords"], "input")
    running_mean = g["running_mean_before"].copy()
    running_var = g["running_var_before"].copy()
    out = sg.batch_norm(x, weight, bias, running_mean, running_var, training=training,
                        momentum=momentum, eps=eps, leakiness=leakiness)
    assert np.array_equal(out.indices, x.indices), "batch norm keeps the rows"
    # Tighter than the default: an elementwise map after one 400-row reduction (measured
    # error ~1e-6), while eps = 1e-4 on variances ~4 changes the output by only ~1e-5
    # relative -- the default 1e-4 could not tell eps = 0 or 2e-4 from 1e-4.
    assert_close(out.features, g["out_feats"][q], f"{g.name}: output", rtol=BN_TOL,
                 atol=BN_TOL)
    for ours_after, key in ((running_mean, "running_mean"), (running_var, "running_var")):
        before, after = g[f"{key}_before"], g[f"{key}_after"]
        assert_close(ours_after, after, f"{g.name}: {key} after")
        if training:
            # With momentum 0.99 the batch term is 1% of the update, below the tolerance
            # above (biased vs unbiased variance would differ by only 2.5e-5): compare the
            # batch statistic implied by the update, (after - m*before) / (1 - m).
            def implied(a):
                return (a.astype(np.float64) - momentum * before) / (1 - momentum)
            assert_close(implied(ours_after), implied(after),
                         f"{g.name}: batch statistic folded into {key}")
        else:
            assert np.array_equal(after, before), "golden: eval leaves running stats alone"
            np.testing.assert_array_equal(ours_after, before,
                                          err_msg=f"{g.name}: eval must not touch {key}")
    grad_out = np.ascontiguousarray(g["grad_out"][q])
    if training:
        mean, var = kern.batch_norm_statistics(x.features)
    else:
        mean, var = g["running_mean_before"], g["running_var_before"]
    grad_x, grad_w, grad_b = kern.batch_norm_backward(grad_out, x.features, mean, var, weight,
                                                     bias, eps, leakiness, training)
    if training:
        assert_close(grad_x, g["grad_in"][q], f"{g.name}: grad w.r.t. input features")
        assert_close(grad_w, g["grad_weight"], f"{g.name}: grad w.r.t. weight")
        assert_close(grad_b, g["grad_bias"], f"{g.name}: grad w.r.t. bias")
    else:
        # Deviation 4: SCN cannot backpropagate in eval mode; no golden gradient. Ours must
        # be the gradient of the affine map y = x*a + c followed by the leaky activation.
        assert "grad_in" not in g and "grad_weight" not in g
        a = weight / np.sqrt(running_var.astype(np.float64) + eps)
        y = x.features * a + (bias - running_mean * a)
        slope = np.where(y > 0, 1.0, leakiness)
        xhat = (x.features - running_mean) / np.sqrt(running_var.astype(np.float64) + eps)
        assert_close(grad_x, grad_out * slope * a, f"{g.name}: eval grad w.r.t. input")
        assert_close(grad_w, (grad_out * slope * xhat).sum(0), f"{g.name}: eval grad weight")
        assert_close(grad_b, (grad_out * slope).sum(0), f"{g.name}: eval grad bias")


def case_networkinnetwork(g):
    """Per-site linear map. The spatial shape is irrelevant (not in the file).

    No backward kernel exists for NiN itself: its gradient is that of a 1x1 convolution,
    computed with conv_backward over the 1-offset submanifold rulebook of the input.
    """
    x = tensor_from(g)
    q = match_sites(x.indices, g["in_coords"], "input")
    weight, bias = g["weight"], g["bias"]
    out = sg.network_in_network(x, weight, bias)
    assert np.array_equal(out.indices, x.indices), "NiN keeps the rows"
    assert_close(out.features, g["out_feats"][q], f"{g.name}: output")
    grad_out = np.ascontiguousarray(g["grad_out"][q])
    rulebook = x.grid.submanifold(x.sites, 1)
    grad_in, grad_w = kern.conv_backward(grad_out, x.features, weight[None], rulebook)
    assert_close(grad_in, g["grad_in"][q], f"{g.name}: grad w.r.t. input features")
    assert_close(grad_w[0], g["grad_weight"], f"{g.name}: grad w.r.t. weight")
    assert_close(grad_out.sum(axis=0), g["grad_bias"], f"{g.name}: grad w.r.t. bias")


def case_sparsetodense(g):
    """SCN: coordinate column j -> dense axis 2 + j; B from the coordinates; zeros elsewhere."""
    x = tensor_from(g, spatial=g.ints("spatial_size"))
    golden = g["out_dense"]
    dense = x.to_dense()
    assert dense.shape == golden.shape, (dense.shape, golden.shape)
    assert dense.dtype == golden.dtype
    np.testing.assert_array_equal(dense, golden, err_msg=f"{g.name}: dense layout")
    grad_in = kern.gather_from_dense(np.ascontiguousarray(g["grad_out"]), x.indices)
    q = match_sites(x.indices, g["in_coords"], "input")
    np.testing.assert_array_equal(grad_in, g["grad_in"][q], err_msg=f"{g.name}: gradient")


# --------------------------------------------------------------------------------------
# Dispatch
# --------------------------------------------------------------------------------------

HANDLERS = [
    (r"2d_inputlayer_mode[0-4]", case_inputlayer),
    (r"2d_subm_.*", case_submanifold),
    (r"2d_conv_f\d_s\d", case_conv),
    (r"2d_deconv_f\d_s\d", case_deconv),
    (r"2d_fullconv_f\d_s\d", case_fullconv),
    (r"2d_maxpool_f\d_s\d", case_maxpool),
    (r"2d_avgpool_f\d_s\d", case_avgpool),
    (r"2d_unpool_f\d_s\d", case_unpool),
    (r"2d_(bn|bnrelu|bnleaky)_(train|eval)", case_batchnorm),
    (r"2d_sparsetodense", case_sparsetodense),
    (r"2d_networkinnetwork", case_networkinnetwork),
]


def handler_for(stem):
    found = [h for pattern, h in HANDLERS if re.fullmatch(pattern, stem)]
    return found[0] if len(found) == 1 else None


GOLDEN_FILES = sorted(GOLDEN.glob("*.npz"))


def test_every_golden_file_has_a_case():
    stems = {p.stem for p in GOLDEN_FILES}
    unhandled = sorted(s for s in stems if handler_for(s) is None)
    assert not unhandled, f"golden files no test case handles: {unhandled}"
    assert stems == EXPECTED_CASES, (
        f"golden files differ from the README's cases: missing "
        f"{sorted(EXPECTED_CASES - stems)}, unexpected {sorted(stems - EXPECTED_CASES)}")


@pytest.mark.parametrize("path", GOLDEN_FILES, ids=[p.stem for p in GOLDEN_FILES])
def test_golden_scn(path):
    handler = handler_for(path.stem)
    assert handler is not None, f"no case handles {path.name}"
    g = Golden(path)
    handler(g)
    assert not g.unread(), f"{path.name}: keys not checked by the test: {g.unread()}"
