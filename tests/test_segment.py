"""Segment reductions (sparsegrid.cpu.segment) and unique_inverse against brute force."""

import subprocess
import sys

import numpy as np
import pytest

from sparsegrid.autodiff.gradcheck import numerical_gradient
from sparsegrid.cpu.index import group_rows, unique_inverse
from sparsegrid.cpu.segment import (_MAX_PASSES, SEGMENT_MODES, segment_reduce,
                                    segment_reduce_backward)

DTYPES = [np.float32, np.float64]


# --- brute-force references: a Python loop over segments, each over its rows in order ---

def segments_of(ids, n_segments):
    rows = [[] for _ in range(n_segments)]
    for r, s in enumerate(np.asarray(ids).tolist()):
        rows[s].append(r)
    return rows


def reference(values, ids, n_segments, mode):
    n, channels = values.shape
    out = np.zeros((n_segments, channels), values.dtype)
    chosen = (np.full((n_segments, channels), -1, np.int64) if mode == "max" else
              np.full(n_segments, -1, np.int64) if mode in ("first", "last") else None)
    for s, rows in enumerate(segments_of(ids, n_segments)):
        if not rows:
            continue
        if mode in ("sum", "mean"):
            total = np.zeros(channels, values.dtype)
            for r in rows:                         # in row order, in the values' dtype
                total = total + values[r]
            if mode == "mean":
                total = total / values.dtype.type(len(rows))
            out[s] = total
        elif mode in ("first", "last"):
            r = rows[0] if mode == "first" else rows[-1]
            out[s], chosen[s] = values[r], r
        else:
            for c in range(channels):
                best, arg = values[rows[0], c], rows[0]
                for r in rows[1:]:
                    x = values[r, c]
                    if x > best or (np.isnan(x) and not np.isnan(best)):
                        best, arg = x, r
                out[s, c], chosen[s, c] = best, arg
    return out, chosen


def reference_backward(grad_out, ids, n_segments, mode, chosen, n_rows):
    grad = np.zeros((n_rows, grad_out.shape[1]), grad_out.dtype)
    for s, rows in enumerate(segments_of(ids, n_segments)):
        for r in rows:
            if mode == "sum":
                grad[r] = grad_out[s]
            elif mode == "mean":
                grad[r] = grad_out[s] / grad_out.dtype.type(len(rows))
            elif mode in ("first", "last"):
                if chosen[s] == r:
                    grad[r] = grad_out[s]
            else:
                hit = chosen[s] == r
                grad[r, hit] = grad_out[s, hit]
    return grad


def assert_same(actual, expected):
    """Equal values (NaN equal to NaN), same shape and dtype."""
    assert actual.shape == expected.shape and actual.dtype == expected.dtype
    np.testing.assert_array_equal(actual, expected)


def check(values, ids, n_segments):
    for mode in SEGMENT_MODES:
        out, chosen = segment_reduce(values, ids, n_segments, mode)
        ref_out, ref_chosen = reference(values, ids, n_segments, mode)
        assert_same(out, ref_out)             # exact: same additions in the same order
        if ref_chosen is None:
            assert chosen is None
        else:
            assert_same(chosen, ref_chosen)


# --- cases -----------------------------------------------------------------------------

def make_case(rng, name, dtype):
    """(values, segment_ids, n_segments) for a named layout."""
    if name == "random":
        n, m = 300, 80
        ids = rng.integers(0, m, n)
    elif name == "many_empty":
        n, m = 120, 1000
        ids = rng.choice(rng.integers(0, m, 30), n)
    elif name == "all_unique":
        n = m = 257
        ids = rng.permutation(n)
    elif name == "identity":
        n = m = 257
        ids = np.arange(n)
    elif name == "unique_with_empty":
        n, m = 100, 250
        ids = rng.choice(m, n, replace=False)
    elif name == "one_segment":
        n, m = 10_000, 1
        ids = np.zeros(n, np.int64)
    elif name == "long_segments":         # lengths around and far above the pass bound
        lengths = [1, 2, _MAX_PASSES - 1, _MAX_PASSES, _MAX_PASSES + 1, 3 * _MAX_PASSES, 500,
                   0, 7]
        m = len(lengths) + 3
        ids = np.repeat(np.arange(len(lengths)), lengths)
        ids = rng.permutation(ids)
        n = len(ids)
    elif name == "beyond_max_id":
        n, m = 200, 500
        ids = rng.integers(0, 40, n)
    else:
        raise AssertionError(name)
    channels = 3
    # Few distinct values: many ties, so the earliest-row rule is exercised.
    values = rng.integers(-4, 5, (n, channels)).astype(dtype)
    values += rng.standard_normal((n, channels)).astype(dtype) * dtype(rng.random() < 0.5)
    return values, ids, m


CASES = ["random", "many_empty", "all_unique", "identity", "unique_with_empty",
         "one_segment", "long_segments", "beyond_max_id"]


@pytest.mark.parametrize("sorted_ids", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASES)
def test_matches_reference(rng, case, dtype, sorted_ids):
    values, ids, m = make_case(rng, case, dtype)
    if sorted_ids:
        ids = np.sort(ids)
    check(values, ids, m)


@pytest.mark.parametrize("dtype", DTYPES)
def test_random_shapes(rng, dtype):
    for _ in range(40):
        n, m, channels = int(rng.integers(1, 150)), int(rng.integers(1, 40)), int(rng.integers(1, 6))
        ids = rng.integers(0, m, n) if rng.random() < 0.7 else rng.integers(0, min(m, 3), n)
        if rng.random() < 0.3:
            ids = np.sort(ids)
        values = rng.integers(-2, 3, (n, channels)).astype(dtype)
        check(values, ids, m)


def test_max_ties_go_to_the_earliest_row():
    n = 3 * _MAX_PASSES
    values = np.zeros((n, 3))
    values[[3, 30], 0] = 5.0                  # tie within the passes and the tail
    values[[_MAX_PASSES + 2, _MAX_PASSES + 9], 1] = 5.0   # tie within the tail only
    values[[_MAX_PASSES - 1, _MAX_PASSES], 2] = 5.0       # across the boundary
    out, chosen = segment_reduce(values, np.zeros(n, np.int64), 1, "max")
    np.testing.assert_array_equal(out, [[5.0, 5.0, 5.0]])
    np.testing.assert_array_equal(chosen, [[3, _MAX_PASSES + 2, _MAX_PASSES - 1]])
    # The same segment interleaved with another (unsorted ids): still the earliest row.
    ids = np.zeros(2 * n, np.int64)
    ids[1::2] = 1
    spread = np.zeros((2 * n, 3))
    spread[1::2] = values
    out, chosen = segment_reduce(spread, ids, 2, "max")
    np.testing.assert_array_equal(chosen[1], [7, 2 * (_MAX_PASSES + 2) + 1,
                                              2 * (_MAX_PASSES - 1) + 1])
    # All equal: row 0 everywhere; interleaved segments keep their own earliest rows.
    out, chosen = segment_reduce(np.ones((6, 2)), np.array([1, 0, 1, 0, 1, 0]), 2, "max")
    np.testing.assert_array_equal(chosen, [[1, 1], [0, 0]])


@pytest.mark.parametrize("dtype", DTYPES)
def test_max_with_infinities(dtype):
    n = 2 * _MAX_PASSES + 5
    values = np.full((n, 2), -np.inf, dtype)
    ids = np.repeat([0, 1, 2], [3, 2, n - 5])
    values[4, 1] = 2.0
    values[n - 1, 0] = np.inf
    out, chosen = segment_reduce(values, ids, 4, "max")
    ref_out, ref_chosen = reference(values, ids, 4, "max")
    assert_same(out, ref_out)
    assert_same(chosen, ref_chosen)
    np.testing.assert_array_equal(out[:, 0], [-np.inf, -np.inf, np.inf, 0])
    np.testing.assert_array_equal(chosen[:, 0], [0, 3, n - 1, -1])
    np.testing.assert_array_equal(chosen[:, 1], [0, 4, 5, -1])


@pytest.mark.parametrize("dtype", DTYPES)
def test_max_nan_propagates_and_records_the_first_nan(rng, dtype):
    n = 3 * _MAX_PASSES
    values = rng.standard_normal((n, 3)).astype(dtype)
    ids = np.repeat([0, 1, 2], [4, 6, n - 10])
    values[[2, 3], 0] = np.nan                # segment 0, two NaNs: row 2 recorded
    values[9, 1] = np.nan                     # segment 1, its last row
    values[[12 + _MAX_PASSES, n - 1], 2] = np.nan   # segment 2, in the tail
    values[10, 2] = 1e30                      # larger than everything, but NaN wins
    out, chosen = segment_reduce(values, ids, 3, "max")
    ref_out, ref_chosen = reference(values, ids, 3, "max")
    assert_same(out, ref_out)
    assert_same(chosen, ref_chosen)
    assert np.isnan(out[0, 0]) and np.isnan(out[1, 1]) and np.isnan(out[2, 2])
    assert chosen[0, 0] == 2 and chosen[1, 1] == 9 and chosen[2, 2] == 12 + _MAX_PASSES
    perm = rng.permutation(n)                 # unsorted ids
    out_p, chosen_p = segment_reduce(values[perm], ids[perm], 3, "max")
    ref_out, ref_chosen = reference(values[perm], ids[perm], 3, "max")
    assert_same(out_p, ref_out)
    assert_same(chosen_p, ref_chosen)


@pytest.mark.parametrize("mode", SEGMENT_MODES)
def test_zero_rows_and_zero_channels(mode):
    for n_segments in (0, 4):
        out, chosen = segment_reduce(np.zeros((0, 3), np.float32), np.zeros(0, np.int64),
                                     n_segments, mode)
        assert out.shape == (n_segments, 3) and out.dtype == np.float32 and not out.any()
        if chosen is not None:
            assert chosen.dtype == np.int64 and (chosen == -1).all()
            assert chosen.shape == ((n_segments, 3) if mode == "max" else (n_segments,))
        grad = segment_reduce_backward(np.zeros((n_segments, 3), np.float32),
                                       np.zeros(0, np.int64), n_segments, mode, chosen, 0)
        assert grad.shape == (0, 3)
    ids = np.array([2, 0, 2, 2])
    out, chosen = segment_reduce(np.zeros((4, 0)), ids, 3, mode)
    assert out.shape == (3, 0)
    ref_out, ref_chosen = reference(np.zeros((4, 0)), ids, 3, mode)
    if ref_chosen is not None:
        assert_same(chosen, ref_chosen)
    grad = segment_reduce_backward(np.zeros((3, 0)), ids, 3, mode, chosen, 4)
    assert grad.shape == (4, 0)


@pytest.mark.parametrize("dtype", DTYPES)
def test_rounding_does_not_depend_on_the_channel_count(rng, dtype):
    # float64 with <= 4 channels uses bincount, more channels the CSR product: same sums.
    values = rng.standard_normal((2000, 6)).astype(dtype) * 1e3
    ids = rng.integers(0, 150, 2000)
    for mode in ("sum", "mean"):
        wide, _ = segment_reduce(values, ids, 150, mode)
        for c in range(6):
            narrow, _ = segment_reduce(values[:, c:c + 1], ids, 150, mode)
            assert narrow.tobytes() == np.ascontiguousarray(wide[:, c:c + 1]).tobytes()


def test_deterministic(rng):
    values = rng.standard_normal((5000, 4)).astype(np.float32)
    ids = rng.integers(0, 700, 5000)
    for mode in SEGMENT_MODES:
        first = segment_reduce(values, ids, 700, mode)
        second = segment_reduce(values.copy(), ids.copy(), 700, mode)
        assert first[0].tobytes() == second[0].tobytes()
        assert (first[1] is None) == (second[1] is None)
        if first[1] is not None:
            assert first[1].tobytes() == second[1].tobytes()


def test_identity_output_is_a_copy():
    values = np.arange(12.0).reshape(6, 2)
    out, _ = segment_reduce(values, np.arange(6), 6, "sum")
    np.testing.assert_array_equal(out, values)
    out[0, 0] = 99.0
    assert values[0, 0] == 0.0


def test_errors():
    values = np.zeros((3, 1))
    with pytest.raises(ValueError, match="mode must be one of"):
        segment_reduce(values, np.zeros(3, np.int64), 1, "median")
    with pytest.raises(ValueError, match="mode must be one of"):
        segment_reduce_backward(values, np.zeros(3, np.int64), 1, "median", None, 3)
    with pytest.raises(ValueError, match="below n_segments"):
        segment_reduce(values, np.array([0, 3, 1]), 3, "sum")


# --- backward ------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASES)
def test_backward_matches_reference(rng, case, dtype):
    values, ids, m = make_case(rng, case, dtype)
    for mode in SEGMENT_MODES:
        out, chosen = segment_reduce(values, ids, m, mode)
        grad_out = rng.standard_normal(out.shape).astype(dtype)
        grad = segment_reduce_backward(grad_out, ids, m, mode, chosen, len(values))
        assert_same(grad, reference_backward(grad_out, ids, m, mode, chosen, len(values)))


@pytest.mark.parametrize("sorted_ids", [False, True])
@pytest.mark.parametrize("mode", ["sum", "mean", "max", "first", "last"])
def test_backward_finite_differences(rng, mode, sorted_ids):
    n, m = 60, 25                              # segment 4 empty, lengths up to ~ 10
    ids = rng.integers(0, m, n)
    ids[ids == 4] = 5
    ids[:_MAX_PASSES + 3] = 7                  # one segment longer than the passes
    if sorted_ids:
        ids = np.sort(ids)
    values = rng.permutation(n * 3).reshape(n, 3) * 0.1 + rng.random((n, 3)) * 0.01
    out, chosen = segment_reduce(values, ids, m, mode)
    grad_out = rng.standard_normal(out.shape)
    grad = segment_reduce_backward(grad_out, ids, m, mode, chosen, n)
    expected = numerical_gradient(
        lambda v: float(np.sum(segment_reduce(v, ids, m, mode)[0] * grad_out)), values)
    np.testing.assert_allclose(grad, expected, rtol=1e-6, atol=1e-7)


# --- unique_inverse ------------------------------------------------------------------------

def check_unique_inverse(keys):
    unique_keys, first_rows, inverse = unique_inverse(keys)
    expected = np.unique(keys, return_index=True, return_inverse=True)
    for actual, want in zip((unique_keys, first_rows, inverse), expected):
        assert actual.dtype == np.int64
        np.testing.assert_array_equal(actual, want.reshape(-1))
    again = unique_inverse(keys.copy())
    assert all(a.tobytes() == b.tobytes() for a, b in zip(again, (unique_keys, first_rows,
                                                                  inverse)))
    return unique_keys, first_rows, inverse


@pytest.mark.parametrize("spread", ["small", "huge"])
def test_unique_inverse_matches_numpy(rng, spread):
    for n in (1, 2, 17, 1000, 50_000):
        if spread == "small":                  # unique_ranks' marks table
            keys = rng.integers(-50, 3 * n, n)
        else:                                  # unique_ranks' argsort
            keys = rng.choice(rng.integers(-2**62, 2**62, max(n // 3, 1)), n)
        unique_keys, _, _ = check_unique_inverse(keys)
        check_unique_inverse(np.sort(keys))
        check_unique_inverse(unique_keys)      # sorted and distinct: the shortcut
        distinct = rng.permutation(unique_keys)
        u, first, inverse = check_unique_inverse(distinct)
        assert len(u) == len(distinct)         # no duplicates: first_rows inverts inverse
        np.testing.assert_array_equal(first[inverse], np.arange(len(distinct)))


def test_unique_inverse_empty_and_constant():
    unique_keys, first_rows, inverse = unique_inverse(np.zeros(0, np.int64))
    assert unique_keys.shape == first_rows.shape == inverse.shape == (0,)
    assert unique_keys.dtype == first_rows.dtype == inverse.dtype == np.int64
    check_unique_inverse(np.full(10_000, 7, np.int64))
    check_unique_inverse(np.array([2**62, -2**62, 2**62, 5]))


def test_group_rows_is_a_stable_counting_sort(rng):
    ids = rng.integers(0, 300, 10_000)
    order, indptr = group_rows(ids, 400)
    np.testing.assert_array_equal(order, np.argsort(ids, kind="stable"))
    np.testing.assert_array_equal(indptr, np.r_[0, np.cumsum(np.bincount(ids, minlength=400))])
    order, indptr = group_rows(np.sort(ids), 400)
    assert order is None


def test_import_sparsegrid_does_not_import_scipy():
    code = "import sys, sparsegrid; print('scipy' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            check=True)
    assert result.stdout.strip() == "False"


def test_group_rows_without_the_compiled_routine(rng, monkeypatch):
    import sparsegrid.cpu.index as index
    ids = rng.integers(0, 50, 3000)
    fast, indptr = group_rows(ids, 60)
    monkeypatch.setattr(index, "_coo_tocsr", lambda: None)
    slow, indptr_slow = group_rows(ids, 60)
    np.testing.assert_array_equal(fast, slow)
    np.testing.assert_array_equal(indptr, indptr_slow)
    values = rng.standard_normal((3000, 3))
    for mode in SEGMENT_MODES:           # the public COO -> CSR path end to end
        out, chosen = segment_reduce(values, ids, 60, mode)
        ref_out, ref_chosen = reference(values, ids, 60, mode)
        assert_same(out, ref_out)


def test_segment_ids_must_match_the_rows():
    values = np.arange(6.0).reshape(3, 2)
    with pytest.raises(ValueError, match=r"one id per row of values \(3\); got 2"):
        segment_reduce(values, np.array([0, 1]), 3, "sum")
    with pytest.raises(ValueError, match="must be >= 0; got -1"):
        segment_reduce(values, np.array([0, -1, 1]), 3, "sum")
