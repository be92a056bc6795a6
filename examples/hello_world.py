"""SparseConvNet's hello world, with sparsegrid instead of PyTorch + SCN.

The network, the input spatial size and the two messages are those of SCN's
examples/hello-world.py; only the import changes (``import sparsegrid.nn as scn``) and the
coordinates are NumPy arrays (CuPy arrays with ``--device cuda``, the default where a GPU
is visible). Then three SGD steps show the same model training.

    python examples/hello_world.py [--device {cpu,cuda}]
"""

import argparse
import time

import numpy as np

import sparsegrid.nn as scn
from sparsegrid import autodiff as ad
from sparsegrid import backend
from sparsegrid.nn.optim import SGD

parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
parser.add_argument("--device", choices=["cpu", "cuda"],
                    default="cuda" if backend.cuda_available() else "cpu",
                    help="where the model and the input live (default: cuda when CuPy sees "
                         "a GPU, else cpu)")
args = parser.parse_args()
if args.device == "cuda" and not backend.cuda_available():
    parser.error("--device cuda needs CuPy and a visible NVIDIA GPU; none is available here")
device = args.device
print("device:", device)

scn.manual_seed(0)
model = scn.Sequential().add(
    scn.SparseVggNet(2, 1,
                     [['C', 8], ['C', 8], ['MP', 3, 2],
                      ['C', 16], ['C', 16], ['MP', 3, 2],
                      ['C', 24], ['C', 24], ['MP', 3, 2]])
).add(
    scn.SubmanifoldConvolution(2, 24, 32, 3, False)
).add(
    scn.BatchNormReLU(32)
).add(
    scn.SparseToDense(2, 32)
)

model.to(device)

# output will be 10x10
input_spatial_size = model.input_spatial_size(np.array([10, 10]))
input_layer = scn.InputLayer(2, input_spatial_size)

msgs = [[" X   X  XXX  X    X    XX     X       X   XX   XXX   X    XXX   ",
         " X   X  X    X    X   X  X    X       X  X  X  X  X  X    X  X  ",
         " XXXXX  XX   X    X   X  X    X   X   X  X  X  XXX   X    X   X ",
         " X   X  X    X    X   X  X     X X X X   X  X  X  X  X    X  X  ",
         " X   X  XXX  XXX  XXX  XX       X   X     XX   X  X  XXX  XXX   "],

        [" XXX              XXXXX      x   x     x  xxxxx  xxx ",
         " X  X  X   XXX       X       x   x x   x  x     x  x ",
         " XXX                X        x   xxxx  x  xxxx   xxx ",
         " X     X   XXX       X       x     x   x      x    x ",
         " X     X          XXXX   x   x     x   x  xxxx     x "]]

# N x 3 coordinates (y, x, batch index: SCN's batch-last form) and N x 1 features.
locations = []
features = []
for batch_idx, msg in enumerate(msgs):
    for y, line in enumerate(msg):
        for x, c in enumerate(line):
            if c == 'X':
                locations.append([y, x, batch_idx])
                features.append([1])
locations = backend.to_device(np.array(locations), device)
features = backend.to_device(np.array(features, np.float32), device)

input = input_layer([locations, features])
print("input spatial size:", tuple(int(s) for s in input_spatial_size))
print("input: ", input)
start = time.perf_counter()
output = model(input)
forward_ms = (time.perf_counter() - start) * 1e3

# Output is 2x32x10x10: our minibatch has 2 samples, the network has 32 output
# feature planes, and 10x10 is the spatial size of the output.
print("output:", output.shape, output.dtype)

# The same model trains: push the output of sample 0 up and sample 1 down.
target = np.zeros(output.shape, np.float32)
target[0] = 1.0
target = backend.to_device(target, device)
optimizer = SGD(model.parameters(), lr=0.1, momentum=0.9)
losses = []
for step in range(3):
    optimizer.zero_grad()
    start = time.perf_counter()
    prediction = model(input_layer([locations, features]))
    step_forward_ms = (time.perf_counter() - start) * 1e3
    loss = ad.mse_loss(prediction, target)
    start = time.perf_counter()
    loss.backward()
    backward_ms = (time.perf_counter() - start) * 1e3
    optimizer.step()
    losses.append(float(loss.item()))
print("training loss over 3 SGD steps:", " -> ".join(f"{v:.4f}" for v in losses))
print(f"first forward {forward_ms:.1f} ms (loads SciPy's sparse kernels); a training step: "
      f"forward {step_forward_ms:.1f} ms, backward {backward_ms:.1f} ms "
      f"({sum(p.data.size for p in model.parameters())} parameters)")
