"""Argument validation of sparsegrid.nn: every constructor refuses a bad dimension, size,
channel count or scalar up front (naming the layer, the argument, what was expected and
what was given), absurdly large weights are refused before allocation (MemoryError), the
input layers check their batch size, and the tables and tensor helpers refuse tensors of
different batch sizes, sites or dtypes.

Nothing here allocates more than a few kilobytes: every bad argument is refused before
any work is done.
"""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import sparsegrid as sg
import sparsegrid.nn as scn
from nn_helpers import SHAPES, sparse

SETTINGS = settings(max_examples=25, deadline=None)


# --------------------------------------------------------------------------------------
# strategies
# --------------------------------------------------------------------------------------
BAD_DIMENSIONS = [0, 11, 20, -1, 2.5, True, False, "2", None, 1e9, np.float64(3.0)]
not_numbers = st.sampled_from(["x", "1", None, [1.0], (0.5,), {}, b"1"])
bools = st.booleans()
non_finite = st.sampled_from([math.nan, math.inf, -math.inf, np.float32("nan")])
negatives = st.floats(max_value=-1e-6, allow_nan=False, allow_infinity=False)
bad_dimensions = st.one_of(st.sampled_from(BAD_DIMENSIONS), st.integers(max_value=0),
                           st.integers(min_value=11, max_value=10 ** 12))


# Each constructor with its dimension as the first argument and otherwise valid arguments.
DIMENSIONED = {
    "SubmanifoldConvolution": lambda d: scn.SubmanifoldConvolution(d, 2, 2, 3, False),
    "Convolution": lambda d: scn.Convolution(d, 2, 2, 3, 2, False),
    "RandomizedStrideConvolution": lambda d: scn.RandomizedStrideConvolution(d, 2, 2, 3, 2,
                                                                             False),
    "Deconvolution": lambda d: scn.Deconvolution(d, 2, 2, 3, 2, False),
    "FullConvolution": lambda d: scn.FullConvolution(d, 2, 2, 3, 2, False),
    "PermutohedralSubmanifoldConvolution":
        lambda d: scn.PermutohedralSubmanifoldConvolution(d, 2, 2, False),
    "ShapeContext": lambda d: scn.ShapeContext(d, 2, 3),
    "MaxPooling": lambda d: scn.MaxPooling(d, 2, 2),
    "RandomizedStrideMaxPooling": lambda d: scn.RandomizedStrideMaxPooling(d, 2, 2),
    "AveragePooling": lambda d: scn.AveragePooling(d, 2, 2),
    "UnPooling": lambda d: scn.UnPooling(d, 2, 2),
    "InputLayer": lambda d: scn.InputLayer(d, 8),
    "BLInputLayer": lambda d: scn.BLInputLayer(d, 8),
    "OutputLayer": lambda d: scn.OutputLayer(d),
    "BLOutputLayer": lambda d: scn.BLOutputLayer(d),
    "SparseToDense": lambda d: scn.SparseToDense(d, 2),
    "DenseToSparse": lambda d: scn.DenseToSparse(d),
    "Sparsify": lambda d: scn.Sparsify(d, 2),
    "SparsifyFCS": lambda d: scn.SparsifyFCS(d),
    "SparseVggNet": lambda d: scn.SparseVggNet(d, 2, [["C", 2]]),
    "SparseResNet": lambda d: scn.SparseResNet(d, 2, [["b", 2, 1, 1]]),
    "UNet": lambda d: scn.UNet(d, 1, [2, 4]),
    "FullyConvolutionalNet": lambda d: scn.FullyConvolutionalNet(d, 1, [2, 4]),
}


# --------------------------------------------------------------------------------------
# 1. dimension, sizes, channel counts, weight size
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(DIMENSIONED))
def test_every_dimensioned_constructor_refuses_dimension_11_up_front(name):
    with pytest.raises(ValueError, match=rf"^{name}: dimension must be an int in \[1, 10\]; "
                                         r"got 11$"):
        DIMENSIONED[name](11)
    with pytest.raises(TypeError, match=rf"^{name}: dimension must be an int in \[1, 10\]; "
                                        r"got True \(bool\)$"):
        DIMENSIONED[name](True)
    DIMENSIONED[name](2)                                        # a good one builds


@pytest.mark.parametrize("name", ["SubmanifoldConvolution", "Convolution", "UNet",
                                  "PermutohedralSubmanifoldConvolution", "InputLayer"])
@SETTINGS
@given(dimension=bad_dimensions)
def test_bad_dimensions_raise_before_any_work(name, dimension):
    with pytest.raises((TypeError, ValueError), match=rf"^{name}: dimension must be an int "
                                                      r"in \[1, 10\]; got "):
        DIMENSIONED[name](dimension)


def test_dimension_20_no_longer_asks_for_gigabytes():
    with pytest.raises(ValueError, match=r"SubmanifoldConvolution: dimension .* got 20"):
        scn.SubmanifoldConvolution(20, 16, 16, 3, False)
    # The largest dimension allowed builds (3**10 offsets, 59,049 x 1 x 1 weights).
    assert scn.SubmanifoldConvolution(10, 1, 1, 3, False).weight.shape == (3 ** 10, 1, 1)


def test_dimension_accepts_numpy_integers():
    assert scn.SubmanifoldConvolution(np.int64(2), 1, 1, 3, False).dimension == 2
    assert scn.InputLayer(np.array(3), 8).dimension == 3


@pytest.mark.parametrize("make, error, match", [
    (lambda: scn.SubmanifoldConvolution(2, 0, 2, 3, False), ValueError,
     r"^SubmanifoldConvolution: nIn must be a positive int; got 0$"),
    (lambda: scn.SubmanifoldConvolution(2, 2, -4, 3, False), ValueError,
     r"^SubmanifoldConvolution: nOut must be a positive int; got -4$"),
    (lambda: scn.Convolution(2, True, 2, 3, 2, False), TypeError,
     r"^Convolution: nIn must be a positive int; got True \(bool\)$"),
    (lambda: scn.Convolution(2, 2.0, 2, 3, 2, False), TypeError,
     r"^Convolution: nIn must be a positive int; got 2\.0 \(float\)$"),
    (lambda: scn.Convolution(2, 2, 2, 0, 2, False), ValueError,
     r"^Convolution: filter_size entries must be >= 1; got \(0, 0\)"),
    (lambda: scn.Convolution(2, 2, 2, 3, (2, 0), False), ValueError,
     r"^Convolution: filter_stride entries must be >= 1"),
    (lambda: scn.Convolution(2, 2, 2, 2.5, 2, False), TypeError,
     r"^Convolution: filter_size must be an int or a sequence of 2 ints"),
    (lambda: scn.Deconvolution(2, 2, 2, True, 2, False), TypeError,
     r"^Deconvolution: filter_size must be an int or a sequence of 2 ints"),
    (lambda: scn.FullConvolution(2, 2, 2, (3, 3, 3), 2, False), ValueError,
     r"^FullConvolution: filter_size must have 2 entries"),
    (lambda: scn.SubmanifoldConvolution(2, 4, 4, 3, False, groups=3), ValueError,
     r"^SubmanifoldConvolution: groups=3 must divide nIn=4 and nOut=4$"),
    (lambda: scn.SubmanifoldConvolution(2, 4, 4, 3, False, groups=0), ValueError,
     r"^SubmanifoldConvolution: groups must be a positive int; got 0$"),
    (lambda: scn.SubmanifoldConvolution(2, 4, 4, 3, "no"), TypeError,
     r"^SubmanifoldConvolution: bias must be a bool; got 'no' \(str\)$"),
    (lambda: scn.NetworkInNetwork(0, 2), ValueError,
     r"^NetworkInNetwork: nIn must be a positive int; got 0$"),
    (lambda: scn.NetworkInNetwork(2, 2, bias="no"), TypeError,
     r"^NetworkInNetwork: bias must be a bool; got 'no' \(str\)$"),
    (lambda: scn.ShapeContext(2, 2, 0), ValueError,
     r"^ShapeContext: filter_size entries must be >= 1"),
    (lambda: scn.MaxPooling(2, 0, 2), ValueError, r"^MaxPooling: pool_size entries must be"),
    (lambda: scn.AveragePooling(2, 2, "2"), TypeError, r"^AveragePooling: pool_stride must be"),
    (lambda: scn.RandomizedStrideMaxPooling(2, 3, 2, nFeaturesToDrop=-1), ValueError,
     r"^RandomizedStrideMaxPooling: nFeaturesToDrop must be a non-negative int; got -1$"),
    (lambda: scn.MaxPooling(2, 3, 2, nFeaturesToDrop=0.5), TypeError,
     r"^MaxPooling: nFeaturesToDrop must be a non-negative int; got 0\.5 \(float\)$"),
    (lambda: scn.SparseToDense(2, 0), ValueError,
     r"^SparseToDense: nPlanes must be a positive int; got 0$"),
    (lambda: scn.Sparsify(2, 0), ValueError, r"^Sparsify: nIn must be a positive int; got 0$"),
    (lambda: scn.Sparsify(2, 2, activation="relu"), ValueError,
     r"^Sparsify: activation must be None, 'sigmoid' or 'fakeGradHardSigmoid'; got 'relu'$"),
    (lambda: scn.Sparsify(2, 2, activation=np.array([1, 2])), ValueError,
     r"^Sparsify: activation must be None"),
    (lambda: scn.Linear(0, 2), ValueError, r"^Linear: in_features must be a positive int"),
    (lambda: scn.Linear(2, 2, bias="yes"), TypeError, r"^Linear: bias must be a bool"),
    (lambda: scn.InputLayer(2, 0), ValueError, r"^InputLayer: spatial_size entries must be"),
    (lambda: scn.InputLayer(2, "x"), TypeError, r"^InputLayer: spatial_size must be an int or"),
    (lambda: scn.InputLayer(2, 8, mode=True), ValueError, r"mode must be 0\.\.4"),
    (lambda: scn.BLInputLayer(2, 8, mode=True), ValueError, r"mode must be 0\.\.4"),
])
def test_sizes_and_channel_counts(make, error, match):
    with pytest.raises(error, match=match):
        make()


@pytest.mark.parametrize("make, shape, n_bytes", [
    (lambda: scn.SubmanifoldConvolution(3, 1024, 1024, 9, False), (729, 1024, 1024),
     729 * 1024 * 1024 * 4),
    (lambda: scn.Convolution(10, 16, 16, 5, 1, False), (5 ** 10, 16, 16), 5 ** 10 * 256 * 4),
    (lambda: scn.FullConvolution(2, 4, 4, 10 ** 5, 2, False), (10 ** 10, 4, 4),
     10 ** 10 * 16 * 4),
    (lambda: scn.NetworkInNetwork(10 ** 5, 10 ** 5), (10 ** 5, 10 ** 5), 4 * 10 ** 10),
    (lambda: scn.Linear(10 ** 6, 10 ** 6), (10 ** 6, 10 ** 6), 4 * 10 ** 12),
])
def test_absurd_weights_raise_memory_error_before_allocating(make, shape, n_bytes,
                                                            monkeypatch):
    from sparsegrid import coords
    # a 2 GiB parameter limit (a third of 6 GiB), whatever this machine's memory
    monkeypatch.setattr(coords, "MAX_ALLOCATION_BYTES", 6 * 1024 ** 3)
    with pytest.raises(MemoryError, match=rf"a parameter of shape {re.escape(str(shape))} "
                                          rf"\(float32\) would take {n_bytes:,} bytes"):
        make()


def test_memory_error_names_the_layer_and_grouped_weights_count_once(monkeypatch):
    from sparsegrid import coords
    monkeypatch.setattr(coords, "MAX_ALLOCATION_BYTES", 6 * 1024 ** 3)
    with pytest.raises(MemoryError, match=r"^SubmanifoldConvolution: .* over the limit of "
                                          r"2,147,483,648 bytes \(a third of"):
        scn.SubmanifoldConvolution(3, 1024, 1024, 9, False)
    # Groups divide the weight: (K, G, nIn/G, nOut/G) = 1/G of the ungrouped size.
    conv = scn.SubmanifoldConvolution(3, 1024, 1024, 3, False, groups=256)
    assert conv.weight.shape == (27, 256, 4, 4)


# --------------------------------------------------------------------------------------
# 2. scalars
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("make, error, match", [
    (lambda: scn.LeakyReLU(math.nan), ValueError, r"^LeakyReLU: leak must be a finite number; "
                                                  r"got nan$"),
    (lambda: scn.LeakyReLU("0.1"), TypeError, r"^LeakyReLU: leak must be a finite number; "
                                              r"got '0\.1' \(str\)$"),
    (lambda: scn.ELU(math.inf), ValueError, r"^ELU: alpha must be a finite number; got inf$"),
    (lambda: scn.ELU(True), TypeError, r"^ELU: alpha must be a finite number; got True"),
    (lambda: scn.BatchNormalization(4, eps=0), ValueError,
     r"^BatchNormalization: eps must be a finite number > 0; got 0$"),
    (lambda: scn.BatchNormalization(4, momentum=-0.1), ValueError,
     r"^BatchNormalization: momentum must be in \[0, 1\], a finite number; got -0\.1$"),
    (lambda: scn.BatchNormalization(4, leakiness=math.nan), ValueError,
     r"^BatchNormalization: leakiness must be a finite number; got nan$"),
    (lambda: scn.BatchNormalization(4, affine="yes"), TypeError,
     r"^BatchNormalization: affine must be a bool; got 'yes' \(str\)$"),
    (lambda: scn.BatchNormReLU(4, eps=None), TypeError,
     r"^BatchNormReLU: eps must be a finite number > 0; got None \(NoneType\)$"),
    (lambda: scn.BatchNormReLU(0), ValueError,
     r"^BatchNormReLU: nPlanes must be a positive int; got 0$"),
    (lambda: scn.BatchNormLeakyReLU(4, leakiness=-math.inf), ValueError,
     r"^BatchNormLeakyReLU: leakiness must be a finite number; got -inf$"),
    (lambda: scn.BatchNormLeakyReLU(4, momentum=1.5), ValueError,
     r"^BatchNormLeakyReLU: momentum must be in \[0, 1\], a finite number; got 1\.5$"),
    (lambda: scn.BatchNormELU(4, eps=math.nan), ValueError,
     r"^BatchNormELU: eps must be a finite number > 0; got nan$"),
    (lambda: scn.BatchNormELU(4, momentum=True), TypeError,
     r"^BatchNormELU: momentum must be in \[0, 1\], a finite number; got True \(bool\)$"),
    (lambda: scn.BatchNormELU(2.5), TypeError, r"^BatchNormELU: nPlanes must be a positive int"),
    (lambda: scn.MeanOnlyBNLeakyReLU(4, leakiness="x"), TypeError,
     r"^MeanOnlyBNLeakyReLU: leakiness must be a finite number; got 'x' \(str\)$"),
    (lambda: scn.MeanOnlyBNLeakyReLU(4, momentum=2), ValueError,
     r"^MeanOnlyBNLeakyReLU: momentum must be in \[0, 1\], a finite number; got 2$"),
    (lambda: scn.SparseGroupNorm(0, 4), ValueError,
     r"^SparseGroupNorm: num_groups must be a positive int; got 0$"),
    (lambda: scn.SparseGroupNorm(3, 4), ValueError,
     r"^SparseGroupNorm: num_groups=3 must divide num_channels=4$"),
    (lambda: scn.SparseGroupNorm(2, 4, eps=-1e-5), ValueError,
     r"^SparseGroupNorm: eps must be a finite number > 0; got -1e-05$"),
    (lambda: scn.Dropout(1), ValueError,
     r"^Dropout: p must be in \[0, 1\), a finite number; got 1$"),
    (lambda: scn.Dropout(math.nan), ValueError, r"^Dropout: p must be in \[0, 1\)"),
    (lambda: scn.BatchwiseDropout(True), TypeError,
     r"^BatchwiseDropout: p must be in \[0, 1\), a finite number; got True \(bool\)$"),
    (lambda: scn.BatchwiseDropout(-0.5), ValueError, r"^BatchwiseDropout: p must be in"),
    (lambda: scn.UNet(2, 1, [2, 4], leakiness=math.nan), ValueError,
     r"^UNet: leakiness must be a finite number; got nan$"),
    (lambda: scn.UNet(2, 0, [2, 4]), ValueError, r"^UNet: reps must be a positive int; got 0$"),
    (lambda: scn.UNet(2, 1, []), ValueError, r"^UNet: nPlanes must be a non-empty list"),
    (lambda: scn.UNet(2, 1, [2, 0]), ValueError,
     r"^UNet: nPlanes\[1\] must be a positive int; got 0$"),
    (lambda: scn.UNet(2, 1, 8), TypeError, r"^UNet: nPlanes must be a non-empty list of "
                                           r"positive ints; got 8 \(int\)$"),
    (lambda: scn.UNet(2, 1, [2, 4], residual_blocks="yes"), TypeError,
     r"^UNet: residual_blocks must be a bool"),
    (lambda: scn.UNet(2, 1, [2, 4], downsample=(2,)), ValueError,
     r"^UNet: downsample must be a \(filter_size, stride\) pair; got 1 items"),
    (lambda: scn.UNet(2, 1, [2, 4], downsample=(2, 0)), ValueError,
     r"^UNet: downsample stride entries must be >= 1"),
    (lambda: scn.UNet(2, 1, [2, 4], n_input_planes=0), ValueError,
     r"^UNet: n_input_planes must be a positive int or -1"),
    (lambda: scn.FullyConvolutionalNet(2, 1, [2, 4], downsample=2), TypeError,
     r"^FullyConvolutionalNet: downsample must be a \(filter_size, stride\) pair"),
    (lambda: scn.SparseVggNet(2, 0, []), ValueError,
     r"^SparseVggNet: nInputPlanes must be a positive int; got 0$"),
    (lambda: scn.SparseVggNet(2, 2, "MP"), TypeError,
     r"^SparseVggNet: layers must be a list of layer codes; got 'MP' \(str\)$"),
    (lambda: scn.SparseResNet(2, 2, [["b", 4, 1.5, 1]]), TypeError,
     r"^SparseResNet: layers\[0\] reps must be a positive int; got 1\.5 \(float\)$"),
    (lambda: scn.SparseResNet(2, 2, [["b", 4, 1]]), ValueError,
     r"^SparseResNet: layers\[0\] must be \('b', n, reps, stride\)"),
])
def test_scalar_reproducers(make, error, match):
    with pytest.raises(error, match=match):
        make()


# (constructor of one scalar, the rule): the rule is "finite", "positive" (> 0),
# "unit" ([0, 1]) or "probability" ([0, 1)).
SCALARS = {
    "LeakyReLU.leak": (lambda v: scn.LeakyReLU(v), "finite"),
    "ELU.alpha": (lambda v: scn.ELU(v), "finite"),
    "BatchNormalization.eps": (lambda v: scn.BatchNormalization(2, eps=v), "positive"),
    "BatchNormalization.momentum": (lambda v: scn.BatchNormalization(2, momentum=v), "unit"),
    "BatchNormalization.leakiness": (lambda v: scn.BatchNormalization(2, leakiness=v),
                                     "finite"),
    "BatchNormReLU.eps": (lambda v: scn.BatchNormReLU(2, eps=v), "positive"),
    "BatchNormReLU.momentum": (lambda v: scn.BatchNormReLU(2, momentum=v), "unit"),
    "BatchNormLeakyReLU.leakiness": (lambda v: scn.BatchNormLeakyReLU(2, leakiness=v),
                                     "finite"),
    "BatchNormLeakyReLU.eps": (lambda v: scn.BatchNormLeakyReLU(2, eps=v), "positive"),
    "BatchNormELU.eps": (lambda v: scn.BatchNormELU(2, eps=v), "positive"),
    "BatchNormELU.momentum": (lambda v: scn.BatchNormELU(2, momentum=v), "unit"),
    "MeanOnlyBNLeakyReLU.leakiness": (lambda v: scn.MeanOnlyBNLeakyReLU(2, leakiness=v),
                                      "finite"),
    "MeanOnlyBNLeakyReLU.momentum": (lambda v: scn.MeanOnlyBNLeakyReLU(2, momentum=v), "unit"),
    "SparseGroupNorm.eps": (lambda v: scn.SparseGroupNorm(1, 2, eps=v), "positive"),
    "Dropout.p": (lambda v: scn.Dropout(v), "probability"),
    "BatchwiseDropout.p": (lambda v: scn.BatchwiseDropout(v), "probability"),
    "UNet.leakiness": (lambda v: scn.UNet(1, 1, [1], leakiness=v), "finite"),
}


def _valid(rule, v):
    return {"finite": True, "positive": v > 0, "unit": 0 <= v <= 1,
            "probability": 0 <= v < 1}[rule]


@pytest.mark.parametrize("key", sorted(SCALARS))
@SETTINGS
@given(value=st.one_of(not_numbers, bools))
def test_scalars_of_the_wrong_type_raise_type_error(key, value):
    make, _ = SCALARS[key]
    owner, name = key.split(".")
    with pytest.raises(TypeError, match=rf"^{owner}: {name} must be .*; got "):
        make(value)


@pytest.mark.parametrize("key", sorted(SCALARS))
@SETTINGS
@given(value=non_finite)
def test_non_finite_scalars_raise_value_error(key, value):
    make, _ = SCALARS[key]
    owner, name = key.split(".")
    with pytest.raises(ValueError, match=rf"^{owner}: {name} must be .*finite number.*; got "):
        make(value)


@pytest.mark.parametrize("key", sorted(SCALARS))
@SETTINGS
@given(value=st.one_of(negatives, st.just(0.0), st.just(0), st.just(1), st.just(1.0),
                       st.floats(min_value=-10, max_value=10, allow_nan=False),
                       st.integers(-5, 5), st.just(np.float32(0.5))))
def test_finite_scalars_follow_their_rule(key, value):
    make, rule = SCALARS[key]
    owner, name = key.split(".")
    if _valid(rule, float(value)):
        make(value)
    else:
        with pytest.raises(ValueError, match=rf"^{owner}: {name} must be "):
            make(value)


@SETTINGS
@given(value=st.one_of(not_numbers, bools, st.floats(allow_nan=True),
                       st.integers(max_value=0)))
def test_channel_counts_refuse_non_positive_or_non_int(value):
    for make in (lambda v: scn.SubmanifoldConvolution(2, v, 2, 3, False),
                 lambda v: scn.BatchNormReLU(v), lambda v: scn.NetworkInNetwork(2, v),
                 lambda v: scn.Linear(v, 2), lambda v: scn.SparseGroupNorm(v, 4)):
        with pytest.raises((TypeError, ValueError), match=r"must be a positive int; got "):
            make(value)


@SETTINGS
@given(value=st.one_of(bools, st.integers(max_value=0), st.floats(allow_nan=True),
                       not_numbers))
def test_filter_sizes_and_strides_refuse_bad_values(value):
    for make in (lambda v: scn.Convolution(2, 1, 1, v, 2, False),
                 lambda v: scn.Convolution(2, 1, 1, 2, v, False),
                 lambda v: scn.MaxPooling(2, v, 1), lambda v: scn.ShapeContext(2, 1, v)):
        with pytest.raises((TypeError, ValueError), match=r"^[A-Za-z]+: (filter|pool)_"):
            make(value)


# --------------------------------------------------------------------------------------
# 3. the input layers' batch size
# --------------------------------------------------------------------------------------
COORDS = np.array([[1, 1, 0], [2, 3, 1]])        # SCN order: spatial, then the batch index
FEATS = np.ones((2, 1), np.float32)


@pytest.mark.parametrize("batch_size, error, match", [
    ("x", TypeError, r"^InputLayer input: batch_size must be a non-negative int; "
                     r"got 'x' \(str\)$"),
    (None, TypeError, r"^InputLayer input: batch_size must be a non-negative int; "
                      r"got None \(NoneType\)$"),
    (-3, ValueError, r"^InputLayer input: batch_size must be a non-negative int; got -3$"),
    (2.7, TypeError, r"^InputLayer input: batch_size must be a non-negative int; "
                     r"got 2\.7 \(float\)$"),
    (float("inf"), TypeError, r"got inf \(float\)$"),      # 2.0 is accepted (as 2)
    (True, TypeError, r"got True \(bool\)$"),
    (np.array([2]), TypeError, r"batch_size must be a non-negative int"),
])
def test_input_layer_batch_size(batch_size, error, match):
    with pytest.raises(error, match=match):
        scn.InputLayer(2, 5)([COORDS, FEATS, batch_size])


def test_input_layer_good_batch_sizes():
    layer = scn.InputLayer(2, 5)
    assert layer([COORDS, FEATS, 0]).batch_size == 2             # a lower bound (SCN)
    assert layer([COORDS, FEATS, np.int64(4)]).batch_size == 4
    assert layer([COORDS, FEATS, np.array(3)]).batch_size == 3
    assert layer(scn.InputLayerInput(COORDS, FEATS, 5)).batch_size == 5
    assert len(scn.InputLayerInput(COORDS, FEATS)) == 2


@SETTINGS
@given(batch_size=st.one_of(st.integers(max_value=-1),
                            st.floats(allow_nan=True).filter(
                                lambda v: not (math.isfinite(v) and v.is_integer()) or v < 0),
                            bools,
                            not_numbers.filter(lambda v: v is not None)))
def test_input_layer_input_batch_size(batch_size):
    with pytest.raises((TypeError, ValueError),
                       match=r"^InputLayerInput: batch_size must be a non-negative int; got "):
        scn.InputLayerInput(COORDS, FEATS, batch_size)
    with pytest.raises((TypeError, ValueError),
                       match=r"^InputLayer input: batch_size must be a non-negative int"):
        scn.InputLayer(2, 5)([COORDS, FEATS, batch_size])


def test_bl_input_layer_takes_its_batch_size_from_the_coordinates():
    coords = np.array([[[0, 0], [-1, 0]], [[1, 1], [2, 2]]])
    feats = np.ones((2, 2, 1), np.float32)
    assert scn.BLInputLayer(2, 4)([coords, feats]).batch_size == 2
    with pytest.raises(TypeError, match=r"^BLInputLayer expects \[coords \(B, L, D\), features "
                                        r"\(B, L, C\)\] \(the batch size is B\); got a list of "
                                        r"3 items$"):
        scn.BLInputLayer(2, 4)([coords, feats, 2])
    with pytest.raises(TypeError, match=r"^InputLayer expects .*; got a dict$"):
        scn.InputLayer(2, 4)({})


# --------------------------------------------------------------------------------------
# 4. tables and tensor helpers
# --------------------------------------------------------------------------------------
def _on_same_sites(x, *, dtype=None, batch_size=None):
    """A tensor on x's site rows with other features (dtype) or batch size."""
    features = np.asarray(x.features.data if hasattr(x.features, "data") else x.features)
    return sg.SparseTensor(features.astype(dtype or x.dtype), x.indices, x.spatial_shape,
                           batch_size if batch_size is not None else x.batch_size)


@pytest.mark.parametrize("table", [scn.JoinTable, scn.AddTable])
def test_tables_refuse_mixed_dtypes(rng, table):
    x = sparse(rng, SHAPES[2], channels=3)
    with pytest.raises(TypeError, match=rf"^{table.__name__} needs tensors of one dtype; "
                                        r"input 1 has float64 features, input 0 has float32$"):
        table()([x, _on_same_sites(x, dtype=np.float64)])
    # ... also on the very same sites object (no shortcut around the dtype check)
    y = x.with_features(np.asarray(x.features, np.float64))
    with pytest.raises(TypeError, match=r"input 1 has float64 features"):
        table()([x, y])


@pytest.mark.parametrize("table", [scn.JoinTable, scn.AddTable])
def test_tables_refuse_different_batch_sizes(rng, table):
    x = sparse(rng, SHAPES[2], channels=3, batch=2)
    with pytest.raises(ValueError, match=rf"^{table.__name__} needs tensors of the same batch "
                                         r"size; input 1 has 5 samples, input 0 has 2$"):
        table()([x, _on_same_sites(x, batch_size=5)])
    # Equal sites and batch size on another object: accepted, as before.
    assert table()([x, _on_same_sites(x)]).n_active == x.n_active


def test_tables_refuse_other_sites_and_row_orders(rng):
    x = sparse(rng, SHAPES[2], channels=3)
    order = np.arange(x.n_active)[::-1].copy()
    reordered = sg.SparseTensor(np.asarray(x.features)[order], x.indices[order],
                                x.spatial_shape, x.batch_size)
    with pytest.raises(ValueError, match=r"^JoinTable needs tensors on the same sites in the "
                                         r"same row order; input 1"):
        scn.JoinTable()([x, reordered])
    with pytest.raises(ValueError, match=r"^AddTable needs tensors on the same sites"):
        scn.AddTable()([x, sparse(rng, SHAPES[2], channels=3)])


class _Returns(scn.Module):
    """A branch that returns a fixed tensor (to build bad ConcatTable outputs)."""

    def __init__(self, out):
        super().__init__()
        self.out = out

    def forward(self, x):
        return self.out


def test_concat_table_refuses_branches_of_other_batch_sizes_or_dtypes(rng):
    x = sparse(rng, (7, 7), channels=3, batch=2)
    with pytest.raises(ValueError, match=r"^ConcatTable: branch 1 returned a batch of 4 "
                                         r"samples; branch 0 returned 2$"):
        scn.ConcatTable(scn.Identity(), _Returns(_on_same_sites(x, batch_size=4)))(x)
    with pytest.raises(TypeError, match=r"^ConcatTable: branch 2 returned float64 features; "
                                        r"branch 0 returned float32"):
        scn.ConcatTable(scn.Identity(), scn.Identity(),
                        _Returns(_on_same_sites(x, dtype=np.float64)))(x)
    # Branches may end on other sites (a strided branch) and may return dense outputs.
    out = scn.ConcatTable(scn.Identity(), scn.MaxPooling(2, 3, 2), scn.SparseToDense(2, 3))(x)
    assert out[1].spatial_shape != x.spatial_shape and out[2].shape[0] == 2


def test_append_tensors_and_compare_sparse_refuse_mixed_dtypes(rng):
    x = sparse(rng, SHAPES[2], channels=3)
    y64 = sparse(rng, SHAPES[2], channels=3, dtype=np.float64)
    with pytest.raises(TypeError, match=r"^append_tensors: tensor 1 has float64 features; "
                                        r"tensor 0 has float32$"):
        scn.append_tensors([x, y64])
    with pytest.raises(TypeError, match=r"^compare_sparse: dtypes differ: x has float32 "
                                        r"features, y has float64$"):
        scn.compare_sparse(x, y64)
    # one dtype: fine
    assert scn.append_tensors([x, x]).batch_size == 2 * x.batch_size
    assert float(scn.compare_sparse(x, x).data) == 0.0


def test_elu_alpha_is_used(rng):
    x = sparse(rng, SHAPES[2], channels=3)
    v = np.asarray(x.features, np.float64)
    out = np.asarray(scn.ELU(0.5)(x).features.data, np.float64)
    np.testing.assert_allclose(out, np.where(v > 0, v, 0.5 * (np.exp(v) - 1)), rtol=1e-5,
                               atol=1e-6)
    assert "alpha=0.5" in repr(scn.ELU(0.5)) and scn.ELU().alpha == 1.0


# ----------------------------------------------- regressions: valid inputs accepted again
@pytest.mark.parametrize("make", [
    lambda: scn.SubmanifoldConvolution(2, 2, 3, 3, None),
    lambda: scn.Convolution(2, 2, 3, 3, 2, None),
    lambda: scn.Deconvolution(2, 2, 3, 3, 2, None),
    lambda: scn.NetworkInNetwork(2, 3, None),
    lambda: scn.NetworkInNetwork(2, 3, bias=None),
    lambda: scn.Linear(2, 3, bias=None),
])
def test_bias_none_means_no_bias(make):
    assert make().bias is None


def test_flags_other_than_bias_still_refuse_none():
    with pytest.raises(TypeError, match=r"^BatchNormalization: affine must be a bool; got None"):
        scn.BatchNormalization(2, affine=None)


def test_scalars_accept_0d_real_arrays_and_numpy_floats():
    bn = scn.BatchNormalization(2, eps=np.array(1e-4), momentum=np.array(0.9),
                                leakiness=np.float32(0.5))
    assert (bn.eps, bn.momentum, bn.leakiness) == (1e-4, 0.9, 0.5)
    assert type(bn.eps) is float
    assert scn.LeakyReLU(np.array(.1)).leak == .1
    assert scn.BatchNormReLU(2, eps=np.array(1e-3, np.float32)).eps == pytest.approx(1e-3)
    with pytest.raises(TypeError, match=r"^LeakyReLU: leak must be a finite number"):
        scn.LeakyReLU(np.array([.1]))
    with pytest.raises(ValueError, match=r"^BatchNormalization: eps must be"):
        scn.BatchNormalization(2, eps=np.array(np.nan))


class _TorchLikeInt:
    """A torch 0-d int tensor stand-in (its dtype has no ``.kind``)."""
    dtype = type("dtype", (), {"__str__": lambda self: "torch.int64"})()
    ndim = 0
    shape = ()

    def __init__(self, value):
        self.value = value

    def item(self):
        return self.value

    def __index__(self):
        return self.value


def test_filter_size_accepts_torch_like_0d_int():
    conv = scn.SubmanifoldConvolution(2, 1, 2, _TorchLikeInt(3), False)
    assert conv.weight.shape[0] == 9
    assert scn.MaxPooling(2, _TorchLikeInt(2), _TorchLikeInt(2)) is not None


@pytest.mark.parametrize("planes", [np.array([8, 16]), np.array([8, 16], np.int32)])
def test_network_builders_accept_integer_array_planes(planes):
    ref = scn.UNet(2, 1, [8, 16])
    net = scn.UNet(2, 1, planes)
    assert list(net.state_dict()) == list(ref.state_dict())
    scn.UNet(2, 1, planes, downsample=np.array([2, 2]))
    scn.FullyConvolutionalNet(2, 1, planes)
    with pytest.raises(TypeError, match=r"^UNet: nPlanes must be"):
        scn.UNet(2, 1, np.array([8.0, 16.0]))


@pytest.mark.parametrize("batch_size, expected", [(1.0, 2), (4.0, 4), (np.float64(3.0), 3)])
def test_input_layer_accepts_integral_float_batch_size(batch_size, expected):
    assert scn.InputLayer(2, 5)([COORDS, FEATS, batch_size]).batch_size == expected
    assert scn.InputLayerInput(COORDS, FEATS, batch_size)[2] == int(batch_size)


@pytest.mark.parametrize("batch_size", [2.5, float("nan"), float("inf")])
def test_input_layer_still_refuses_non_integral_float_batch_size(batch_size):
    with pytest.raises(TypeError, match=r"^InputLayer input: batch_size must be a "
                                        r"non-negative int"):
        scn.InputLayer(2, 5)([COORDS, FEATS, batch_size])


def test_batch_norm_module_dtype_hint_names_module_double():
    x = scn.InputLayer(2, 5)([COORDS, FEATS.astype(np.float64)])
    with pytest.raises(TypeError, match=r"got float32 \(the parameters are float32: cast the "
                                        r"input features with \.astype\(np\.float32\).*"
                                        r"module\.double\(\)\)$"):
        scn.BatchNormalization(1)(x)
    assert scn.BatchNormalization(1).double()(x).dtype == np.float64
