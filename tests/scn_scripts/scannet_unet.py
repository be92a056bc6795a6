"""ScanNet-style semantic segmentation on a 4096^3 grid, as SCN's
examples/ScanNet/unet.py: InputLayer(3, 4096, mode=4) (points averaged per voxel), a
7-level scn.UNet with m = 16, OutputLayer back onto the points, a Linear head over 20
classes; Adam; ``sparsegrid.nn.functional.cross_entropy`` (the port of
``torch.nn.functional.cross_entropy``) with unannotated points labelled -100 (ignored);
``scn.checkpoint_restore`` / ``scn.checkpoint_save`` every epoch, and at power-of-two
epochs a validation pass under ``no_grad`` that accumulates the predictions of every
point with ``index_add_`` into a zeros tensor and scores ``store.max(1)[1]``.

Data in the format of SCN's data.py: scenes (coords (N, 3) float32 metres, centred;
colours (N, 3) in [-1, 1]; labels (N,) in {-100, 0..19}), merged as its trainMerge /
valMerge do (scale 20, i.e. 5 cm voxels; random rotation about z, mirror, jitter, and an
offset into the 4096^3 field): ``{'x': [coords (N, 4) int64, colours], 'y': labels}``
plus ``'point_ids'`` for validation. A synthetic scene is a room: floor, four walls and
18 boxes (one per remaining class), surfaces sampled uniformly.

    python tests/scn_scripts/scannet_unet.py [steps]
"""

import math
import os
import sys
import time

import numpy as np

import sparsegrid.autodiff
import sparsegrid.backend
import sparsegrid.nn as nn
import sparsegrid.nn as scn
import sparsegrid.nn.functional
import sparsegrid.nn.optim as optim

# Options
m = 16  # 16 or 32
residual_blocks = False  # True or False
block_reps = 1  # Conv block repetition factor: 1 or 2
scale = 20  # Voxel size = 1/scale
dimension = 3
full_scale = 4096  # Input field size

use_cuda = sparsegrid.backend.cuda_available()


class Model(nn.Module):
    def __init__(self):
        nn.Module.__init__(self)
        self.sparseModel = scn.Sequential().add(
            scn.InputLayer(dimension, full_scale, mode=4)).add(
            scn.SubmanifoldConvolution(dimension, 3, m, 3, False)).add(
            scn.UNet(dimension, block_reps, [m, 2 * m, 3 * m, 4 * m, 5 * m, 6 * m, 7 * m],
                     residual_blocks)).add(
            scn.BatchNormReLU(m)).add(
            scn.OutputLayer(dimension))
        self.linear = nn.Linear(m, 20)

    def forward(self, x):
        x = self.sparseModel(x)
        x = self.linear(x)
        return x


def room(rng, n_points):
    """A scene: points (n, 3) float32 (metres, centred), colours (n, 3), labels (n,)."""
    w, d, h = rng.uniform(3, 6), rng.uniform(3, 6), 2.5
    boxes = [((0, 0, 0), (w, d, 0), 1), ((0, 0, 0), (w, 0, h), 0),
             ((0, d, 0), (w, d, h), 0), ((0, 0, 0), (0, d, h), 0), ((w, 0, 0), (w, d, h), 0)]
    for label in range(2, 20):
        x, y = rng.uniform(0.2, w - 1), rng.uniform(0.2, d - 1)
        sx, sy, sz = rng.uniform(0.2, 0.8, 3)
        boxes += [((x, y, sz), (x + sx, y + sy, sz), label),      # top
                  ((x, y, 0), (x + sx, y, sz), label)]            # a side
    lo = np.array([b[0] for b in boxes], float)
    hi = np.array([b[1] for b in boxes], float)
    extent = np.where(hi > lo, hi - lo, 1.0)
    area = extent.prod(1)
    which = rng.choice(len(boxes), n_points, p=area / area.sum())
    a = (lo[which] + (hi - lo)[which] * rng.random((n_points, 3))).astype(np.float32)
    a -= a.mean(0)
    c = np.array([b[2] for b in boxes], np.int64)[which]
    colour = (np.stack([np.sin(c), np.cos(c), np.sin(2 * c)], 1) * 0.5 +
              rng.normal(0, 0.2, (n_points, 3))).astype(np.float32)
    c[rng.random(n_points) < 0.05] = -100                 # unannotated points
    return a, colour, c


def merge(rng, scenes, train=True, offsets=None):
    """SCN's trainMerge / valMerge over ``scenes`` (a list of (a, b, c))."""
    locs, feats, labels, point_ids = [], [], [], []
    for idx, (a, b, c) in enumerate(scenes):
        mat = np.eye(3) + (rng.standard_normal((3, 3)) * 0.1 if train else 0)
        mat[0][0] *= rng.integers(0, 2) * 2 - 1
        mat *= scale
        theta = rng.random() * 2 * math.pi
        mat = np.matmul(mat, [[math.cos(theta), math.sin(theta), 0],
                              [-math.sin(theta), math.cos(theta), 0], [0, 0, 1]])
        a = np.matmul(a, mat)
        lo, hi = a.min(0), a.max(0)
        a = a - lo + np.clip(full_scale - hi + lo - 0.001, 0, None) * rng.random(3)
        idxs = (a.min(1) >= 0) * (a.max(1) < full_scale)
        locs.append(np.hstack([a[idxs].astype(np.int64),
                               np.full((int(idxs.sum()), 1), idx, np.int64)]))
        feats.append(b[idxs] + (rng.standard_normal(3).astype(np.float32) * 0.1 if train
                                else 0))
        labels.append(c[idxs])
        if offsets is not None:
            point_ids.append(np.nonzero(idxs)[0] + offsets[idx])
    batch = {'x': [np.vstack(locs), sparsegrid.autodiff.Tensor(np.vstack(feats))],
             'y': sparsegrid.autodiff.Tensor(np.hstack(labels))}
    if offsets is not None:
        batch['point_ids'] = np.hstack(point_ids)
    return batch


def confusion_iou(pred_ids, gt_ids):
    """Mean IoU over the classes present (SCN's iou.evaluate, without the table)."""
    keep = gt_ids >= 0
    confusion = np.bincount(pred_ids[keep] * 20 + gt_ids[keep],
                            minlength=400).reshape((20, 20))
    tp = np.diag(confusion)
    denom = confusion.sum(0) + confusion.sum(1) - tp
    return float(np.mean(tp[denom > 0] / denom[denom > 0]))


def main(steps=16, exp_name='unet_scale20_m16_rep1_notResidualBlocks', batch_size=2,
         n_points=20000, n_scenes=4, steps_per_epoch=2, fixed_batch=False, seed=0):
    """Train up to epoch ``ceil(steps / steps_per_epoch)``, resuming from the latest
    checkpoint ``exp_name-<epoch>-unet.pth``; returns the training loss of each step run."""
    scn.manual_seed(seed)
    rng = np.random.default_rng(seed)
    train = [room(rng, n_points) for _ in range(n_scenes)]
    val = [room(rng, n_points) for _ in range(max(1, n_scenes // 2))]
    valOffsets = np.cumsum([0] + [len(x[2]) for x in val])
    valLabels = np.hstack([x[2] for x in val])
    print('Training examples:', len(train))
    print('Validation examples:', len(val))

    unet = Model()
    if use_cuda:
        unet = unet.cuda()
    training_epochs = math.ceil(steps / steps_per_epoch)
    training_epoch = scn.checkpoint_restore(unet, exp_name, 'unet', use_cuda)
    optimizer = optim.Adam(unet.parameters())
    print('#classifer parameters', sum([x.nelement() for x in unet.parameters()]))
    fixed = merge(rng, train[:batch_size]) if fixed_batch else None
    losses = []
    for epoch in range(training_epoch, training_epochs + 1):
        unet.train()
        scn.forward_pass_multiplyAdd_count = 0
        scn.forward_pass_hidden_states = 0
        start = time.time()
        train_loss = 0
        for i in range(steps_per_epoch):
            if fixed is None:
                batch = merge(rng, [train[j] for j in rng.choice(len(train), batch_size,
                                                                 replace=False)])
            else:
                batch = fixed
            optimizer.zero_grad()
            if use_cuda:
                batch['x'][1] = batch['x'][1].cuda()
                batch['y'] = batch['y'].cuda()
            predictions = unet(batch['x'])
            loss = sparsegrid.nn.functional.cross_entropy(predictions, batch['y'])
            train_loss += loss.item()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        print(epoch, 'Train loss', train_loss / (i + 1), 'MegaMulAdd=',
              scn.forward_pass_multiplyAdd_count / len(train) / 1e6, 'MegaHidden',
              scn.forward_pass_hidden_states / len(train) / 1e6, 'time=',
              time.time() - start, 's')
        scn.checkpoint_save(unet, exp_name, 'unet', epoch, use_cuda)

        if scn.is_power2(epoch):
            with sparsegrid.autodiff.no_grad():
                unet.eval()
                store = sparsegrid.autodiff.Tensor(np.zeros((valOffsets[-1], 20), np.float32))
                scn.forward_pass_multiplyAdd_count = 0
                scn.forward_pass_hidden_states = 0
                start = time.time()
                for b in range(0, len(val), batch_size):
                    batch = merge(rng, val[b:b + batch_size], False, valOffsets[b:])
                    if use_cuda:
                        batch['x'][1] = batch['x'][1].cuda()
                        batch['y'] = batch['y'].cuda()
                    predictions = unet(batch['x'])
                    store.index_add_(0, batch['point_ids'], predictions.cpu())
                print(epoch, 1, 'Val MegaMulAdd=',
                      scn.forward_pass_multiplyAdd_count / len(val) / 1e6, 'MegaHidden',
                      scn.forward_pass_hidden_states / len(val) / 1e6, 'time=',
                      time.time() - start, 's')
                print('mean IOU', confusion_iou(store.max(1)[1].numpy(), valLabels))
    return losses


if __name__ == '__main__':
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 16,
         os.path.join(os.getcwd(), 'unet_scale20_m16_rep1_notResidualBlocks'))
