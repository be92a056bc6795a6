"""Synthetic online handwriting in the format of SCN's Assamese and Chinese
``data.py``: what their merge functions return, a dict per batch

    {'input': scn.InputLayerInput(coords (N, 3) int64, (x, y, sample) -- the batch index
     last, features (N, 3) float32: the unit pen direction and a 1),
     'target': (B,) int64 class labels, 'idx': (B,) int64 sample numbers}

Each class is a fixed set of 2 to 5 smooth pen strokes (cubic Bezier curves in the unit
square, drawn from the class number); a sample redraws its class's strokes with a little
noise, scaled by ``scale`` (SCN's 63) and sampled at unit arc length, as SCN's ``interp``
does, so a character has about as many sites as a real one (150-400). Training batches
may get the Assamese TrainMergeFn's distortion: a random shear or rotation of up to 0.2
and a centre jitter of up to 8, the pen directions turned with the strokes and
renormalised (the Chinese MergeFn only centres the characters).
"""

import numpy as np

import sparsegrid.nn as scn


def class_strokes(label):
    """The strokes of class ``label``: a list of (40, 2) polylines in [-0.45, 0.45]^2."""
    rng = np.random.default_rng(1000003 + int(label))
    t = np.linspace(0, 1, 40)[:, None]
    strokes = []
    for _ in range(rng.integers(2, 6)):
        p = rng.uniform(-0.45, 0.45, (4, 2))
        strokes.append((1 - t) ** 3 * p[0] + 3 * (1 - t) ** 2 * t * p[1]
                       + 3 * (1 - t) * t ** 2 * p[2] + t ** 3 * p[3])
    return strokes


def character(rng, label, scale=63):
    """One sample of class ``label``: points (n, 2) float at unit spacing along the
    strokes, and the unit pen direction (n, 2) at each."""
    coords, directions = [], []
    for stroke in class_strokes(label):
        stroke = (stroke + rng.normal(0, 0.01, stroke.shape)) * (scale - 1e-3)
        delta = stroke[1:] - stroke[:-1]
        length = np.sqrt((delta ** 2).sum(1)) + 1e-9
        arc = np.concatenate([[0], np.cumsum(length)])
        u = np.arange(0, arc[-1])
        coords.append(np.stack([np.interp(u, arc, stroke[:, i]) for i in range(2)], 1))
        segment = np.minimum(np.searchsorted(arc, u, side='right') - 1, len(delta) - 1)
        directions.append(delta[segment] / length[segment, None])
    return np.concatenate(coords), np.concatenate(directions)


def merge(rng, labels, spatial_size, first_idx=0, distort=True, jitter=8, scale=63):
    """A batch of characters of ``labels`` centred in ``spatial_size``, as SCN's
    TrainMergeFn (``distort``) or TestMergeFn builds it."""
    center = np.asarray(spatial_size, np.float64) / 2
    locations, features = [], []
    for idx, label in enumerate(labels):
        coords, f = character(rng, label, scale)
        if distort:
            m = np.eye(2)
            r, alpha = rng.integers(0, 3), rng.uniform(-0.2, 0.2)
            if r == 1:
                m[0, 1] = alpha
            elif r == 2:
                m[1, 0] = alpha
            else:
                m = m @ np.array([[np.cos(alpha), np.sin(alpha)],
                                  [-np.sin(alpha), np.cos(alpha)]])
            coords = coords @ m + rng.uniform(center - jitter, center + jitter, (1, 2))
            f = f @ m
            f /= np.sqrt((f ** 2).sum(1, keepdims=True))
        else:
            coords = coords + center
        coords = np.floor(coords).astype(np.int64)
        locations.append(np.concatenate([coords, np.full((len(coords), 1), idx)], 1))
        features.append(np.concatenate([f, np.ones((len(f), 1))], 1).astype(np.float32))
    return {'input': scn.InputLayerInput(np.concatenate(locations),
                                         np.concatenate(features)),
            'target': np.asarray(labels, np.int64),
            'idx': np.arange(first_idx, first_idx + len(labels), dtype=np.int64)}


class BatchDataset:
    """``n_batches`` batches of ``batch_size`` random characters of ``n_classes``
    classes (``distort``: as :func:`merge`); ``dataset[k]`` builds batch ``k``
    (deterministically, from ``seed`` and k), so SCN's ``threadDatasetIterator`` can load
    them on threads."""

    def __init__(self, n_classes, n_batches, batch_size, spatial_size, distort=True, seed=0):
        self.n_classes, self.n_batches, self.batch_size = n_classes, n_batches, batch_size
        self.spatial_size, self.distort, self.seed = spatial_size, distort, seed

    def __len__(self):
        return self.n_batches

    def __getitem__(self, k):
        if not 0 <= k < self.n_batches:
            raise IndexError(k)
        rng = np.random.default_rng([self.seed, k])
        labels = rng.integers(0, self.n_classes, self.batch_size)
        return merge(rng, labels, self.spatial_size, k * self.batch_size, self.distort)
