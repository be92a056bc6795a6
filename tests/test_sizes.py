"""Allocations proportional to ``batch_size * prod(spatial_shape)`` or ``K * N`` are
estimated before they are made: above ``sparsegrid.coords.MAX_ALLOCATION_BYTES`` the op
raises MemoryError naming itself, the shape and the bytes.

None of these tests allocates the memory it is refused: the kernel that would allocate is
replaced by one that fails the test, and tracemalloc bounds the peak.
"""

import tracemalloc

import numpy as np
import pytest

import sparsegrid as sg
from sparsegrid import coords, cpu
from sparsegrid import functional as F

GIB = 2**30


@pytest.fixture(autouse=True)
def limit_16_gib(monkeypatch):
    """A fixed limit, whatever the machine's memory (the default is min(16 GiB, RAM))."""
    monkeypatch.setattr(coords, "MAX_ALLOCATION_BYTES", 16 * GIB)


def _forbid(monkeypatch, *names):
    """Make the named CPU kernels fail the test if they are reached."""
    def boom(*args, **kwargs):
        raise AssertionError("the op allocated / built before its size check")
    for name in names:
        monkeypatch.setattr(cpu, name, boom)


class _Peak:
    """Context manager asserting that the traced peak stays below ``limit`` bytes."""

    def __init__(self, limit=32 * 2**20):
        self.limit = limit

    def __enter__(self):
        tracemalloc.start()
        return self

    def __exit__(self, *exc):
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        assert peak < self.limit, f"peak {peak} bytes"
        return False


def _tensor(n_channels=2, spatial_shape=(8, 8, 8), batch_size=None, n=3):
    idx = np.zeros((n, 4), np.int32)
    idx[:, 1] = np.arange(n) % spatial_shape[0]
    idx[:, 2] = np.arange(n) // spatial_shape[0]
    return sg.SparseTensor(np.ones((n, n_channels), np.float32), idx, spatial_shape,
                           batch_size=batch_size)


# --------------------------------------------------------------------------- the helper
def test_check_allocation_message_and_bytes():
    assert coords.check_allocation("op", (4, 4), 8) == 128
    with pytest.raises(MemoryError) as info:
        coords.check_allocation("my_op", (2**20, 2**20), 4, what="a thing", hint="do less")
    message = str(info.value)
    for fragment in ("my_op would allocate a thing of shape (1048576, 1048576) at 4 bytes "
                     "per element: 4398046511104 bytes (4096.0 GiB)",
                     "sparsegrid.coords.MAX_ALLOCATION_BYTES = 17179869184 bytes (16.0 GiB)",
                     "or do less"):
        assert fragment in message, message


def test_check_allocation_uses_python_ints():
    # 2**40 * 2**40 * 8 overflows int64: must still be refused, not wrapped to a small size
    with pytest.raises(MemoryError, match=r"element: 9671406556917033397649408 bytes"):
        coords.check_allocation("op", (2**40, 2**40), 8)


def test_limit_is_overridable_and_can_be_disabled(monkeypatch):
    x = _tensor()
    monkeypatch.setattr(coords, "MAX_ALLOCATION_BYTES", 100)
    with pytest.raises(MemoryError, match=r"to_dense would allocate .* \(1, 2, 8, 8, 8\).*"
                                          r"4096 bytes, more than .* = 100 bytes"):
        x.to_dense()
    monkeypatch.setattr(coords, "MAX_ALLOCATION_BYTES", None)
    assert x.to_dense().shape == (1, 2, 8, 8, 8)


def test_default_limit_at_most_16_gib_and_physical_memory():
    default = coords._default_allocation_limit()
    assert 0 < default <= 16 * GIB
    physical = coords._physical_memory()
    if physical is not None:
        assert default <= physical


# --------------------------------------------------------------------------- dense
def test_to_dense_of_huge_grid(monkeypatch):
    """4096^3 used to raise NumPy's message naming neither to_dense nor the shape."""
    _forbid(monkeypatch, "scatter_to_dense")
    x = sg.SparseTensor(np.ones((1, 1), np.float32), np.array([[0, 1, 1, 1]]), (4096,) * 3)
    with _Peak(), pytest.raises(MemoryError) as info:
        x.to_dense()
    message = str(info.value)
    assert "to_dense would allocate a dense (B, C, *spatial_shape) array of shape " \
           "(1, 1, 4096, 4096, 4096) at 4 bytes per element: 274877906944 bytes " \
           "(256.0 GiB)" in message, message


def test_to_dense_counts_batch_channels_and_itemsize(monkeypatch):
    _forbid(monkeypatch, "scatter_to_dense")
    # 3 * 5 * 1024**3 * 8 bytes: B, C and the float64 item size all count
    idx = np.array([[0, 1, 1, 1]])
    x = sg.SparseTensor(np.ones((1, 5), np.float64), idx, (1024,) * 3, batch_size=3)
    with pytest.raises(MemoryError, match=r"\(3, 5, 1024, 1024, 1024\) at 8 bytes per "
                                          r"element: 128849018880 bytes"):
        sg.to_dense(x)


def test_from_dense_of_broadcast_view(monkeypatch):
    _forbid(monkeypatch, "dense_active_sites")
    view = np.broadcast_to(np.float32(1.0), (1, 1, 4096, 4096, 4096))
    with _Peak(), pytest.raises(MemoryError, match=r"from_dense would allocate the non-zero "
                                                   r"mask of dense of shape \(1, 1, 4096, 4096, "
                                                   r"4096\) at 1 bytes per element"):
        sg.from_dense(view)


# --------------------------------------------------------------------------- per sample
@pytest.mark.parametrize("mode,itemsize", [("max", 12), ("mean", 4), ("sum", 4)])
def test_global_pool_huge_batch_size(monkeypatch, mode, itemsize):
    """batch_size 2**31 - 1 passes validation; the (B, C) output must not be allocated."""
    _forbid(monkeypatch, "segment_reduce")
    x = _tensor(n_channels=3, batch_size=2**31 - 1)
    with _Peak(), pytest.raises(MemoryError) as info:
        sg.global_pool(x, mode)
    message = str(info.value)
    expected = (2**31 - 1) * 3 * itemsize
    assert f"global_pool would allocate the (batch_size, C) output of shape " \
           f"(2147483647, 3) at {itemsize} bytes per element: {expected} bytes" in message, \
        message
    assert "pass the actual number of samples as batch_size" in message


def test_group_norm_huge_batch_size(monkeypatch):
    _forbid(monkeypatch, "segment_reduce")
    x = _tensor(n_channels=4, batch_size=2**31 - 1)
    with _Peak(), pytest.raises(MemoryError, match=r"group_norm would allocate per-sample "
                                                   r"statistics \(batch_size, num_groups\) of "
                                                   r"shape \(2147483647, 2\)"):
        F.group_norm(x, 2)


def test_per_sample_ops_fine_at_normal_batch_size():
    x = _tensor(n_channels=4, batch_size=1000)
    assert sg.global_pool(x, "max").shape == (1000, 4)
    assert F.group_norm(x, 2).features.shape == (3, 4)


# --------------------------------------------------------------------------- rulebooks
def test_submanifold_rulebook_estimate_default_limit(monkeypatch):
    """A 301^3 filter (K = 27270901) on 100 sites: up to 21.8 GB of pairs. It used to
    spend minutes building before an empty MemoryError; now refused at once."""
    _forbid(monkeypatch, "submanifold_rules")
    idx = np.zeros((100, 4), np.int32)
    idx[:, 1] = np.arange(100)
    x = sg.SparseTensor(np.ones((100, 1), np.float32), idx, (400, 400, 400))
    k = 301**3
    weight = np.broadcast_to(np.float32(1.0), (k, 1, 1))     # a view: no memory
    with _Peak(), pytest.raises(MemoryError) as info:
        sg.submanifold_conv(x, weight, filter_size=301)
    message = str(info.value)
    for fragment in ("submanifold_conv would allocate a rulebook of up to K * N = "
                     "27270901 * 100 pairs (K = 27270901 kernel offsets, N = 100 sites)",
                     f"{k * 100 * 8} bytes", "smaller filter_size"):
        assert fragment in message, message


OPS = {   # op on a (9, 9, 9) tensor with 2 channels -> (pairs per site at most, the kernel
    # that builds its rulebook); a strided f3 s2 window: a site lies in at most 2^3 windows
    "submanifold_conv": (lambda x: sg.submanifold_conv(x, np.ones((27, 2, 1), np.float32)),
                         27, "submanifold_rules"),
    "conv": (lambda x: sg.conv(x, np.ones((27, 2, 1), np.float32), None, 3, 2), 8,
             "strided_rules"),
    "max_pool": (lambda x: sg.max_pool(x, 3, 2), 8, "strided_rules"),
    "avg_pool": (lambda x: sg.avg_pool(x, 3, 2), 8, "strided_rules"),
    "randomized_max_pool": (lambda x: F.randomized_max_pool(x, 3, 2), 27, "window_rules"),
    "randomized_conv": (lambda x: F.randomized_conv(x, np.ones((27, 2, 1), np.float32), None,
                                                    3, 2), 27, "window_rules"),
    "full_conv": (lambda x: sg.full_conv(x, np.ones((8, 2, 1), np.float32)), 8, "full_rules"),
    "permutohedral_conv": (lambda x: F.permutohedral_conv(x, np.ones((13, 2, 1), np.float32)),
                           13, "offset_rules"),
}


@pytest.mark.parametrize("name", sorted(OPS))
def test_rulebook_estimate_names_op_k_n(monkeypatch, name):
    op, k, kernel = OPS[name]
    _forbid(monkeypatch, kernel)
    x = _tensor(n_channels=2, spatial_shape=(9, 9, 9), n=50)
    monkeypatch.setattr(coords, "MAX_ALLOCATION_BYTES", 8 * k * 50 - 1)
    with pytest.raises(MemoryError) as info:
        op(x)
    message = str(info.value)
    assert message.startswith(f"{name} would allocate a rulebook of up to K * N = {k} * 50 "
                              f"pairs (K = {k} kernel offsets, N = 50 sites"), message


def test_neighbour_features_output_estimate(monkeypatch):
    _forbid(monkeypatch, "submanifold_rules")
    x = _tensor(n_channels=1, spatial_shape=(9, 9, 9), n=50)
    monkeypatch.setattr(coords, "MAX_ALLOCATION_BYTES", 50 * 27 * 4 - 1)
    with pytest.raises(MemoryError, match=r"^neighbour_features would allocate the \(N, K \* "
                                          r"C\) output of shape \(50, 27\) at 4 bytes"):
        F.neighbour_features(x)
    monkeypatch.setattr(coords, "MAX_ALLOCATION_BYTES", 50 * 27 * 8 - 1)
    with pytest.raises(MemoryError, match=r"^neighbour_features would allocate a rulebook .*"
                                          r"K = 27 kernel offsets, N = 50 sites"):
        F.neighbour_features(x)


@pytest.mark.parametrize("name", sorted(OPS))
def test_rulebook_estimate_allows_what_fits(monkeypatch, name):
    op, k, _ = OPS[name]
    x = _tensor(n_channels=2, spatial_shape=(9, 9, 9), n=50)
    monkeypatch.setattr(coords, "MAX_ALLOCATION_BYTES", 10**6)
    op(x)


def test_full_conv_counts_new_sites(monkeypatch):
    # pairs (8 bytes), new keys (8) and new int32 (1 + D) indices (16): 32 bytes per pair
    _forbid(monkeypatch, "full_rules")
    x = _tensor(n_channels=2, spatial_shape=(9, 9, 9), n=50)
    monkeypatch.setattr(coords, "MAX_ALLOCATION_BYTES", 32 * 8 * 50 - 1)
    with pytest.raises(MemoryError, match=r"full_conv would allocate a rulebook of up to "
                                          r"K \* N = 8 \* 50 pairs.*new site"):
        sg.full_conv(x, np.ones((8, 2, 1), np.float32))


def test_grid_methods_check_too(monkeypatch):
    _forbid(monkeypatch, "submanifold_rules")
    x = _tensor(n=50)
    monkeypatch.setattr(coords, "MAX_ALLOCATION_BYTES", 100)
    with pytest.raises(MemoryError, match=r"^Grid\.submanifold would allocate"):
        x.grid.submanifold(x.sites, 3)


def test_a_window_as_large_as_the_grid_is_not_refused():
    """Each site lies in one whole-grid window, so the estimate is N pairs, not K * N."""
    x = _tensor(n_channels=2, spatial_shape=(64, 64, 64), n=50)
    x = x.with_features(np.random.default_rng(3).standard_normal((50, 2)).astype(np.float32))
    pooled = sg.max_pool(x, 64, 1)
    assert pooled.features.shape == (1, 2)
    np.testing.assert_array_equal(pooled.features[0], x.features.max(axis=0))
