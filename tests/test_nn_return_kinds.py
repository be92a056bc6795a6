"""sparsegrid.nn returns one kind of object: SparseTensors with autodiff-Tensor features and
dense outputs as a Tensor, whether or not a gradient is recorded (``no_grad()``), whatever
the last layer, and however the input was made (a user's SparseTensor of a plain array,
plain coordinate/feature arrays, a dense array). Under ``no_grad()`` nothing is recorded;
the values are the same bits either way.
"""

from __future__ import annotations

import numpy as np
import pytest

import sparsegrid as sg
import sparsegrid.nn as scn
from nn_helpers import bl_batch, scn_rows, sparse
from sparsegrid.autodiff import Tensor, no_grad


def _result(out):
    """The Tensor that carries ``out``'s values (its features for a SparseTensor)."""
    return out.features if isinstance(out, sg.SparseTensor) else out


def _kind(out):
    return ("sparse" if isinstance(out, sg.SparseTensor) else "dense", type(_result(out)))


def _sparse_input(rng):
    return sparse(rng, (9, 9), channels=3, batch=2, density=0.4)


def _rows_input(rng):
    coords, feats, _ = scn_rows(rng, (9, 9), 2, 30, channels=3)
    return [coords, feats]


def _bl_input(rng):
    coords, feats = bl_batch(rng, shape=(9, 9), channels=3)
    return [coords, feats]


def _dense_input(rng):
    return scn.SparseToDense(2, 3)(_sparse_input(rng)).data     # a plain (B, C, H, W) array


# (name, model builder, input builder, expected kind of the result)
MODELS = [
    ("ends in a sparse conv", lambda: scn.Sequential(
        scn.SubmanifoldConvolution(2, 3, 4, 3, True),
        scn.Convolution(2, 4, 5, 3, 2, False)), _sparse_input, "sparse"),
    ("ends in BatchNormReLU", lambda: scn.Sequential(
        scn.SubmanifoldConvolution(2, 3, 4, 3, False), scn.BatchNormReLU(4)),
     _sparse_input, "sparse"),
    ("InputLayer -> OutputLayer", lambda: scn.Sequential(
        scn.InputLayer(2, (9, 9), mode=3), scn.SubmanifoldConvolution(2, 3, 4, 3, True),
        scn.BatchNormReLU(4), scn.OutputLayer(2)), _rows_input, "dense"),
    ("ends in SparseToDense", lambda: scn.Sequential(
        scn.SubmanifoldConvolution(2, 3, 4, 3, True), scn.MaxPooling(2, 3, 2),
        scn.SparseToDense(2, 4)), _sparse_input, "dense"),
    ("Linear after global pooling", lambda: scn.Sequential(
        scn.SubmanifoldConvolution(2, 3, 4, 3, True), scn.GlobalAveragePooling(),
        scn.Linear(4, 5)), _sparse_input, "dense"),
    ("BLInputLayer -> BLOutputLayer", lambda: scn.Sequential(
        scn.BLInputLayer(2, (9, 9), mode=4), scn.SubmanifoldConvolution(2, 3, 2, 3, True),
        scn.BLOutputLayer(2)), _bl_input, "dense"),
    ("DenseToSparse -> ... -> Flatten -> Linear", lambda: scn.Sequential(
        scn.DenseToSparse(2), scn.NetworkInNetwork(3, 2, True), scn.SparseToDense(2, 2),
        scn.Flatten(), scn.Linear(2 * 9 * 9, 3)), _dense_input, "dense"),
    ("tables, Sparsify, AddCoords", lambda: scn.Sequential(
        scn.ConcatTable(scn.Identity(), scn.SubmanifoldConvolution(2, 3, 3, 3, False)),
        scn.AddTable(), scn.AddCoords(), scn.Sparsify(2, 5, "sigmoid")),
     _sparse_input, "sparse"),
    ("CheckpointedSequential", lambda: scn.CheckpointedSequential(
        scn.SubmanifoldConvolution(2, 3, 4, 3, True), scn.BatchNormLeakyReLU(4)),
     _sparse_input, "sparse"),
    ("UNet", lambda: scn.Sequential(
        scn.SubmanifoldConvolution(2, 3, 4, 3, False), scn.UNet(2, 1, [4, 8]),
        scn.BatchNormReLU(4)), lambda rng: sparse(rng, (8, 8), channels=3, density=0.4),
     "sparse"),
]


@pytest.mark.parametrize("name, build, make_input, expected",
                         MODELS, ids=[m[0] for m in MODELS])
def test_the_same_kind_with_and_without_no_grad(rng, name, build, make_input, expected):
    scn.manual_seed(0)
    model = build().eval()
    x = make_input(rng)
    recorded = model(x)
    with no_grad():
        inferred = model(x)
    assert _kind(recorded) == _kind(inferred) == (expected, Tensor), name
    # with gradients enabled, the parameters' graph is recorded ...
    assert _result(recorded).requires_grad and _result(recorded)._inputs != ()
    # ... under no_grad nothing is
    assert not _result(inferred).requires_grad and _result(inferred)._inputs == ()
    np.testing.assert_array_equal(_result(inferred).data, _result(recorded).data)


# Layers and helpers without parameters: Tensor results even when nothing at all needs a
# gradient (a user's plain SparseTensor in, gradients enabled or not).
PARAMETER_FREE = [
    ("ReLU", lambda x: scn.ReLU()(x), "sparse"),
    ("Sigmoid", lambda x: scn.Sigmoid()(x), "sparse"),
    ("LeakyReLU", lambda x: scn.LeakyReLU()(x), "sparse"),
    ("Dropout (eval)", lambda x: scn.Dropout(0.5).eval()(x), "sparse"),
    ("Dropout (train)", lambda x: scn.Dropout(0.5)(x), "sparse"),
    ("MaxPooling", lambda x: scn.MaxPooling(2, 3, 2)(x), "sparse"),
    ("AveragePooling", lambda x: scn.AveragePooling(2, 3, 2)(x), "sparse"),
    ("UnPooling", lambda x: scn.UnPooling(2, 3, 2)(scn.MaxPooling(2, 3, 2)(x)), "sparse"),
    ("ShapeContext", lambda x: scn.ShapeContext(2, 3)(x), "sparse"),
    ("MeanOnlyBNLeakyReLU (no bias)", lambda x: scn.MeanOnlyBNLeakyReLU(3, False)(x),
     "sparse"),
    ("BatchNormalization (no affine)", lambda x: scn.BatchNormalization(3, affine=False)(x),
     "sparse"),
    ("SparseGroupNorm (no affine)", lambda x: scn.SparseGroupNorm(1, 3, affine=False)(x),
     "sparse"),
    ("Identity", lambda x: scn.Identity()(x), "sparse"),
    ("Sequential(Identity)", lambda x: scn.Sequential(scn.Identity())(x), "sparse"),
    ("JoinTable", lambda x: scn.JoinTable()([x, x]), "sparse"),
    ("AddTable", lambda x: scn.AddTable()([x, x]), "sparse"),
    ("AddCoords", lambda x: scn.AddCoords()(x), "sparse"),
    ("SparsifyFCS", lambda x: scn.SparsifyFCS(2)(x), "sparse"),
    ("append_tensors", lambda x: scn.append_tensors([x, x]), "sparse"),
    ("SparseToDense", lambda x: scn.SparseToDense(2, 3)(x), "dense"),
    ("DenseToSparse", lambda x: scn.DenseToSparse(2)(x.to_dense()), "sparse"),
    ("Flatten", lambda x: scn.Flatten()(x.to_dense()), "dense"),
    ("GlobalMaxPooling", lambda x: scn.GlobalMaxPooling()(x), "dense"),
    ("GlobalSumPooling", lambda x: scn.GlobalSumPooling()(x), "dense"),
    ("compare_sparse", lambda x: scn.compare_sparse(x, scn.ReLU()(x)), "dense"),
]


@pytest.mark.parametrize("name, run, expected", PARAMETER_FREE,
                         ids=[p[0] for p in PARAMETER_FREE])
def test_parameter_free_layers_return_tensors_from_plain_input(rng, name, run, expected):
    x = _sparse_input(rng)
    assert not isinstance(x.features, Tensor)            # a user's plain SparseTensor
    scn.manual_seed(1)
    out = run(x)
    scn.manual_seed(1)
    with no_grad():
        quiet = run(x)
    for result in (out, quiet):
        assert _kind(result) == (expected, Tensor), name
        assert not _result(result).requires_grad and _result(result)._inputs == ()
    np.testing.assert_array_equal(_result(out).data, _result(quiet).data)


INPUT_CHAINS = [
    ("InputLayer -> OutputLayer", lambda: scn.Sequential(
        scn.InputLayer(2, (9, 9)), scn.OutputLayer(2)), _rows_input, "dense"),
    ("InputLayer -> ReLU -> OutputLayer", lambda: scn.Sequential(
        scn.InputLayer(2, (9, 9), mode="first"), scn.ReLU(), scn.OutputLayer(2)),
     _rows_input, "dense"),
    ("InputLayer", lambda: scn.InputLayer(2, (9, 9), mode="max"), _rows_input, "sparse"),
    ("InputLayer -> SparseToDense", lambda: scn.Sequential(
        scn.InputLayer(2, (9, 9)), scn.SparseToDense(2, 3)), _rows_input, "dense"),
    ("BLInputLayer", lambda: scn.BLInputLayer(2, (9, 9)), _bl_input, "sparse"),
    ("BLInputLayer -> BLOutputLayer", lambda: scn.Sequential(
        scn.BLInputLayer(2, (9, 9), mode=2), scn.BLOutputLayer(2)), _bl_input, "dense"),
]


@pytest.mark.parametrize("name, build, make_input, expected", INPUT_CHAINS,
                         ids=[c[0] for c in INPUT_CHAINS])
def test_input_layers_without_parameters_return_tensors(rng, name, build, make_input,
                                                        expected):
    # plain coordinate and feature arrays in, no parameter on the way: still Tensors
    model = build()
    x = make_input(rng)
    out = model(x)
    with no_grad():
        quiet = model(x)
    for result in (out, quiet):
        assert _kind(result) == (expected, Tensor), name
        assert not _result(result).requires_grad and _result(result)._inputs == ()
    np.testing.assert_array_equal(_result(out).data, _result(quiet).data)


def test_plain_input_features_are_wrapped_not_copied(rng):
    x = _sparse_input(rng)
    y = scn.Identity()(x)
    assert y.features.data is x.features and y.sites is x.sites and y.grid is x.grid
    assert scn.Identity()(y) is y                  # Tensor features: passed through as is


def test_gradients_still_reach_a_user_tensor(rng):
    x = _sparse_input(rng)
    leaf = Tensor(x.features, requires_grad=True)
    out = scn.Sequential(scn.ReLU(), scn.MaxPooling(2, 3, 2), scn.SparseToDense(2, 3))(
        x.with_features(leaf))
    out.sum().backward()
    assert leaf.grad is not None and leaf.grad.shape == x.features.shape
    assert np.count_nonzero(leaf.grad) > 0
