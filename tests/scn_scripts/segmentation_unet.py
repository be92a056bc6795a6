"""3-D part segmentation with a UNet, as SCN's examples/3d_segmentation/unet.py:
InputLayer (mode 3) on a 192^3 grid, SubmanifoldConvolution, scn.UNet (downsample
[2, 2]), BatchNormReLU, OutputLayer back onto the input points, a Linear head over the
50 part classes of 16 categories; ``nn.CrossEntropyLoss`` (here with ``ignore_index``:
points labelled -100 carry no label), SGD with Nesterov momentum, the features' and
labels' ``.type('torch.FloatTensor')`` casts, ``scn.forward_pass_multiplyAdd_count``,
and SCN's per-category part IoU.

Data in the format of SCN's data.py: ``{'x': [coords (N, 4) int64, features (N, 1)],
'y', 'categ', 'classOffset', 'nClasses', 'mask', 'xf', 'nPoints'}``; each synthetic model
is a category's parts as ellipsoid surfaces (about 2,500 points in the unit ball, like a
ShapeNet .pts file), randomly rotated, mirrored and shifted as SCN does, voxelized at
resolution 24 (``floor(24 * (4 + x))``); 3% of the points are labelled -100.

    python tests/scn_scripts/segmentation_unet.py [steps]
"""

import math
import sys
import time

import numpy as np

import sparsegrid.backend
import sparsegrid.nn as nn
import sparsegrid.nn as scn
import sparsegrid.nn.optim as optim
from sparsegrid.autodiff import Tensor, no_grad

categories = ["02691156", "02773838", "02954340", "02958343", "03001627", "03261776",
              "03467517", "03624134", "03636649", "03642806", "03790512", "03797390",
              "03948459", "04099429", "04225987", "04379243"]
nClasses = [4, 2, 2, 4, 4, 3, 3, 2, 4, 2, 6, 2, 3, 3, 3, 3]
classOffsets = np.cumsum([0] + nClasses)
nClassesTotal = int(classOffsets[-1])
resolution = 24
spatialSize = np.array([resolution * 8] * 3)
dimension = 3
reps = 1  # Conv block repetition factor


class Model(nn.Module):
    def __init__(self, m=32):
        nn.Module.__init__(self)
        nPlanes = [m, 2 * m, 3 * m, 4 * m, 5 * m]  # UNet number of features per level
        self.sparseModel = scn.Sequential().add(
            scn.InputLayer(dimension, spatialSize, mode=3)).add(
            scn.SubmanifoldConvolution(dimension, 1, m, 3, False)).add(
            scn.UNet(dimension, reps, nPlanes, residual_blocks=False, downsample=[2, 2])).add(
            scn.BatchNormReLU(m)).add(
            scn.OutputLayer(dimension))
        self.linear = nn.Linear(m, nClassesTotal)

    def forward(self, x):
        x = self.sparseModel(x)
        x = self.linear(x)
        return x


def shape(rng, category, n_points):
    """A model of ``category``: points (n, 3) on its parts' ellipsoids in the unit ball,
    and each point's part (0..nClasses[category] - 1)."""
    k = nClasses[category]
    parts = np.random.default_rng(category)                # the category's layout
    centres, radii = parts.uniform(-0.5, 0.5, (k, 3)), parts.uniform(0.15, 0.45, (k, 3))
    part = rng.integers(0, k, n_points)
    d = rng.standard_normal((n_points, 3))
    d /= np.linalg.norm(d, axis=1, keepdims=True)
    xl = centres[part] + radii[part] * (1 + rng.normal(0, 0.05, (n_points, 1))) * d
    return xl / np.sqrt((xl ** 2).sum(1).max()), part


def merge(rng, models):
    """SCN's merge: a batch of (file, xl, y, categ, classOffset, nClasses) models."""
    xl_, xf_, y_, categ_, mask_ = [], [], [], [], []
    for idx, (_, xl, y, categ, classOffset, nc) in enumerate(models):
        m = np.eye(3, dtype='float32')
        m[0, 0] *= rng.integers(0, 2) * 2 - 1
        m = np.dot(m, np.linalg.qr(rng.standard_normal((3, 3)))[0])
        xl = np.dot(xl, m) + rng.uniform(-1, 1, (1, 3)).astype('float32')
        xl = np.floor(resolution * (4 + xl)).astype('int64')
        xl_.append(np.hstack([xl, idx * np.ones((xl.shape[0], 1), dtype='int64')]))
        xf_.append(np.ones((xl.shape[0], 1), 'float32'))
        y_.append(y)
        categ_.append(np.ones(y.shape[0], dtype='int64') * categ)
        mask = np.zeros((y.shape[0], nClassesTotal), dtype='float32')
        mask[:, classOffset:classOffset + nc] = 1
        mask_.append(mask)
    return {'x': [np.vstack(xl_), Tensor(np.vstack(xf_))],
            'y': Tensor(np.hstack(y_)),
            'categ': Tensor(np.hstack(categ_)),
            'classOffset': [x[4] for x in models],
            'nClasses': [x[5] for x in models],
            'mask': Tensor(np.vstack(mask_)),
            'xf': [x[0] for x in models],
            'nPoints': [len(x[2]) for x in models]}


def dataset(rng, n_models, n_points, split='train'):
    d = []
    for i in range(n_models):
        c = int(rng.integers(0, 16))
        xl, part = shape(rng, c, n_points)
        y = (part + classOffsets[c]).astype('int64')
        y[rng.random(n_points) < 0.03] = -100                 # unlabelled points
        d.append(('train_val/%s/%06d.pts.%s' % (categories[c], i, split), xl, y, c,
                  int(classOffsets[c]), nClasses[c]))
    return d


def store(stats, batch, predictions):
    ctr = 0
    for nP, f, classOffset, nClasses_ in zip(batch['nPoints'], batch['xf'],
                                             batch['classOffset'], batch['nClasses']):
        categ, f = f.split('/')[-2:]
        stats.setdefault(categ, {}).setdefault(f, {'p': 0, 'y': 0})
        stats[categ][f]['p'] += predictions.detach()[
            ctr:ctr + nP, classOffset:classOffset + nClasses_].cpu().numpy()
        stats[categ][f]['y'] = batch['y'].detach()[ctr:ctr + nP].cpu().numpy() - classOffset
        ctr += nP


def iou(stats):
    """Mean part IoU per category (over its models and parts, labelled points only),
    averaged over the models; as SCN's iou()."""
    ious, counts = [], []
    for categ in sorted(stats):
        per_model = []
        for j in stats[categ].values():
            pred, gt = j['p'].argmax(1), j['y']
            keep = gt >= 0
            pred, gt = pred[keep], gt[keep]
            parts = np.arange(j['p'].shape[1])[:, None]
            inter = ((pred == parts) & (gt == parts)).sum(1)
            union = ((pred == parts) | (gt == parts)).sum(1)
            per_model.append(np.mean((inter + 1e-16) / (union + 1e-16)))
        ious.append(np.mean(per_model))
        counts.append(len(per_model))
    return {'iou': np.sum(np.multiply(ious, counts)) / np.sum(counts),
            'nmodels_sum': int(np.sum(counts))}


def main(steps=100, batch_size=16, n_points=2500, m=32, fixed_batch=False, seed=0,
         steps_per_epoch=10, model_class=Model):
    """Train ``model_class(m)`` for ``steps`` batches; returns the training loss of each
    step."""
    scn.manual_seed(seed)
    rng = np.random.default_rng(seed)
    model = model_class(m)
    criterion = nn.CrossEntropyLoss(ignore_index=-100)
    p = {'initial_lr': 1e-1, 'lr_decay': 4e-2, 'weight_decay': 1e-4, 'momentum': 0.9,
         'use_cuda': sparsegrid.backend.cuda_available()}
    dtype = 'torch.cuda.FloatTensor' if p['use_cuda'] else 'torch.FloatTensor'
    dtypei = 'torch.cuda.LongTensor' if p['use_cuda'] else 'torch.LongTensor'
    if p['use_cuda']:
        model.cuda()
        criterion.cuda()
    optimizer = optim.SGD(model.parameters(), lr=p['initial_lr'], momentum=p['momentum'],
                          weight_decay=p['weight_decay'], nesterov=True)
    print('#parameters', sum([x.nelement() for x in model.parameters()]))
    train = dataset(rng, batch_size * (1 if fixed_batch else min(steps, steps_per_epoch)),
                    n_points)
    fixed = merge(rng, train) if fixed_batch else None
    losses = []
    epoch = 0
    while len(losses) < steps:
        epoch += 1
        model.train()
        stats = {}
        for param_group in optimizer.param_groups:
            param_group['lr'] = p['initial_lr'] * math.exp((1 - epoch) * p['lr_decay'])
        scn.forward_pass_multiplyAdd_count = 0
        scn.forward_pass_hidden_states = 0
        start = time.time()
        order = rng.permutation(len(train))
        for b in range(0, len(train), batch_size):
            batch = fixed or merge(rng, [train[i] for i in order[b:b + batch_size]])
            optimizer.zero_grad()
            batch['x'][1] = batch['x'][1].type(dtype)
            batch['y'] = batch['y'].type(dtypei)
            batch['mask'] = batch['mask'].type(dtype)
            predictions = model(batch['x'])
            loss = criterion.forward(predictions, batch['y'])
            with no_grad():
                store(stats, batch, predictions)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
            if len(losses) == steps:
                break
        r = iou(stats)
        print('train epoch', epoch, 1, 'iou=', r['iou'], 'MegaMulAdd=',
              scn.forward_pass_multiplyAdd_count / r['nmodels_sum'] / 1e6, 'MegaHidden',
              scn.forward_pass_hidden_states / r['nmodels_sum'] / 1e6, 'time=',
              time.time() - start, 's')
    return losses


if __name__ == '__main__':
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 100)
