"""Bad input gets a specific exception whose message names the offending argument or row.

Where the library silently accepts input it should reject (wrap-around, unvalidated data),
the test states the correct behaviour and fails until the library is fixed.
"""

import operator
import re

import numpy as np
import pytest

import sparsegrid as sg
from sparsegrid import functional as F
from sparsegrid.coords import normalize_size
from sparsegrid.rulebook import Rulebook


def _tensor(n_channels=2, dtype=np.float32, shape=(6, 6)):
    indices = np.array([[0, 0, 0], [0, 1, 2], [0, 3, 3], [1, 4, 5], [1, 2, 2]], np.int32)
    features = np.arange(len(indices) * n_channels, dtype=dtype).reshape(-1, n_channels) + 1
    return sg.SparseTensor(features, indices, shape)


def _feats(n, c=1):
    return np.ones((n, c), np.float32)


# --------------------------------------------------------------------------- indices
BUILDERS = {
    "SparseTensor": lambda f, i, s, **kw: sg.SparseTensor(f, i, s, **kw),
    "input_layer": lambda f, i, s, **kw: sg.input_layer(i, f, s, **kw),
}


@pytest.fixture(params=sorted(BUILDERS))
def build(request):
    return BUILDERS[request.param]


def test_out_of_range_coordinate_names_row(build):
    idx = np.array([[0, 1, 1], [0, 2, 2], [0, 1, 4]], np.int32)
    with pytest.raises(ValueError, match=r"row 2\b.*spatial axis 1.*spatial_shape\[1\] = 4"):
        build(_feats(3), idx, (4, 4))


def test_out_of_range_first_axis_names_row(build):
    idx = np.array([[0, 1, 1], [0, 5, 2]], np.int64)
    with pytest.raises(ValueError, match=r"row 1\b.*spatial axis 0"):
        build(_feats(2), idx, (4, 4))


def test_negative_coordinate_names_row(build):
    idx = np.array([[0, 1, 1], [0, 2, 2], [0, 3, 0], [0, -1, 0]], np.int32)
    with pytest.raises(ValueError, match=r"row 3\b.*is -1"):
        build(_feats(4), idx, (4, 4))


def test_negative_batch_index_names_row(build):
    idx = np.array([[0, 1, 1], [-2, 2, 2]], np.int32)
    with pytest.raises(ValueError, match=r"row 1\b.*batch index is -2"):
        build(_feats(2), idx, (4, 4))


def test_first_offending_row_is_named(build):
    # rows 1 and 3 are both bad: row 1 must be named
    idx = np.array([[0, 1, 1], [0, 9, 1], [0, 2, 2], [0, -1, 0]], np.int32)
    with pytest.raises(ValueError, match=r"row 1\b"):
        build(_feats(4), idx, (4, 4))


def test_batch_index_not_below_batch_size(build):
    idx = np.array([[0, 1, 1], [1, 2, 2], [3, 0, 0]], np.int32)
    with pytest.raises(ValueError, match=r"row 2\b.*batch index is 3.*batch_size 2"):
        build(_feats(3), idx, (4, 4), batch_size=2)


def test_negative_batch_size(build):
    with pytest.raises(ValueError, match="batch_size"):
        build(_feats(1), np.array([[0, 1, 1]], np.int32), (4, 4), batch_size=-1)


def test_non_integer_batch_size(build):
    with pytest.raises(TypeError, match="batch_size"):
        build(_feats(1), np.array([[0, 1, 1]], np.int32), (4, 4), batch_size=2.0)


@pytest.mark.parametrize("dtype", [np.float32, np.float64, bool])
def test_non_integer_indices_dtype(build, dtype):
    idx = np.array([[0, 1, 1], [0, 1, 0]]).astype(dtype)
    with pytest.raises(TypeError, match="indices"):
        build(_feats(2), idx, (4, 4))


@pytest.mark.parametrize("idx", [
    np.zeros((3, 2), np.int32),          # too few columns for 2-D
    np.zeros((3, 4), np.int32),          # too many
    np.zeros(3, np.int32),               # 1-D
    np.zeros((3, 3, 1), np.int32),       # 3-D
])
def test_wrong_indices_shape(build, idx):
    with pytest.raises(ValueError, match=r"indices must have shape \(N, 1 \+ D\)"):
        build(_feats(3), idx, (4, 4))


# --------------------------------------------------------------------------- features
@pytest.mark.parametrize("dtype", [np.int32, np.int64, bool, np.complex64,
                                   np.longdouble])   # float16: mixed precision (accepted)
def test_non_float_features(build, dtype):
    idx = np.array([[0, 1, 1], [0, 2, 2]], np.int32)
    with pytest.raises(TypeError, match="features"):
        build(np.ones((2, 3), dtype), idx, (4, 4))


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_features_name_row(build, bad):
    idx = np.array([[0, 1, 1], [0, 2, 2], [0, 3, 3], [0, 0, 3]], np.int32)
    f = np.ones((4, 3), np.float64)
    f[2, 1] = bad
    f[3, 0] = bad
    with pytest.raises(ValueError, match=r"features row 2 is not finite"):
        build(f, idx, (4, 4))


def test_feature_row_count_mismatch(build):
    idx = np.array([[0, 1, 1], [0, 2, 2], [0, 3, 3]], np.int32)
    with pytest.raises(ValueError, match=r"features has 2 rows but indices has 3"):
        build(_feats(2), idx, (4, 4))


def test_features_wrong_ndim(build):
    idx = np.array([[0, 1, 1], [0, 2, 2]], np.int32)
    with pytest.raises(ValueError, match=r"features must have shape \(N, C\)"):
        build(np.ones(2, np.float32), idx, (4, 4))


# --------------------------------------------------------------------------- duplicates
def test_duplicate_sites_name_both_rows():
    idx = np.array([[0, 1, 1], [0, 2, 2], [1, 1, 1], [0, 3, 3], [0, 2, 2]], np.int32)
    with pytest.raises(ValueError, match=r"rows 1 and 4 are the same site \[0, 2, 2\]"):
        sg.SparseTensor(_feats(5), idx, (4, 4))


def test_duplicate_sites_in_sorted_rows():
    idx = np.array([[0, 0, 1], [0, 2, 2], [0, 2, 2], [1, 0, 0]], np.int32)
    with pytest.raises(ValueError, match=r"rows 1 and 2 are the same site \[0, 2, 2\]"):
        sg.SparseTensor(_feats(4), idx, (4, 4))


def test_duplicate_sites_name_first_offending_row():
    # Rows 2 and 3 both repeat earlier rows; the first offending row is 2 (a copy of row 0),
    # even though the site of rows 1/3 sorts first.
    idx = np.array([[0, 3, 3], [0, 0, 0], [0, 3, 3], [0, 0, 0]], np.int32)
    with pytest.raises(ValueError, match=r"rows 0 and 2 are the same site"):
        sg.SparseTensor(_feats(4), idx, (4, 4))


@pytest.mark.parametrize("mode", [0, "unique"])
def test_input_layer_mode0_rejects_duplicates(mode):
    idx = np.array([[0, 1, 1], [0, 2, 2], [1, 1, 1], [0, 2, 2]], np.int32)
    with pytest.raises(ValueError, match=r"rows 1 and 3 are the same site.*mode 0"):
        sg.input_layer(idx, _feats(4), (4, 4), mode=mode)


@pytest.mark.parametrize("mode", [5, -1, "median", "SUM", None, 1.0, True])
def test_input_layer_unknown_mode(mode):
    idx = np.array([[0, 1, 1]], np.int32)
    with pytest.raises(ValueError, match="mode must be"):
        sg.input_layer(idx, _feats(1), (4, 4), mode=mode)


# --------------------------------------------------------------------------- spatial_shape
@pytest.mark.parametrize("shape,match", [
    ((), r"spatial_shape must have 1\.\.10 axes; got 0"),
    ((2,) * 11, r"spatial_shape must have 1\.\.10 axes; got 11"),
    ((4, 0), r"spatial_shape entries must be >= 1"),
    ((4, -3), r"spatial_shape entries must be >= 1"),
])
def test_bad_spatial_shape(build, shape, match):
    d = len(shape)
    idx = np.zeros((0, d + 1), np.int32)
    with pytest.raises(ValueError, match=match):
        build(np.zeros((0, 1), np.float32), idx, shape)


@pytest.mark.parametrize("shape", [4, (4.0, 4.0), (4, True)])
def test_spatial_shape_wrong_type(build, shape):
    with pytest.raises(TypeError, match="spatial_shape"):
        build(_feats(1), np.array([[0, 1, 1]], np.int32), shape)


def test_packing_overflow(build):
    # 2**70 cells: cannot be packed into int64 keys
    idx = np.zeros((2, 11), np.int32)
    idx[1, 1:] = 127
    with pytest.raises(ValueError, match=r"spatial_shape \(.*128.*\) with batch_size 1 cannot "
                                         r"be packed into int64"):
        build(_feats(2), idx, (2**7,) * 10)


def test_packing_overflow_message_shows_plain_ints(build):
    # the message quotes the user's spatial_shape as written, not as NumPy scalar reprs
    idx = np.zeros((1, 11), np.int32)
    with pytest.raises(ValueError) as info:
        build(_feats(1), idx, (2**7,) * 10)
    assert f"spatial_shape {(128,) * 10}" in str(info.value), str(info.value)


def test_packing_overflow_with_batch(build):
    # 2**62 cells fit, but times batch_size 4 they do not
    shape = (2**31 - 1, 2**31 - 1)
    idx = np.array([[0, 0, 0], [3, 1, 1]], np.int32)
    with pytest.raises(ValueError, match=r"batch_size 4 cannot be packed into int64"):
        build(_feats(2), idx, shape)


def test_packing_overflow_in_full_conv():
    # the input packs (2**60 cells), the full convolution's output (128**10) does not
    x = sg.SparseTensor(_feats(1), np.zeros((1, 11), np.int32), (64,) * 10)
    w = np.ones((2**10, 1, 1), np.float32)
    with pytest.raises(ValueError, match="cannot be packed into int64"):
        sg.full_conv(x, w, filter_size=2, stride=2)


def test_coordinate_beyond_int32_is_rejected_not_wrapped(build):
    # indices are stored as int32: a coordinate >= 2**31 must be rejected, never wrapped
    idx = np.array([[0, 2**31 + 5]], np.int64)
    with pytest.raises(ValueError, match=r"row 0|spatial_shape"):
        build(_feats(1), idx, (2**33,))


def test_batch_index_beyond_int32_is_rejected_not_wrapped(build):
    idx = np.array([[2**32, 1]], np.int64)
    with pytest.raises(ValueError, match=r"row 0|batch"):
        build(_feats(1), idx, (4,), batch_size=2**33)


# --------------------------------------------------------------------------- strided sizes
@pytest.mark.parametrize("op", ["conv", "max_pool", "avg_pool"])
def test_strided_size_must_fit(op):
    x = sg.SparseTensor(_feats(2), np.array([[0, 0, 0], [0, 4, 6]], np.int32), (5, 8))
    kwargs = dict(filter_size=2, stride=2)
    with pytest.raises(ValueError,
                       match=r"spatial size \(5, 8\) does not fit.*axis 0.*4 or 6"):
        if op == "conv":
            sg.conv(x, np.ones((4, 1, 1), np.float32), **kwargs)
        else:
            getattr(sg, op)(x, **kwargs)


@pytest.mark.parametrize("op", ["conv", "max_pool", "avg_pool"])
def test_strided_size_smaller_than_filter(op):
    x = sg.SparseTensor(_feats(1), np.array([[0, 0, 0]], np.int32), (7, 2))
    with pytest.raises(ValueError, match=r"axis 1.*3 or 5"):
        if op == "conv":
            sg.conv(x, np.ones((9, 1, 1), np.float32), filter_size=3, stride=2)
        else:
            getattr(sg, op)(x, filter_size=3, stride=2)


@pytest.mark.parametrize("kw,name", [({"filter_size": 0}, "filter_size"),
                                     ({"stride": 0}, "stride"),
                                     ({"filter_size": (2, 2, 2)}, "filter_size")])
def test_bad_filter_or_stride(kw, name):
    x = _tensor()
    with pytest.raises(ValueError, match=name):
        sg.max_pool(x, **kw)


def test_bad_dilation():
    x = _tensor()
    with pytest.raises(ValueError, match="dilation"):
        sg.submanifold_conv(x, np.ones((9, 2, 1), np.float32), filter_size=3, dilation=0)


# --------------------------------------------------------------------------- deconv / unpool
def test_deconv_on_input_tensor():
    x = _tensor()
    with pytest.raises(ValueError, match="Deconvolution"):
        sg.deconv(x, np.ones((4, 2, 1), np.float32), filter_size=2, stride=2)


def test_unpool_on_input_tensor():
    with pytest.raises(ValueError, match="Deconvolution"):
        sg.unpool(_tensor(), filter_size=2, stride=2)


@pytest.mark.parametrize("f,s", [(3, 2), (2, 1), (3, 1)])
def test_deconv_with_other_filter_or_stride(f, s):
    x = sg.SparseTensor(_feats(2), np.array([[0, 0, 0], [0, 5, 6]], np.int32), (7, 7))
    y = sg.max_pool(x, filter_size=3, stride=2) if (f, s) != (3, 2) else \
        sg.max_pool(x, filter_size=1, stride=2)
    k = int(np.prod(np.broadcast_to(f, 2)))
    with pytest.raises(ValueError, match="Deconvolution"):
        sg.deconv(y, np.ones((k, 1, 1), np.float32), filter_size=f, stride=s)
    with pytest.raises(ValueError, match="Deconvolution"):
        sg.unpool(y, filter_size=f, stride=s)


def test_deconv_on_full_conv_output():
    x = sg.SparseTensor(_feats(2), np.array([[0, 0, 0], [0, 3, 5]], np.int32), (4, 6))
    y = sg.full_conv(x, np.ones((4, 1, 1), np.float32), filter_size=2, stride=2)
    with pytest.raises(ValueError, match="Deconvolution"):
        sg.deconv(y, np.ones((4, 1, 1), np.float32), filter_size=2, stride=2)


def test_deconv_of_other_strided_path_to_same_size():
    # (8 - 2)/2 + 1 == (8 - 5)/1 + 1 == 4: size alone must not pick the producer
    idx = np.array([[0, 0, 0], [0, 7, 7], [0, 3, 4]], np.int32)
    x = sg.SparseTensor(_feats(3), idx, (8, 8))
    y = sg.max_pool(x, filter_size=5, stride=1)
    sg.max_pool(x, filter_size=2, stride=2)
    assert y.spatial_shape == (4, 4)
    with pytest.raises(ValueError, match="Deconvolution"):
        sg.unpool(y, filter_size=2, stride=2)


# --------------------------------------------------------------------------- weights / bias
CONV_CASES = {
    "submanifold_conv": (lambda x, w, b: sg.submanifold_conv(x, w, b, filter_size=3), 9),
    "conv": (lambda x, w, b: sg.conv(x, w, b, filter_size=2, stride=2), 4),
    "full_conv": (lambda x, w, b: sg.full_conv(x, w, b, filter_size=2, stride=2), 4),
}


@pytest.fixture(params=sorted(CONV_CASES))
def conv_case(request):
    return CONV_CASES[request.param]


def test_weight_wrong_k(conv_case):
    op, k = conv_case
    with pytest.raises(ValueError, match=rf"weight has {k + 1} kernel offsets but the filter has {k}"):
        op(_tensor(), np.ones((k + 1, 2, 3), np.float32), None)


def test_weight_wrong_cin(conv_case):
    op, k = conv_case
    with pytest.raises(ValueError, match=r"weight expects 3 input channels.*input has 2"):
        op(_tensor(), np.ones((k, 3, 3), np.float32), None)


def test_grouped_weight_wrong_cin(conv_case):
    op, k = conv_case
    with pytest.raises(ValueError, match=r"weight expects 4 input channels \(2 group"):
        op(_tensor(), np.ones((k, 2, 2, 1), np.float32), None)


@pytest.mark.parametrize("dtype", [np.float64, np.float16, np.int32])
def test_weight_wrong_dtype(conv_case, dtype):
    op, k = conv_case
    with pytest.raises(TypeError, match=r"weight must be an array of the features' dtype float32"):
        op(_tensor(), np.ones((k, 2, 3), dtype), None)


def test_weight_not_an_array(conv_case):
    op, k = conv_case
    with pytest.raises(TypeError, match="weight"):
        op(_tensor(), [[[1.0]]], None)


@pytest.mark.parametrize("ndim", [1, 2, 5])
def test_weight_wrong_ndim(conv_case, ndim):
    op, k = conv_case
    w = np.ones((k, 2, 3, 1, 1)[:ndim], np.float32)
    with pytest.raises(ValueError, match=r"weight must have shape \(K, Cin, Cout\)"):
        op(_tensor(), w, None)


@pytest.mark.parametrize("shape", [(4,), (1, 3), ()])
def test_bias_wrong_shape(conv_case, shape):
    op, k = conv_case
    with pytest.raises(ValueError, match=r"bias must have shape \(3,\)"):
        op(_tensor(), np.ones((k, 2, 3), np.float32), np.ones(shape, np.float32))


def test_bias_wrong_dtype(conv_case):
    op, k = conv_case
    with pytest.raises(TypeError, match="bias must be an array of the features' dtype"):
        op(_tensor(), np.ones((k, 2, 3), np.float32), np.ones(3, np.float64))


def test_deconv_weight_checks():
    x = _tensor()
    y = sg.conv(x, np.ones((4, 2, 2), np.float32), filter_size=2, stride=2)
    with pytest.raises(ValueError, match="kernel offsets"):
        sg.deconv(y, np.ones((9, 2, 2), np.float32), filter_size=2, stride=2)
    with pytest.raises(ValueError, match="input channels"):
        sg.deconv(y, np.ones((4, 3, 2), np.float32), filter_size=2, stride=2)
    with pytest.raises(TypeError, match="weight"):
        sg.deconv(y, np.ones((4, 2, 2), np.float64), filter_size=2, stride=2)
    with pytest.raises(ValueError, match="bias"):
        sg.deconv(y, np.ones((4, 2, 2), np.float32), np.ones(3, np.float32), 2, 2)


def test_network_in_network_checks():
    x = _tensor()
    with pytest.raises(ValueError, match=r"weight must have shape \(2, Cout\)"):
        sg.network_in_network(x, np.ones((3, 4), np.float32))
    with pytest.raises(TypeError, match="weight"):
        sg.network_in_network(x, np.ones((2, 4), np.float64))
    with pytest.raises(ValueError, match=r"bias must have shape \(4,\)"):
        sg.network_in_network(x, np.ones((2, 4), np.float32), np.ones(5, np.float32))


def test_ops_require_sparse_tensor():
    with pytest.raises(TypeError, match="x must be a SparseTensor"):
        sg.max_pool(np.ones((3, 3), np.float32))
    with pytest.raises(TypeError, match="x must be a SparseTensor"):
        sg.submanifold_conv(np.ones((3, 3), np.float32), np.ones((9, 3, 1), np.float32))


# --------------------------------------------------------------------------- pooling / norm
@pytest.mark.parametrize("op", ["max_pool", "avg_pool"])
@pytest.mark.parametrize("n", [-1, 2, 5])
def test_n_features_to_drop_out_of_range(op, n):
    x = _tensor(n_channels=2)
    with pytest.raises(ValueError, match=rf"n_features_to_drop must be in \[0, 2\); got {n}"):
        getattr(sg, op)(x, 2, 2, n)


def test_unpool_n_features_to_drop_out_of_range():
    y = sg.avg_pool(_tensor(n_channels=2), 2, 2)
    with pytest.raises(ValueError, match="n_features_to_drop"):
        sg.unpool(y, 2, 2, 2)


@pytest.mark.parametrize("name", ["weight", "bias", "running_mean", "running_var"])
@pytest.mark.parametrize("shape", [(3,), (1, 2), ()])
def test_batch_norm_parameter_shape(name, shape):
    x = _tensor(n_channels=2)
    kwargs = {name: np.ones(shape, np.float32)}
    with pytest.raises(ValueError, match=rf"{name} must have shape \(2,\)"):
        sg.batch_norm(x, **kwargs)


@pytest.mark.parametrize("given", [{}, {"running_mean": np.zeros(2, np.float32)},
                                   {"running_var": np.ones(2, np.float32)}])
def test_batch_norm_eval_needs_running_stats(given):
    with pytest.raises(ValueError, match="running_mean and running_var"):
        sg.batch_norm(_tensor(n_channels=2), training=False, **given)


def test_global_pool_unknown_mode():
    with pytest.raises(ValueError, match="mode must be"):
        sg.global_pool(_tensor(), mode="median")


# --------------------------------------------------------------------------- output layer
def test_output_layer_rejects_non_input_map():
    idx = np.array([[0, 1, 1], [0, 1, 1]], np.int32)
    x, _ = sg.input_layer(idx, _feats(2), (4, 4))
    with pytest.raises(TypeError, match="input_map must be the InputMap"):
        sg.output_layer(x, np.zeros(2, np.int64))


def test_output_layer_rejects_map_of_other_sites():
    idx = np.array([[0, 1, 1], [0, 1, 1], [0, 2, 2]], np.int32)
    x, _ = sg.input_layer(idx, _feats(3), (4, 4))
    _, other_map = sg.input_layer(idx[:2], _feats(2), (4, 4))
    with pytest.raises(ValueError, match=r"x has 2 sites but input_map maps 1"):
        sg.output_layer(x, other_map)


# --------------------------------------------------------------------------- dense
def test_asarray_raises_with_hint():
    with pytest.raises(TypeError, match=r"to_dense\(\)"):
        np.asarray(_tensor())
    with pytest.raises(TypeError, match=r"to_dense\(\)"):
        np.array(_tensor())


@pytest.mark.parametrize("shape", [(3,), (2, 3), ()])
def test_from_dense_needs_three_dims(shape):
    with pytest.raises(ValueError, match=r"dense must have shape \(B, C, S1, \.\.\., SD\)"):
        sg.from_dense(np.ones(shape, np.float32))


@pytest.mark.parametrize("dtype", [np.int32, np.int64, bool])
def test_from_dense_needs_float(dtype):
    with pytest.raises(TypeError, match="dense must be floating point"):
        sg.from_dense(np.ones((1, 1, 3, 3), dtype))


def test_from_dense_too_many_axes():
    with pytest.raises(ValueError, match="1..10 axes"):
        sg.from_dense(np.ones((1, 1) + (1,) * 11, np.float32))


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_from_dense_rejects_non_finite(bad):
    # A tensor built from user data is validated (DESIGN.md): NaN/inf features are rejected
    # by SparseTensor and input_layer, and must be by from_dense too.
    dense = np.zeros((1, 2, 3, 3), np.float32)
    dense[0, 0, 0, 0] = 1.0
    dense[0, 1, 1, 2] = bad
    with pytest.raises(ValueError, match="not finite"):
        sg.from_dense(dense)


# --------------------------------------------------------------------------- rulebook files
def test_rulebook_load_non_rulebook_npz(tmp_path):
    path = tmp_path / "other.npz"
    np.savez(path, in_idx=np.zeros(3, np.int32), something=np.ones(2))
    with pytest.raises(ValueError, match=rf"{re.escape(str(path))} is not a sparsegrid "
                                         r"rulebook file: missing \[.*'out_idx'"):
        Rulebook.load(path)


def test_rulebook_load_plain_npy(tmp_path):
    path = tmp_path / "array.npy"
    np.save(path, np.arange(3))
    with pytest.raises(ValueError, match="not a sparsegrid rulebook file"):
        Rulebook.load(path)


# --------------------------------------------------------------------------- tensor setters
def test_features_setter_rejects_wrong_rows():
    x = _tensor(n_channels=2)
    with pytest.raises(ValueError, match=r"features must have shape \(5, C\)"):
        x.features = np.ones((4, 2), np.float32)
    with pytest.raises(ValueError, match=r"features must have shape \(5, C\)"):
        x.features = np.ones(5, np.float32)


def test_with_features_rejects_wrong_rows():
    x = _tensor(n_channels=2)
    with pytest.raises(ValueError, match=r"features must have shape \(5, C\)"):
        x.with_features(np.ones((6, 2), np.float32))


def test_functional_input_mode_name():
    assert F.input_mode_name(1) == "first"
    assert F.input_mode_name(np.int64(2)) == "last"
    assert F.input_mode_name("max") == "max"
    with pytest.raises(ValueError, match="mode must be"):
        F.input_mode_name(np.int64(7))


def test_finite_features_whose_sum_overflows_are_accepted():
    """The one-pass finiteness check falls back to the element-wise one when a sum of
    finite values overflows: huge finite features are valid, with no warning."""
    import warnings
    big = np.full((3, 2), 3e38, np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        x = sg.SparseTensor(big, np.array([[0, 0], [0, 1], [0, 2]]), (3,))
    assert x.n_active == 3
    bad = big.copy()
    bad[2, 1] = np.nan
    with pytest.raises(ValueError, match="features row 2 is not finite"):
        sg.SparseTensor(bad, np.array([[0, 0], [0, 1], [0, 2]]), (3,))
    opposite = np.array([[np.inf], [-np.inf]], np.float32)     # sums to NaN
    with pytest.raises(ValueError, match="features row 0 is not finite"):
        sg.SparseTensor(opposite, np.array([[0, 0], [0, 1]]), (2,))


# =========================================================================== hardening
# Scalar arguments, per-channel parameters, input maps, replacement features and spatial
# shapes: each bad argument raises naming the argument, the expectation and what was given,
# before any work.
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from sparsegrid.autodiff.core import Tensor  # noqa: E402

_FAST = settings(max_examples=40, deadline=None,
                 suppress_health_check=[HealthCheck.function_scoped_fixture])


# --------------------------------------------------------------------------- batch_norm
@pytest.mark.parametrize("kw,exc,match", [
    ({"eps": 0}, ValueError, r"eps must be a finite positive number; got 0\.0"),
    ({"eps": -1e-5}, ValueError, r"eps must be a finite positive number; got -1e-05"),
    ({"eps": np.nan}, ValueError, r"eps must be a finite positive number; got nan"),
    ({"eps": np.inf}, ValueError, r"eps must be a finite positive number; got inf"),
    ({"eps": "1e-4"}, TypeError, r"eps must be a real number; got str '1e-4'"),
    ({"eps": None}, TypeError, r"eps must be a real number; got NoneType"),
    ({"eps": True}, TypeError, r"eps must be a real number; got bool"),
    ({"momentum": 1.5}, ValueError, r"momentum must be in \[0, 1\]; got 1\.5"),
    ({"momentum": -0.1}, ValueError, r"momentum must be in \[0, 1\]; got -0\.1"),
    ({"momentum": np.nan}, ValueError, r"momentum must be in \[0, 1\]; got nan"),
    ({"momentum": [0.9]}, TypeError, r"momentum must be a real number; got list"),
    ({"leakiness": np.inf}, ValueError, r"leakiness must be a finite number; got inf"),
    ({"leakiness": np.nan}, ValueError, r"leakiness must be a finite number; got nan"),
    ({"leakiness": 1j}, TypeError, r"leakiness must be a real number; got complex"),
    ({"training": "yes"}, TypeError, r"training must be a bool; got str 'yes'"),
    ({"training": None}, TypeError, r"training must be a bool; got NoneType"),
])
def test_batch_norm_bad_scalars(kw, exc, match):
    with pytest.raises(exc, match=match):
        sg.batch_norm(_tensor(n_channels=2), **kw)


def test_batch_norm_accepts_numpy_scalars_and_bounds():
    x = _tensor(n_channels=2)
    sg.batch_norm(x, momentum=np.float32(0.0), eps=np.float64(1e-3), leakiness=np.int64(0))
    sg.batch_norm(x, momentum=1, eps=1, leakiness=-2.5, training=np.bool_(True))


@pytest.mark.parametrize("name", ["weight", "bias", "running_mean", "running_var"])
@pytest.mark.parametrize("dtype,hint", [
    (np.float64, r" \(the parameters are float64: cast the input features with "
                 r"\.astype\(np\.float64\), or the parameters with \.astype\(np\.float32\); "
                 r"for a Module, module\.float\(\)\)"),      # silently accepted before
    (np.int64, ""),                                            # NumPy's UFuncTypeError before
    (np.complex64, ""),                                        # warned, dropped imag before
    (object, ""),                                              # accepted before
    (np.float16, r" \(the parameters are float16: cast the input features with "
                 r"\.astype\(np\.float16\), or the parameters with \.astype\(np\.float32\); "
                 r"for a Module, module\.float\(\)\)"),     # float16: mixed precision
])
def test_batch_norm_parameter_dtype(name, dtype, hint):
    x = _tensor(n_channels=2)
    with pytest.raises(TypeError, match=rf"^{name} must be an array of the features' dtype "
                                        rf"float32; got {np.dtype(dtype)}{hint}$"):
        sg.batch_norm(x, **{name: np.ones(2, dtype)})


@pytest.mark.parametrize("name", ["weight", "bias", "running_mean", "running_var"])
def test_batch_norm_parameter_not_an_array(name):
    with pytest.raises(TypeError, match=rf"{name} must be a NumPy/CuPy array or an autodiff "
                                        r"Tensor of shape \(2,\).*got list"):
        sg.batch_norm(_tensor(n_channels=2), **{name: [1.0, 1.0]})


def test_batch_norm_float64_parameters_on_float64_features():
    x = _tensor(n_channels=2, dtype=np.float64)
    rm, rv = np.zeros(2), np.ones(2)
    sg.batch_norm(x, np.ones(2), np.zeros(2), rm, rv)
    assert rm.any()
    with pytest.raises(TypeError, match="running_mean must be an array of the features' "
                                        "dtype float64; got float32"):
        sg.batch_norm(x, running_mean=np.zeros(2, np.float32))


@pytest.mark.parametrize("name", ["running_mean", "running_var"])
def test_batch_norm_running_stats_must_be_writeable_in_training(name):
    x = _tensor(n_channels=2)
    stat = np.ones(2, np.float32)
    stat.flags.writeable = False
    with pytest.raises(ValueError, match=rf"{name} must be a writeable array: batch_norm "
                                         r"updates it in place"):
        sg.batch_norm(x, **{name: stat})
    # evaluation only reads them
    other = np.ones(2, np.float32)
    stats = {"running_mean": other, "running_var": other, name: stat}
    sg.batch_norm(x, training=False, **stats)


def test_batch_norm_rejects_before_updating_running_stats():
    x = _tensor(n_channels=2)
    rm, rv = np.zeros(2, np.float32), np.ones(2, np.float32)
    with pytest.raises(TypeError, match="bias"):
        sg.batch_norm(x, np.ones(2, np.float32), np.zeros(2, np.float64), rm, rv)
    np.testing.assert_array_equal(rm, 0)
    np.testing.assert_array_equal(rv, 1)


def test_batch_norm_accepts_autodiff_tensors():
    x = _tensor(n_channels=2)
    rm, rv = Tensor(np.zeros(2, np.float32)), Tensor(np.ones(2, np.float32))
    w = Tensor(np.ones(2, np.float32), requires_grad=True)
    out = sg.batch_norm(x, w, Tensor(np.zeros(2, np.float32)), rm, rv)
    assert isinstance(out.features, Tensor)
    assert rm.data.any()                      # updated in place, through the Tensor
    with pytest.raises(TypeError, match="weight must be an array of the features' dtype"):
        sg.batch_norm(x, Tensor(np.ones(2, np.float64)))


_bad_number = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True).filter(lambda v: not np.isfinite(v)),
    st.text(max_size=3), st.none(), st.booleans(), st.complex_numbers(),
    st.lists(st.floats(0, 1), min_size=1, max_size=2))


@_FAST
@given(name=st.sampled_from(["eps", "momentum", "leakiness"]), value=_bad_number)
def test_batch_norm_bad_scalars_property(name, value):
    with pytest.raises((TypeError, ValueError), match=rf"^{name} must be "):
        sg.batch_norm(_tensor(n_channels=2), **{name: value})


@_FAST
@given(eps=st.floats(max_value=0.0, allow_nan=False))
def test_batch_norm_non_positive_eps_property(eps):
    with pytest.raises(ValueError, match=r"^eps must be a finite positive number; got "):
        sg.batch_norm(_tensor(n_channels=2), eps=eps)


@_FAST
@given(momentum=st.floats(allow_nan=False).filter(lambda v: not 0 <= v <= 1))
def test_batch_norm_momentum_out_of_range_property(momentum):
    with pytest.raises(ValueError, match=r"^momentum must be in \[0, 1\]; got "):
        sg.batch_norm(_tensor(n_channels=2), momentum=momentum)


_dtypes = st.sampled_from([np.float16, np.float64, np.int8, np.int32, np.int64, np.uint8,
                           bool, np.complex64, np.complex128, object])
_shapes = st.lists(st.integers(0, 3), max_size=3).map(tuple).filter(lambda s: s != (2,))


@_FAST
@given(name=st.sampled_from(["weight", "bias", "running_mean", "running_var"]),
       dtype=_dtypes, shape=st.one_of(st.just((2,)), _shapes))
def test_batch_norm_bad_parameter_property(name, dtype, shape):
    value = np.zeros(shape, dtype)
    if shape != (2,):
        with pytest.raises(ValueError, match=rf"^{name} must have shape \(2,\); got "
                                             rf"{re.escape(str(shape))}"):
            sg.batch_norm(_tensor(n_channels=2), **{name: value})
    else:
        with pytest.raises(TypeError, match=rf"^{name} must be an array of the features' "
                                            rf"dtype float32; got {np.dtype(dtype)}"):
            sg.batch_norm(_tensor(n_channels=2), **{name: value})


# --------------------------------------------------------------------------- group_norm
@pytest.mark.parametrize("kw,exc,match", [
    ({"num_groups": 2.0}, TypeError, r"num_groups must be an int; got float 2\.0"),
    ({"num_groups": True}, TypeError, r"num_groups must be an int; got bool"),
    ({"num_groups": "2"}, TypeError, r"num_groups must be an int; got str '2'"),
    ({"num_groups": 0}, ValueError, r"num_groups must be a positive divisor of the 4 "
                                    r"channels; got 0"),
    ({"num_groups": 3}, ValueError, r"positive divisor of the 4 channels; got 3"),
    ({"num_groups": 2, "eps": 0.0}, ValueError, r"eps must be a finite positive number"),
    ({"num_groups": 2, "eps": np.nan}, ValueError, r"eps must be a finite positive number"),
    ({"num_groups": 2, "eps": "x"}, TypeError, r"eps must be a real number; got str"),
    ({"num_groups": 2, "weight": np.ones(4, np.float64)}, TypeError,
     r"weight must be an array of the features' dtype float32; got float64"),
    ({"num_groups": 2, "bias": np.ones(4, np.int64)}, TypeError,
     r"bias must be an array of the features' dtype float32; got int64"),
    ({"num_groups": 2, "bias": np.ones(3, np.float32)}, ValueError,
     r"bias must have shape \(4,\); got \(3,\)"),
    ({"num_groups": 2, "weight": [1.0] * 4}, TypeError,
     r"weight must be a NumPy/CuPy array or an autodiff Tensor"),
])
def test_group_norm_bad_arguments(kw, exc, match):
    with pytest.raises(exc, match=match):
        F.group_norm(_tensor(n_channels=4), **kw)


@_FAST
@given(num_groups=st.one_of(st.floats(), st.text(max_size=2), st.none(), st.booleans()),
       eps=st.one_of(st.just(1e-5), _bad_number))
def test_group_norm_bad_scalars_property(num_groups, eps):
    with pytest.raises(TypeError, match=r"^num_groups must be an int; got "):
        F.group_norm(_tensor(n_channels=4), num_groups, eps=eps)


@_FAST
@given(eps=_bad_number)
def test_group_norm_bad_eps_property(eps):
    with pytest.raises((TypeError, ValueError), match=r"^eps must be "):
        F.group_norm(_tensor(n_channels=4), 2, eps=eps)


# --------------------------------------------------------------------------- global_pool
@pytest.mark.parametrize("mode", [3, None, 1.0, ["max"], np.array(["max", "sum"]), b"max"])
def test_global_pool_non_string_mode(mode):
    with pytest.raises(TypeError, match=r"mode must be a str, one of 'max', 'mean' or 'sum'; "
                                        rf"got {type(mode).__name__}"):
        sg.global_pool(_tensor(), mode=mode)


@_FAST
@given(mode=st.one_of(st.text(max_size=5).filter(lambda m: m not in ("max", "mean", "sum")),
                      st.integers(), st.floats(), st.none(), st.lists(st.text(), max_size=2)))
def test_global_pool_bad_mode_property(mode):
    exc = ValueError if isinstance(mode, str) else TypeError
    with pytest.raises(exc, match=r"^mode must be "):
        sg.global_pool(_tensor(), mode=mode)


# --------------------------------------------------------------------------- other scalars
@pytest.mark.parametrize("rng", [0, "seed", np.random])
def test_randomized_ops_check_rng(rng):
    x = sg.SparseTensor(_feats(2), np.array([[0, 0, 0], [0, 4, 4]], np.int32), (5, 5))
    with pytest.raises(TypeError, match=r"rng must be a numpy\.random\.Generator"):
        sg.functional.randomized_max_pool(x, 3, 2, rng=rng)
    with pytest.raises(TypeError, match=r"rng must be a numpy\.random\.Generator"):
        sg.functional.randomized_conv(x, np.ones((9, 1, 1), np.float32), None, 3, 2, rng=rng)


@pytest.mark.parametrize("mode", [np.array(["sum", "max"]), ["sum"], np.bool_(True)])
def test_input_layer_mode_of_other_types(mode):
    with pytest.raises(ValueError, match="mode must be 0..4"):
        sg.input_layer(np.array([[0, 1, 1]], np.int32), _feats(1), (4, 4), mode=mode)


# --------------------------------------------------------------------------- output_layer
def test_output_layer_rejects_other_batch_with_same_site_count():
    # two batches, 2 sites each: the map of the first must not un-merge the second
    idx_a = np.array([[0, 1, 1], [0, 1, 1], [0, 2, 2]], np.int32)
    idx_b = np.array([[0, 3, 3], [0, 0, 0], [0, 0, 0]], np.int32)
    a, map_a = sg.input_layer(idx_a, _feats(3), (4, 4))
    b, _ = sg.input_layer(idx_b, _feats(3), (4, 4))
    assert a.n_active == b.n_active == map_a.n_sites == 2
    with pytest.raises(ValueError, match=r"x is not on the sites input_layer made with this "
                                         r"input_map: both have 2 sites"):
        sg.output_layer(b, map_a)
    # a tensor rebuilt on identical indices (another Sites object) is accepted: see
    # test_output_layer_accepts_tensor_rebuilt_on_identical_indices


def test_output_layer_accepts_tensor_on_the_input_sites():
    idx = np.array([[0, 1, 1], [0, 1, 1], [0, 2, 2]], np.int32)
    x, input_map = sg.input_layer(idx, _feats(3), (4, 4), mode="sum")
    assert input_map.sites is x.sites
    y = sg.submanifold_conv(x, np.ones((9, 1, 2), np.float32), filter_size=3)
    y = sg.batch_norm(y)
    rows = sg.output_layer(y, input_map)
    assert rows.shape == (3, 2)
    np.testing.assert_array_equal(rows[0], rows[1])
    # InputMap keeps its attributes
    assert (input_map.mode, input_map.n_rows, input_map.n_sites) == ("sum", 3, 2)
    assert input_map.segment_ids.tolist() == [0, 0, 1]


# --------------------------------------------------------------------------- with_features
@pytest.mark.parametrize("how", ["with_features", "setter"])
@pytest.mark.parametrize("value,exc,match", [
    ([[1.0, 2.0]] * 5, TypeError, r"features must be a NumPy/CuPy array or an autodiff "
                                  r"Tensor of shape \(5, C\).*got list"),
    ((1.0,), TypeError, r"features must be a NumPy/CuPy array.*got tuple"),
    (None, TypeError, r"features must be a NumPy/CuPy array.*got NoneType"),
    (3.0, TypeError, r"features must be a NumPy/CuPy array.*got float"),
    (np.ones((5, 2), np.int64), TypeError, r"features must be a float32 or float64 array.*"
                                           r"got dtype int64"),
    (np.ones((5, 2), np.int8), TypeError, r"got dtype int8"),  # float16 is accepted
    (np.ones((5, 2), np.complex64), TypeError, r"got dtype complex64"),
    (np.ones((5, 2), object), TypeError, r"got dtype object"),
    (np.ones((5, 2, 1), np.float32), ValueError, r"features must have shape \(5, C\).*"
                                                 r"got \(5, 2, 1\)"),
    (np.ones((4, 2), np.float32), ValueError, r"features must have shape \(5, C\)"),
    (np.float32(1.0), TypeError, r"features must be a NumPy/CuPy array.*got float32"),
    (Tensor(np.ones((5, 2), np.int32)), TypeError, r"got dtype int32"),
])
def test_replacement_features_checked(how, value, exc, match):
    x = _tensor(n_channels=2)
    with pytest.raises(exc, match=match):
        if how == "with_features":
            x.with_features(value)
        else:
            x.features = value
    assert x.features.dtype == np.float32 and x.features.shape == (5, 2)   # unchanged


def test_replacement_features_zero_copy_and_tensor():
    x = _tensor(n_channels=2)
    new = np.zeros((5, 3), np.float64)
    y = x.with_features(new)
    assert y.features is new and y.sites is x.sites and y.grid is x.grid
    new[0, 0] = 7.0                                   # documented: no copy
    assert y.features[0, 0] == 7.0
    t = Tensor(np.ones((5, 1), np.float32), requires_grad=True)
    x.features = t
    assert x.features is t


@_FAST
@given(value=st.one_of(
    st.none(), st.floats(), st.text(max_size=3), st.lists(st.floats(), max_size=3),
    st.tuples(_dtypes, st.lists(st.integers(0, 6), min_size=0, max_size=3).map(tuple))))
def test_with_features_property(value):
    x = _tensor(n_channels=2)
    if isinstance(value, tuple):
        dtype, shape = value
        value = np.zeros(shape, dtype)
        ok_dtype = value.dtype in (np.float16, np.float32, np.float64)
        ok_shape = value.ndim == 2 and value.shape[0] == 5
        if ok_dtype and ok_shape:
            assert x.with_features(value).features is value
            return
        exc, match = (TypeError, r"^features must be a float32 or float64 array") \
            if not ok_dtype else (ValueError, r"^features must have shape \(5, C\)")
    else:
        exc, match = TypeError, r"^features must be a NumPy/CuPy array"
    with pytest.raises(exc, match=match):
        x.with_features(value)


# --------------------------------------------------------------------------- spatial_shape
@pytest.mark.parametrize("shape,match", [
    (None, r"spatial_shape must be a sequence of ints \(one per spatial axis\); got "
           r"NoneType None"),
    (4.0, r"got float 4\.0"),
    ("44", r"got str '44'"),
    (b"44", r"got bytes"),
    ([[4, 4]], r"got list \[\[4, 4\]\], whose entry 0 is list"),
    ((4, 4.5), r"whose entry 1 is float 4\.5"),
    ((4, None), r"whose entry 1 is NoneType"),
    (np.array(4), r"e\.g\. a 1-D integer array; got ndarray of shape \(\) and dtype int64"),
    (np.array([[4, 4]]), r"got ndarray of shape \(1, 2\)"),
    (np.array([4.0, 4.0]), r"spatial_shape"),
    (object(), r"got object"),
])
def test_spatial_shape_type_errors(build, shape, match):
    with pytest.raises(TypeError, match=match):
        build(_feats(1), np.array([[0, 1, 1]], np.int32), shape)


def test_spatial_shape_integer_array_accepted():
    x = sg.SparseTensor(_feats(1), np.array([[0, 1, 1]], np.int32), np.array([4, 5]))
    assert x.spatial_shape == (4, 5) and all(type(s) is int for s in x.spatial_shape)


@pytest.mark.parametrize("size", [None, "3", 3.0, np.array([[3, 3]]), (3, None)])
def test_filter_size_type_errors(size):
    with pytest.raises(TypeError, match="filter_size must be an int or a sequence of 2 ints"):
        sg.max_pool(_tensor(), filter_size=size)


# --------------------------------------------------------------------------- weight first
@pytest.mark.parametrize("op", ["submanifold_conv", "conv", "full_conv", "deconv",
                                "randomized_conv"])
def test_weight_checked_before_rulebook(op, monkeypatch):
    """A (27, 1, 1) weight with a 301^3 filter: refused at once (it used to build a
    27-million-offset rulebook for minutes before an empty MemoryError)."""
    from sparsegrid import cpu
    x = sg.SparseTensor(_feats(2), np.array([[0, 1, 1, 1], [0, 300, 300, 300]], np.int32),
                        (301, 301, 301))
    y = sg.conv(x, np.ones((1, 1, 1), np.float32), filter_size=1, stride=1)

    def boom(*args, **kwargs):
        raise AssertionError("a rulebook was built before the weight was checked")

    for name in ("submanifold_rules", "strided_rules", "window_rules", "full_rules"):
        monkeypatch.setattr(cpu, name, boom)
    target = y if op == "deconv" else x
    kwargs = {"filter_size": 301} if op == "submanifold_conv" else \
        {"filter_size": 301, "stride": 1}
    with pytest.raises(ValueError, match=r"weight has 27 kernel offsets but the filter has "
                                         r"27270901"):
        getattr(sg.functional, op)(target, np.ones((27, 1, 1), np.float32), **kwargs)


def test_permutohedral_weight_checked_before_rulebook(monkeypatch):
    from sparsegrid import cpu
    monkeypatch.setattr(cpu, "offset_rules", lambda *a: (_ for _ in ()).throw(AssertionError))
    with pytest.raises(ValueError, match=r"weight has 9 kernel offsets but the filter has 7"):
        F.permutohedral_conv(_tensor(), np.ones((9, 2, 1), np.float32))


@pytest.mark.parametrize("op", ["max_pool", "avg_pool"])
def test_n_features_to_drop_checked_before_rulebook(op, monkeypatch):
    from sparsegrid import cpu
    monkeypatch.setattr(cpu, "strided_rules", lambda *a: (_ for _ in ()).throw(AssertionError))
    with pytest.raises(ValueError, match="n_features_to_drop"):
        getattr(sg, op)(_tensor(n_channels=2), 2, 2, 7)


# ----------------------------------------------- regressions: valid inputs accepted again
class _TorchLikeInt:
    """A torch 0-d int tensor stand-in: ``dtype`` with no ``.kind``, ``ndim`` 0, ``item()``
    and ``__index__``."""

    class _Dtype:
        def __str__(self):
            return "torch.int64"

    def __init__(self, value, dtype=None):
        self.value, self.ndim = value, 0
        self.dtype = dtype if dtype is not None else self._Dtype()
        self.shape = ()

    def item(self):
        return self.value

    def __index__(self):
        return operator.index(self.value)


class _TorchLikeFloat(_TorchLikeInt):
    class _Dtype:
        def __str__(self):
            return "torch.float32"

    def __index__(self):
        raise TypeError("only integer tensors can be converted to an index")


def test_normalize_size_accepts_torch_like_0d_int():
    assert normalize_size(_TorchLikeInt(3), 2, "filter_size") == (3, 3)
    assert normalize_size(np.array(3), 2, "filter_size") == (3, 3)
    x = _tensor(n_channels=2)
    w = np.ones((9, 2, 2), np.float32)
    out = sg.submanifold_conv(x, w, filter_size=_TorchLikeInt(3))
    np.testing.assert_array_equal(out.features, sg.submanifold_conv(x, w).features)


class _OnlyIndex:
    ndim = 0

    def __index__(self):
        return 2


class _NoDtypeItem:
    ndim = 0

    def item(self):
        return 2


@pytest.mark.parametrize("value", [_OnlyIndex(), _NoDtypeItem()])
def test_normalize_size_accepts_index_or_integer_item(value):
    assert normalize_size(value, 3, "stride") == (2, 2, 2)


@pytest.mark.parametrize("value", [_TorchLikeFloat(3.0), _TorchLikeFloat(3.5),
                                   np.array(3.0), np.array(True),
                                   _TorchLikeInt(3, dtype=object())])
def test_normalize_size_refuses_non_integer_0d_with_type_error(value):
    with pytest.raises(TypeError, match=r"^filter_size must be an int or a sequence of 2 "
                                        r"ints; got "):
        normalize_size(value, 2, "filter_size")


def test_normalize_size_fast_path_returns_normalised_tuple_unchanged():
    sizes = (3, 3, 3)
    assert normalize_size(sizes, 3, "f") is sizes
    with pytest.raises(ValueError, match=r"entries must be >= 1"):
        normalize_size((3, 0, 3), 3, "f")
    with pytest.raises(ValueError, match=r"must have 3 entries"):
        normalize_size((3, 3), 3, "f")
    with pytest.raises(TypeError):
        normalize_size((3, True, 3), 3, "f")
    assert normalize_size((0, 0), 2, "padding", minimum=0) == (0, 0)


def test_batch_norm_accepts_0d_real_arrays():
    x = _tensor(n_channels=2)
    ref = sg.batch_norm(x, momentum=0.5, eps=1e-4, leakiness=0.1)
    out = sg.batch_norm(x, momentum=np.array(0.5), eps=np.array(1e-4),
                        leakiness=np.array(0.1, np.float32))
    np.testing.assert_allclose(out.features, ref.features)
    with pytest.raises(TypeError, match="eps must be a real number"):
        sg.batch_norm(x, eps=np.array([1e-4]))
    with pytest.raises(TypeError, match="eps must be a real number"):
        sg.batch_norm(x, eps=np.array(True))


@pytest.mark.parametrize("flag", [1, 0, np.int64(1), np.bool_(False)])
def test_batch_norm_training_accepts_0_1_and_numpy_bools(flag):
    sg.batch_norm(_tensor(n_channels=2), running_mean=np.zeros(2, np.float32),
                  running_var=np.ones(2, np.float32), training=flag)


@pytest.mark.parametrize("flag", [2, -1, 1.0, "1"])
def test_batch_norm_training_still_refuses_other_values(flag):
    with pytest.raises(TypeError, match="training must be a bool"):
        sg.batch_norm(_tensor(n_channels=2), running_mean=np.zeros(2, np.float32),
                  running_var=np.ones(2, np.float32), training=flag)


def test_batch_norm_float32_parameters_on_float64_features_hint_names_module_double():
    x = _tensor(n_channels=2, dtype=np.float64)
    with pytest.raises(TypeError, match=r"weight must be an array of the features' dtype "
                                        r"float64; got float32 \(the parameters are float32: "
                                        r"cast the input features with "
                                        r"\.astype\(np\.float32\).*module\.double\(\)\)$"):
        sg.batch_norm(x, weight=np.ones(2, np.float32))


def test_output_layer_accepts_tensor_rebuilt_on_identical_indices():
    idx = np.array([[0, 1, 1], [0, 1, 1], [0, 2, 2]], np.int32)
    a, map_a = sg.input_layer(idx, _feats(3), (4, 4))
    rebuilt = sg.SparseTensor(np.asarray(a.features), a.indices.copy(), a.spatial_shape,
                              batch_size=a.batch_size)
    assert rebuilt.sites is not a.sites
    np.testing.assert_array_equal(sg.output_layer(rebuilt, map_a), sg.output_layer(a, map_a))
    # a different spatial shape or batch size on the same indices is still refused
    for other in (sg.SparseTensor(np.asarray(a.features), a.indices, (5, 5)),
                  sg.SparseTensor(np.asarray(a.features), a.indices, a.spatial_shape,
                                  batch_size=2)):
        with pytest.raises(ValueError, match="x is not on the sites"):
            sg.output_layer(other, map_a)
