"""A VGG+ handwriting classifier trained through scn.ClassificationTrainValidate, as
SCN's examples/Assamese_handwriting/VGGplus.py: the same network (SparseVggNet with
VGG+ side branches, a 5x5 Convolution to 1x1, a Linear head over 183 classes), SCN's
options dict, SGD with Nesterov momentum and SCN's exponential learning-rate decay.

Data: synthetic pen strokes in the format of SCN's data.py (handwriting_data.py). Each
"epoch" of ClassificationTrainValidate here is one training batch (SCN's older
``dataset['train']()`` form, a function returning the epoch's batches), so its per-epoch
lines are per step.

    python tests/scn_scripts/assamese_vggplus.py [steps]
"""

import sys

import numpy as np

import sparsegrid.backend
import sparsegrid.nn as nn
import sparsegrid.nn as scn
from handwriting_data import BatchDataset


# two-dimensional SparseConvNet
class Model(nn.Module):
    def __init__(self, n_classes=183):
        nn.Module.__init__(self)
        self.sparseModel = scn.Sequential(
            scn.SparseVggNet(2, 3, [
                ['C', 8, ], ['C', 8], 'MP',
                ['C', 16], ['C', 16], 'MP',
                ['C', 16, 8], ['C', 16, 8], 'MP',
                ['C', 24, 8], ['C', 24, 8], 'MP']),
            scn.Convolution(2, 32, 64, 5, 1, False),
            scn.BatchNormReLU(64),
            scn.SparseToDense(2, 64))
        self.spatial_size = self.sparseModel.input_spatial_size(np.array([1, 1]))
        self.inputLayer = scn.InputLayer(2, self.spatial_size, 2)
        self.linear = nn.Linear(64, n_classes)

    def forward(self, x):
        x = self.inputLayer(x)
        x = self.sparseModel(x)
        x = x.view(-1, 64)
        x = self.linear(x)
        return x


def main(steps=100, batch_size=108, val_batch_size=183, n_classes=183, fixed_batch=False,
         seed=0):
    """Train for ``steps`` batches; returns ClassificationTrainValidate's history (one
    entry per step: train / test top-1, top-5 errors and nll). Writes SCN's confusion
    matrix files to the working directory."""
    scn.manual_seed(seed)
    model = Model(n_classes)
    scale = 63
    train = BatchDataset(n_classes, steps, batch_size, model.spatial_size, True, seed)
    val = BatchDataset(n_classes, 1, val_batch_size, model.spatial_size, False, seed + 1)
    step = iter(range(steps))
    if fixed_batch:
        batch = train[0]
        dataset = {'train': [batch], 'val': [val[0]]}
    else:
        dataset = {'train': lambda: [train[next(step)]], 'val': [val[0]]}
    print('Input spatial size:', model.spatial_size, 'Data scale:', scale)
    return scn.ClassificationTrainValidate(
        model, dataset,
        {'n_epochs': steps,
         'initial_lr': 0.1,
         'lr_decay': 0.05,
         'weight_decay': 1e-4,
         'use_cuda': sparsegrid.backend.cuda_available(),
         'check_point': False, })


if __name__ == '__main__':
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 100)
