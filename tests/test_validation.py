"""Bad input gets a specific exception whose message names the offending argument or row.

Where the library silently accepts input it should reject (wrap-around, unvalidated data),
the test states the correct behaviour and fails until the library is fixed.
"""

import re

import numpy as np
import pytest

import sparsegrid as sg
from sparsegrid import functional as F
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
@pytest.mark.parametrize("dtype", [np.int32, np.int64, bool, np.complex64, np.float16,
                                   np.longdouble])
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
