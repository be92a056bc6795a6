"""3-D part segmentation with scn.FullyConvolutionalNet, as SCN's
examples/3d_segmentation/fully_convolutional.py: the same data, loss and training loop
as segmentation_unet.py (SCN's two scripts share theirs too), with the network
FullyConvolutionalNet(3, reps=2, nPlanes, downsample=[3, 2]) on a 24 * 8 + 15 = 207^3
grid, whose output concatenates every level's features (sum(nPlanes) channels).

    python tests/scn_scripts/fully_convolutional.py [steps]
"""

import sys

import numpy as np

import sparsegrid.nn as nn
import sparsegrid.nn as scn
import segmentation_unet as data

dimension = 3
reps = 2  # Conv block repetition factor
spatialSize = np.array([24 * 8 + 15] * 3)


class Model(nn.Module):
    def __init__(self, m=32):
        nn.Module.__init__(self)
        nPlanes = [m, 2 * m, 3 * m, 4 * m, 5 * m]  # number of features per level
        self.sparseModel = scn.Sequential().add(
            scn.InputLayer(dimension, spatialSize, mode=3)).add(
            scn.SubmanifoldConvolution(dimension, 1, m, 3, False)).add(
            scn.FullyConvolutionalNet(dimension, reps, nPlanes, residual_blocks=False,
                                      downsample=[3, 2])).add(
            scn.BatchNormReLU(sum(nPlanes))).add(
            scn.OutputLayer(dimension))
        self.linear = nn.Linear(sum(nPlanes), data.nClassesTotal)

    def forward(self, x):
        x = self.sparseModel(x)
        x = self.linear(x)
        return x


def main(steps=100, **options):
    """Train for ``steps`` batches (options as segmentation_unet.main); returns the
    training loss of each step."""
    return data.main(steps, model_class=Model, **options)


if __name__ == '__main__':
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 100)
