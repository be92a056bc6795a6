"""A Chinese-handwriting network with a stride-2 Convolution, as SCN's
examples/Chinese_handwriting/VGG-C.py: SparseVggNet to 5x5, Convolution(2, 96, 128, 3, 2)
to 1x1 (the 63x63 input), a Linear head over 3755 classes. Trained here with an explicit
loop of the kind SCN's 3-D examples use (SGD with Nesterov momentum, SCN's exponential
learning-rate decay set through ``param_groups``, ``F.cross_entropy``), batches loaded on
threads by ``scn.threadDatasetIterator``, top-1 / top-5 errors from ``sort``.

    python tests/scn_scripts/chinese_vggc.py [steps]
"""

import math
import sys
import time

import numpy as np

import sparsegrid.backend
import sparsegrid.nn as nn
import sparsegrid.nn as scn
import sparsegrid.nn.functional as F
import sparsegrid.nn.optim as optim
from handwriting_data import BatchDataset
from sparsegrid.autodiff import Tensor, no_grad

use_cuda = sparsegrid.backend.cuda_available()


# two-dimensional SparseConvNet
class Model(nn.Module):
    def __init__(self, n_classes=3755):
        nn.Module.__init__(self)
        self.sparseModel = scn.SparseVggNet(2, 3, [
            ['C', 16], ['C', 16], 'MP',
            ['C', 32], ['C', 32], 'MP',
            ['C', 48], ['C', 48], 'MP',
            ['C', 64], ['C', 64], 'MP',
            ['C', 96], ['C', 96]]
        ).add(scn.Convolution(2, 96, 128, 3, 2, False)
        ).add(scn.BatchNormReLU(128)
        ).add(scn.SparseToDense(2, 128))
        self.spatial_size = self.sparseModel.input_spatial_size(np.array([1, 1]))
        self.inputLayer = scn.InputLayer(2, self.spatial_size, 2)
        self.linear = nn.Linear(128, n_classes)

    def forward(self, x):
        x = self.inputLayer(x)
        x = self.sparseModel(x)
        x = x.view(-1, 128)
        x = self.linear(x)
        return x


def errors(predictions, target):
    """Top-1 and top-5 errors (counts) of a batch."""
    ranked = predictions.sort(1, descending=True)[1]
    hits = ranked[:, :5] == target.view(-1, 1)
    return (len(target) - hits[:, 0].sum().item(),
            len(target) - hits.any(1).sum().item())


def main(steps=100, batch_size=100, n_classes=3755, fixed_batch=False, seed=0,
         steps_per_epoch=10):
    """Train for ``steps`` batches (epochs of ``steps_per_epoch`` batches; one batch
    repeated with ``fixed_batch``); returns the training loss of each step."""
    scn.manual_seed(seed)
    model = Model(n_classes)
    if use_cuda:
        model.cuda()
    p = {'initial_lr': 0.1, 'lr_decay': 0.05, 'weight_decay': 1e-4, 'momentum': 0.9}
    optimizer = optim.SGD(model.parameters(), lr=p['initial_lr'], momentum=p['momentum'],
                          weight_decay=p['weight_decay'], nesterov=True)
    print('Input spatial size:', model.spatial_size, 'Data scale:', 63)
    print('#parameters', sum([x.nelement() for x in model.parameters()]))
    data = BatchDataset(n_classes, 1 if fixed_batch else min(steps, steps_per_epoch),
                        batch_size, model.spatial_size, False, seed)
    epoch_batches = scn.threadDatasetIterator(data, n_threads=2)
    losses = []
    epoch = 0
    while len(losses) < steps:
        epoch += 1
        model.train()
        for param_group in optimizer.param_groups:
            param_group['lr'] = p['initial_lr'] * math.exp((1 - epoch) * p['lr_decay'])
        stats = {'n': 0, 'top1': 0, 'top5': 0, 'nll': 0}
        start = time.time()
        for batch in epoch_batches():
            if use_cuda:
                batch['input'] = batch['input'].cuda()
            optimizer.zero_grad()
            predictions = model(batch['input'])
            target = Tensor(batch['target']).to(predictions.device)
            loss = F.cross_entropy(predictions, target)
            loss.backward()
            optimizer.step()
            with no_grad():
                top1, top5 = errors(predictions, target)
            stats['n'] += predictions.size(0)
            stats['top1'] += top1
            stats['top5'] += top5
            stats['nll'] += loss.item() * predictions.size(0)
            losses.append(loss.item())
            if len(losses) == steps:
                break
        print(epoch, 'train: top1=%.2f%% top5=%.2f%% nll:%.2f time:%.1fs' %
              (100 * stats['top1'] / stats['n'], 100 * stats['top5'] / stats['n'],
               stats['nll'] / stats['n'], time.time() - start))
    return losses


if __name__ == '__main__':
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 100)
