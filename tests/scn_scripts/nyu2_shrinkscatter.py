"""RGB-D semantic segmentation as SCN's examples/nyu2/train.py: frames of (pixel x,
pixel y, depth) points at a quarter of their resolution in a 65536^3 grid, batched by
``scn.batch_location_tensors``, through SCN's ShrinkScatter network (ConcatTable /
AddTable of a NetworkInNetwork head at every level, strided Convolution down and
UnPooling up), InputLayer(dimension=3, spatial_size=65536, mode=4) and OutputLayer
called with keywords, ``ValidConvolution``; SGD (Nesterov) with SCN's decay set through
``param_groups``, ``F.cross_entropy`` with -100 (unlabelled pixels) ignored, accuracy
over the labelled points (``predictions[targets >= 0]``, ``predictions.max(1)[1]``) and a
test pass averaging ``testReps`` views (``predictions.view(testReps, -1, nClasses)``).

Data in the format of SCN's prepare_data.py, after train.py's conversions: per frame
coords (N, 3) float (pixel x - 320, pixel y - 240, centred depth in cm), features (N, 4)
(1, r, g, b) in [-1, 1], labels (N,) in {-100, 0..39}; a synthetic frame is a smooth depth
surface with a class per image block and 10% unlabelled pixels, sampled every ``step``
pixels (SCN: every pixel of 560 x 425).

    python tests/scn_scripts/nyu2_shrinkscatter.py [steps]
"""

import math
import sys
import time

import numpy as np

import sparsegrid.autodiff
import sparsegrid.backend
import sparsegrid.nn
import sparsegrid.nn as scn
import sparsegrid.nn.functional as F
from sparsegrid.autodiff import Tensor

downscale = 2
testReps = 1
nClasses = 40
device = 'cuda:0' if sparsegrid.backend.cuda_available() else 'cpu'


def frame(rng, step=4):
    """One frame: [coords, features, targets] as train.py holds them."""
    x, y = np.meshgrid(np.arange(40, 600, step), np.arange(45, 470, step), indexing='ij')
    x, y = x.ravel(), y.ravel()
    phase = rng.uniform(0, 2 * math.pi, 2)
    depth = 300 + 100 * np.sin(x / 90.0 + phase[0]) + 50 * np.cos(y / 70.0 + phase[1])
    coords = np.stack([x - 320, y - 240, depth - depth.mean()], 1).astype(np.float32)
    label = ((x // 80) * 7 + (y // 90) * 3 + rng.integers(0, 40)) % 40
    label[rng.random(len(label)) < 0.1] = -100
    rgb = np.concatenate([np.full((len(x), 1), 255.0), 127.5 + 100 * np.stack(
        [np.sin(label), np.cos(label), np.sin(3 * label)], 1) + rng.normal(0, 10, (len(x), 3))], 1)
    return [Tensor(coords), Tensor(np.clip(rgb, 0, 255).astype(np.float32)) / 127.5 - 1,
            Tensor(label.astype(np.int64))]


def merge(rng, tbl, train=True):
    """SCN's train_merge / test_merge: rotate (train), scale by 1/downscale, jitter
    (train), mirror, offset into the 65536^3 grid; batch_location_tensors."""
    locations_, features_, targets_ = [], [], []
    for coords, irgb, targets in tbl:
        m = np.eye(3)
        if train:
            theta = rng.random() * 0.2 - 0.1
            m[0, 0], m[0, 2] = math.cos(theta), math.sin(theta)
            m[2, 0], m[2, 2] = -math.sin(theta), math.cos(theta)
        m /= downscale
        if train:
            m += rng.uniform(-0.05, 0.05, (3, 3))
        if rng.random() < 0.5:
            m[:, 0] *= -1
        c = np.matmul(coords.numpy(), m) + rng.random(3) * 24000 - 12000 + 32768
        locations_.append(c.astype(np.int64))
        features_.append(irgb.numpy())
        targets_.append(targets.numpy())
    return (scn.batch_location_tensors(locations_), Tensor(np.concatenate(features_, 0)),
            Tensor(np.concatenate(targets_, 0)))


def ShrinkScatterC22l(dimension, nPlanes, nClasses, reps, depth=4):
    def l(x):
        return x + nPlanes

    def foo(nPlanes):
        m = scn.Sequential()
        for _ in range(reps):
            m.add(scn.BatchNormReLU(nPlanes))
            m.add(scn.SubmanifoldConvolution(dimension, nPlanes, nPlanes, 3, False))
        return m

    def bar(nPlanes, bias):
        m = scn.Sequential()
        m.add(scn.BatchNormReLU(nPlanes))
        m.add(scn.NetworkInNetwork(nPlanes, nClasses, bias))  # accumulate softmax input
        return m

    def baz(depth, nPlanes):
        if depth == 1:
            return scn.Sequential().add(foo(nPlanes)).add(bar(nPlanes, True))
        return scn.Sequential().add(foo(nPlanes)).add(scn.ConcatTable().add(
            bar(nPlanes, False)).add(
            scn.Sequential()
               .add(scn.BatchNormReLU(nPlanes))
               .add(scn.Convolution(dimension, nPlanes, l(nPlanes), 2, 2, False))
               .add(baz(depth - 1, l(nPlanes)))
               .add(scn.UnPooling(dimension, 2, 2)))).add(scn.AddTable())
    return baz(depth, nPlanes)


class Model(sparsegrid.nn.Module):
    def __init__(self, depth=9):
        sparsegrid.nn.Module.__init__(self)
        self.sparseModel = scn.Sequential(
            scn.InputLayer(dimension=3, spatial_size=65536, mode=4),
            scn.ValidConvolution(3, 4, 16, 3, False),
            ShrinkScatterC22l(3, 16, nClasses, 1, depth),
            scn.OutputLayer(dimension=3))

    def forward(self, x):
        x = self.sparseModel(x)
        return x


def main(steps=20, batch_size=2, pixel_step=4, depth=9, n_frames=4, fixed_batch=False,
         seed=0, steps_per_epoch=2):
    """Train for ``steps`` batches, testing after power-of-two epochs; returns the
    training loss of each step."""
    scn.manual_seed(seed)
    rng = np.random.default_rng(seed)
    train_data = [frame(rng, pixel_step) for _ in range(n_frames)]
    test_data = [frame(rng, pixel_step) for _ in range(batch_size)]
    model = Model(depth)
    p = {'initial_lr': 1e-1, 'lr_decay': 0.02, 'weight_decay': 1e-4, 'momentum': 0.9}
    model.to(device)
    optimizer = sparsegrid.nn.optim.SGD(model.parameters(), lr=p['initial_lr'],
                                        momentum=p['momentum'],
                                        weight_decay=p['weight_decay'], nesterov=True)
    print('#parameters', sum([x.nelement() for x in model.parameters()]))
    fixed = merge(rng, train_data[:batch_size]) if fixed_batch else None
    losses = []
    epoch = 0
    while len(losses) < steps:
        epoch += 1
        model.train()
        stats = {'n': 0, 'c': 0, 'loss': 0}
        for param_group in optimizer.param_groups:
            param_group['lr'] = p['initial_lr'] * math.exp((1 - epoch) * p['lr_decay'])
        scn.forward_pass_multiplyAdd_count = 0
        scn.forward_pass_hidden_states = 0
        start = time.time()
        for _ in range(min(steps_per_epoch, steps - len(losses))):
            xyz, rgb, targets = fixed or merge(rng, [train_data[i] for i in rng.choice(
                n_frames, batch_size, replace=False)])
            optimizer.zero_grad()
            predictions = model((xyz, rgb.to(device)))
            targets = targets.to(device)
            loss = F.cross_entropy(predictions, targets)
            loss.backward()
            optimizer.step()
            with sparsegrid.autodiff.no_grad():
                predictions = predictions[targets >= 0]
                targets = targets[targets >= 0]
                stats['n'] += predictions.size(0)
                stats['c'] += (predictions.max(1)[1] == targets).long().sum().item()
                stats['loss'] += loss * predictions.size(0)
            losses.append(loss.item())
            print('train', loss.item(), stats['c'] / stats['n'], stats['loss'] / stats['n'])
        print('train epoch', epoch, stats['c'] / stats['n'],
              'MegaMulAdd=', scn.forward_pass_multiplyAdd_count / n_frames / 1e6,
              'MegaHidden', scn.forward_pass_hidden_states / n_frames / 1e6,
              'time=', time.time() - start, 's')

        if scn.is_power2(epoch):
            with sparsegrid.autodiff.no_grad():
                model.eval()
                stats = {'n': 0, 'c': 0, 'loss': 0}
                start = time.time()
                xyz, rgb, targets = merge(rng, test_data, train=False)
                predictions = model((xyz, rgb.to(device)))
                targets = targets.to(device)
                targets = targets[:targets.numel() // testReps]
                predictions = predictions.view(testReps, -1, nClasses).mean(0)
                loss = F.cross_entropy(predictions, targets)
                predictions = predictions[targets >= 0]
                targets = targets[targets >= 0]
                stats['n'] += predictions.size(0)
                stats['c'] += (predictions.max(1)[1] == targets).long().sum().item()
                stats['loss'] += loss * predictions.size(0)
                print('test epoch', epoch, stats['c'] / stats['n'], 'time=',
                      time.time() - start, 's')
    return losses


if __name__ == '__main__':
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 20)
