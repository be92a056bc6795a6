"""sparsegrid.nn.utils: SCN's append_tensors and compare_sparse, values against dense
references and gradients against float64 finite differences."""

from __future__ import annotations

import numpy as np
import pytest

import sparsegrid.nn as scn
from nn_helpers import dense, sparse
from sparsegrid.autodiff import check_gradients
from sparsegrid.autodiff.core import data_of


def test_append_tensors_concatenates_batches(rng):
    a, b = sparse(rng, (5, 6), batch=2), sparse(rng, (5, 6), batch=3, empty=(1,))
    joined = scn.append_tensors([a, b])
    assert joined.batch_size == 5
    expected = np.concatenate([dense(a), dense(b)], axis=0)
    np.testing.assert_array_equal(dense(joined), expected)
    with pytest.raises(ValueError, match="tensor 1"):
        scn.append_tensors([a, sparse(rng, (5, 7))])
    fa, fb = a.features.astype(np.float64), b.features.astype(np.float64)
    check_gradients(lambda f, g: scn.append_tensors(
        [a.with_features(f), b.with_features(g)]).features, [fa, fb])


def test_compare_sparse_is_the_mean_squared_difference_over_the_union(rng):
    x = sparse(rng, (6, 6), batch=2, dtype=np.float64)
    y = sparse(rng, (6, 6), batch=2, dtype=np.float64)
    dx, dy = dense(x), dense(y)
    union = ((np.abs(dx).sum(axis=1) > 0) | (np.abs(dy).sum(axis=1) > 0)).sum()
    expected = ((dx - dy) ** 2).sum() / union
    assert abs(float(data_of(scn.compare_sparse(x, y))) - expected) < 1e-12
    check_gradients(lambda f, g: scn.compare_sparse(x.with_features(f), y.with_features(g)),
                    [x.features, y.features])
