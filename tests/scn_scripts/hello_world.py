"""SCN's hello world (examples/hello-world.py), then training, written as an SCN user
would with the porting rule's imports: the hello-world network, BLInputLayer and
scn.prepare_BLInput, features moved with ``.to(device)``.

The data are messages of the hello world's shape and density: 5 rows of 'X' glyphs (3
columns each, about half filled, one or two blank columns apart, up to 64 columns), two
per batch, placed at random in the 87 x 87 input. The network learns which of its
10 x 10 output cells cover part of the message (a per-cell two-class cross-entropy).

    python tests/scn_scripts/hello_world.py [steps]
"""

import sys
import time

import numpy as np

import sparsegrid.backend
import sparsegrid.nn as scn
import sparsegrid.nn as nn
import sparsegrid.nn.functional as F
import sparsegrid.nn.optim as optim
from sparsegrid.autodiff import Tensor, no_grad

# Use the GPU if there is one and sparsegrid can use it, otherwise CPU
use_cuda = sparsegrid.backend.cuda_available() and scn.SCN.is_cuda_build()
device = 'cuda:0' if use_cuda else 'cpu'

HELLO = [" X   X  XXX  X    X    XX     X       X   XX   XXX   X    XXX   ",
         " X   X  X    X    X   X  X    X       X  X  X  X  X  X    X  X  ",
         " XXXXX  XX   X    X   X  X    X   X   X  X  X  XXX   X    X   X ",
         " X   X  X    X    X   X  X     X X X X   X  X  X  X  X    X  X  ",
         " X   X  XXX  XXX  XXX  XX       X   X     XX   X  X  XXX  XXX   "]


class Model(nn.Module):
    def __init__(self):
        nn.Module.__init__(self)
        self.sparseModel = scn.Sequential().add(
            scn.SparseVggNet(2, 1,
                             [['C', 8], ['C', 8], ['MP', 3, 2],
                              ['C', 16], ['C', 16], ['MP', 3, 2],
                              ['C', 24], ['C', 24], ['MP', 3, 2]])
        ).add(
            scn.SubmanifoldConvolution(2, 24, 32, 3, False)
        ).add(
            scn.BatchNormReLU(32)
        ).add(
            scn.SparseToDense(2, 32))
        # output will be 10x10
        self.spatial_size = self.sparseModel.input_spatial_size(np.array([10, 10]))
        self.inputLayer = scn.BLInputLayer(2, self.spatial_size)
        self.linear = nn.Linear(32, 2)

    def forward(self, x):
        x = self.inputLayer(x)
        x = self.sparseModel(x)                      # (B, 32, 10, 10)
        b = x.size(0)
        x = x.permute(0, 2, 3, 1).reshape(-1, 32)    # one row per output cell
        x = self.linear(x)
        return x.view(b, 10, 10, 2).permute(0, 3, 1, 2)


def random_message(rng, rows=5, max_columns=64):
    """5 rows of glyphs like the hello world's: (y, x) of each 'X'."""
    columns = []
    while True:
        glyph = rng.random((rows, 3)) < 0.5
        glyph[rng.integers(rows), rng.integers(3)] = True
        gap = np.zeros((rows, rng.integers(1, 3)), bool)
        if sum(c.shape[1] for c in columns) + 3 + gap.shape[1] > max_columns:
            break
        columns += [glyph, gap]
    y, x = np.nonzero(np.concatenate(columns, axis=1))
    return np.stack([y, x], axis=1)


def batch_of(rng, size, spatial_size):
    """prepare_BLInput's input: [locations (n, 2), features (n, 1)] per sample, and the
    10 x 10 cell occupancy targets (the cells are spatial_size / 10 wide)."""
    batch, targets = [], np.zeros((size, 10, 10), np.int64)
    for i in range(size):
        loc = random_message(rng)
        loc = loc + [rng.integers(0, spatial_size[0] - 5),
                     rng.integers(0, spatial_size[1] - loc[:, 1].max())]
        batch.append([loc, Tensor(np.ones((len(loc), 1), np.float32))])
        cells = np.minimum(loc * 10 // spatial_size, 9)
        targets[i, cells[:, 0], cells[:, 1]] = 1
    return batch, targets


def hello(model):
    """The hello world itself: two messages through BLInputLayer, printed as SCN does."""
    msg = [[y, x] for y, line in enumerate(HELLO) for x, c in enumerate(line) if c == 'X']
    batch = [[np.array(msg), Tensor(np.ones((len(msg), 1), np.float32))]] * 2
    batch = scn.prepare_BLInput(batch)
    batch[1] = batch[1].to(device)
    input = model.inputLayer(batch)
    print('Input SparseConvNetTensor:', input)
    output = model.sparseModel(input)
    print('Output SparseConvNetTensor:', output.shape, output.type())
    return output


def main(steps=100, batch_size=2, fixed_batch=False, seed=0):
    """Train for ``steps`` SGD steps; returns the training loss of each step."""
    scn.manual_seed(seed)
    rng = np.random.default_rng(seed)
    model = Model().to(device)
    model.inputLayer.to(device)
    hello(model)
    optimizer = optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True,
                          weight_decay=1e-4)
    print('#parameters', sum([x.nelement() for x in model.parameters()]))
    fixed = batch_of(rng, batch_size, model.spatial_size) if fixed_batch else None
    losses = []
    model.train()
    for step in range(1, steps + 1):
        start = time.time()
        samples, targets = fixed or batch_of(rng, batch_size, model.spatial_size)
        input = scn.prepare_BLInput(samples)
        input[1] = input[1].to(device)
        optimizer.zero_grad()
        predictions = model(input)
        targets = Tensor(targets).to(device)
        loss = F.cross_entropy(predictions, targets)
        loss.backward()
        optimizer.step()
        with no_grad():
            correct = (predictions.max(1)[1] == targets).long().sum().item()
        losses.append(loss.item())
        print(step, 'train loss', loss.item(), 'cell accuracy', correct / targets.numel(),
              'time=', time.time() - start, 's')
    return losses


if __name__ == '__main__':
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 100)
