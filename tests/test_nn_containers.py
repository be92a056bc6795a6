"""sparsegrid.nn.containers: Sequential, ConcatTable, JoinTable, AddTable, Identity,
VerboseIdentity, the functional tables and CheckpointedSequential; input_spatial_size
through layers and containers."""

from __future__ import annotations

import numpy as np
import pytest

import sparsegrid as sg
import sparsegrid.nn as scn
from nn_helpers import SHAPES, close, sparse, values, w64
from sparsegrid.autodiff import Tensor, ops


# --------------------------------------------------------------------------------------
# tables and Sequential
# --------------------------------------------------------------------------------------
def test_concat_join_add_tables(rng):
    x = sparse(rng, SHAPES[2], channels=3)
    a, b = scn.NetworkInNetwork(3, 2), scn.NetworkInNetwork(3, 2)
    outputs = scn.ConcatTable(a, b, scn.Identity())(x)
    assert isinstance(outputs, list) and len(outputs) == 3
    # Identity: the same sites, grid and values; plain features come back as a Tensor
    assert outputs[2].sites is x.sites and outputs[2].grid is x.grid
    assert isinstance(outputs[2].features, Tensor) and outputs[2].features.data is x.features
    fa, fb = np.asarray(x.features, np.float64) @ w64(a.weight), \
        np.asarray(x.features, np.float64) @ w64(b.weight)
    joined = scn.JoinTable()(outputs)
    assert joined.sites is x.sites
    close(joined.features, np.concatenate([fa, fb, x.features], axis=1))
    close(scn.AddTable()(outputs[:2]).features, fa + fb)
    table = scn.ConcatTable().add(a).add(b)
    assert len(table) == 2 and table[1] is b and list(table) == [a, b]


def test_join_and_add_tables_check_their_inputs(rng):
    x = sparse(rng, SHAPES[2], channels=3)
    other = sparse(rng, SHAPES[2], channels=3)
    with pytest.raises(ValueError, match="same sites"):
        scn.JoinTable()([x, other])
    with pytest.raises(ValueError, match="same sites"):
        scn.AddTable()([x, other])
    with pytest.raises(ValueError, match=r"equal channel counts; got \[2, 3\]"):
        scn.AddTable()([x, scn.NetworkInNetwork(3, 2)(x)])
    with pytest.raises(TypeError, match="list"):
        scn.JoinTable()(x)
    with pytest.raises(TypeError, match="not a SparseTensor"):
        scn.AddTable()([x, x.features])
    # Equal sites in a different tensor (same rows) are accepted.
    twin = sg.SparseTensor(x.features, x.indices, x.spatial_shape, x.batch_size)
    close(scn.AddTable()([x, twin]).features, 2 * np.asarray(x.features, np.float64))


def test_sequential_editing(rng):
    a, b, c = scn.ReLU(), scn.Tanh(), scn.Sigmoid()
    seq = scn.Sequential(a)
    assert seq.add(b) is seq and seq.append(c) is seq
    assert list(seq) == [a, b, c] and len(seq) == 3 and seq[-1] is c
    d = scn.ELU()
    assert seq.insert(1, d) is seq
    assert list(seq) == [a, d, b, c]
    assert [name for name, _ in seq.named_children()] == ["0", "1", "2", "3"]
    seq.insert(-1, scn.SELU())
    assert [type(m).__name__ for m in seq] == ["ReLU", "ELU", "Tanh", "SELU", "Sigmoid"]
    with pytest.raises(IndexError):
        seq.insert(9, scn.ReLU())
    with pytest.raises(TypeError, match="Module"):
        seq.add(lambda t: t)
    part = seq[1:3]
    assert isinstance(part, scn.Sequential) and list(part) == [d, b]
    assert len(seq) == 5                                         # slicing copies nothing
    joined = seq + scn.Sequential(scn.ReLU(), scn.Tanh())
    assert len(joined) == 7 and len(seq) == 5 and joined[0] is a
    assert len(seq + scn.ReLU()) == 6
    x = sparse(rng, SHAPES[1], channels=2)
    expected = 1 / (1 + np.exp(-np.tanh(np.maximum(x.features.astype(np.float64), 0))))
    close(scn.Sequential(a, b, c)(x).features, expected, 1e-6)
    # Keys after insert are renumbered (SCN/PyTorch naming).
    net = scn.Sequential(scn.NetworkInNetwork(2, 2)).insert(0, scn.BatchNormalization(2))
    assert list(net.state_dict())[:2] == ["0.weight", "0.bias"]
    assert list(net.state_dict())[-1] == "1.weight"


def test_sequential_slices_keep_their_keys():
    net = scn.Sequential(scn.NetworkInNetwork(2, 3), scn.ReLU(), scn.NetworkInNetwork(3, 4))
    assert list(net[1:].state_dict()) == ["2.weight"]
    assert net[2] is list(net)[2]


def test_functional_tables_and_verbose_identity(rng, capsys):
    x = sparse(rng, (5, 5), channels=2)
    y = x.with_features(x.features * 2)
    close(scn.concatenate_feature_planes([x, y]).features,
          np.concatenate([values(x), values(y)], axis=1))
    close(scn.add_feature_planes([x, y]).features, 3 * values(x))
    same = scn.VerboseIdentity()(x)
    assert same.sites is x.sites and same.features.data is x.features
    assert scn.VerboseIdentity()(same) is same      # Tensor features: the input itself
    assert "SparseTensor(" in capsys.readouterr().out


def test_checkpointed_sequential_gives_the_same_values_and_gradients(rng):
    x0 = sparse(rng, (9, 9), channels=3, dtype=np.float64)

    def run(cls):
        scn.manual_seed(1)
        net = cls(scn.SubmanifoldConvolution(2, 3, 4, 3, True), scn.BatchNormLeakyReLU(4),
                  scn.Dropout(0.3), scn.Convolution(2, 4, 5, 3, 2, False)).double()
        scn.manual_seed(5)                                  # the same dropout masks
        leaf = Tensor(np.array(x0.features), requires_grad=True)
        y = net(x0.with_features(leaf))
        ops.sum(ops.mul(y.features, y.features)).backward()
        return y, leaf.grad, [p.grad for p in net.parameters()]

    plain, checkpointed = run(scn.Sequential), run(scn.CheckpointedSequential)
    np.testing.assert_array_equal(values(plain[0]), values(checkpointed[0]))
    np.testing.assert_array_equal(plain[1], checkpointed[1])
    for a, b in zip(plain[2], checkpointed[2]):
        np.testing.assert_array_equal(a, b)
    # Nothing of the inner layers is kept for the backward pass: one recorded node.
    scn.manual_seed(1)
    net = scn.CheckpointedSequential(scn.SubmanifoldConvolution(2, 3, 4, 3, True),
                                     scn.ReLU()).double()
    y = net(x0.with_features(Tensor(np.array(x0.features), requires_grad=True)))
    assert all(not getattr(t, "_inputs", ()) for t in y.features._inputs)


# --------------------------------------------------------------------------------------
# spatial sizes
# --------------------------------------------------------------------------------------
def test_input_spatial_size():
    assert list(scn.Convolution(2, 1, 1, 3, 2, False).input_spatial_size(np.array([5, 4]))) \
        == [11, 9]
    assert list(scn.Convolution(2, 1, 1, (3, 2), (2, 1), False).input_spatial_size(5)) == [11, 6]
    assert list(scn.MaxPooling(3, 3, 2).input_spatial_size(4)) == [9, 9, 9]
    assert list(scn.AveragePooling(1, 2, 2).input_spatial_size([3])) == [6]
    assert list(scn.Deconvolution(2, 1, 1, 3, 2, False).input_spatial_size([11, 9])) == [5, 4]
    assert list(scn.FullConvolution(1, 1, 1, 2, 2, False).input_spatial_size([8])) == [4]
    with pytest.raises(ValueError, match="no input size"):
        scn.Deconvolution(2, 1, 1, 3, 2, False).input_spatial_size([10, 9])
    # UnPooling: the inverse of the op (SCN returns (o - 1) s + f here, which is wrong).
    assert list(scn.UnPooling(2, 3, 2).input_spatial_size([11, 9])) == [5, 4]
    assert scn.SubmanifoldConvolution(2, 1, 1, 3, False).input_spatial_size(7) == 7
    assert scn.BatchNormReLU(3).input_spatial_size(7) == 7
    seq = scn.Sequential(scn.Convolution(2, 1, 1, 2, 2, False), scn.MaxPooling(2, 3, 2),
                         scn.SubmanifoldConvolution(2, 1, 1, 3, False))
    assert list(seq.input_spatial_size(np.array([4, 4]))) == [18, 18]
    # ConcatTable delegates to its first branch.
    table = scn.ConcatTable(scn.MaxPooling(2, 3, 2), scn.Identity())
    assert list(table.input_spatial_size([4, 4])) == [9, 9]


def test_transposed_input_spatial_size_must_be_exact():
    assert scn.UnPooling(2, 3, 2).input_spatial_size(np.array([9, 9])).tolist() == [4, 4]
    with pytest.raises(ValueError, match="multiple of the stride"):
        scn.UnPooling(2, 3, 2).input_spatial_size(np.array([10, 10]))
