"""SparseConvNet-compatible layers, containers, network builders and training tools.

``import sparsegrid.nn as scn`` gives SCN's names with SCN's constructor arguments and
initialisation; see docs/differences_from_scn.md for the deliberate differences.
"""

from . import checkpoint, optim
from .containers import (AddTable, CheckpointedSequential, ConcatTable, Identity, JoinTable, Sequential,
                         VerboseIdentity, add_feature_planes, concatenate_feature_planes)
from .layers import *  # noqa: F401,F403 - the SCN layer catalogue
from .layers import __all__ as _layers
from .dcls import (ConstructKernel1d, ConstructKernel2d, ConstructKernel3d, Dcls1d, Dcls2d,
                   Dcls3d)
from . import dcls_legacy
from .dcls_legacy import (DclsConstruct1d, DclsConstruct2d, DclsConstruct3d, DclsIm2col1d,
                          DclsIm2col2d, DclsIm2col3d)
from .module import Module, Parameter, default_rng, manual_seed
from .networks import FullyConvolutionalNet, SparseResNet, SparseVggNet, UNet
from .sbnet import BlockSparseConv2d, ChannelsLastBatchNorm, SparseResBlock
from .utils import append_tensors, compare_sparse
from ..coords import permutohedral_basis

__all__ = sorted(_layers + [
    "AddTable", "BlockSparseConv2d", "ConstructKernel1d", "ConstructKernel2d",
    "ConstructKernel3d", "Dcls1d", "Dcls2d", "Dcls3d", "DclsConstruct1d", "DclsConstruct2d",
    "DclsConstruct3d", "DclsIm2col1d", "DclsIm2col2d", "DclsIm2col3d", "dcls_legacy", "ChannelsLastBatchNorm", "SparseResBlock", "ConcatTable", "FullyConvolutionalNet", "Identity", "JoinTable", "Module",
    "Parameter", "Sequential", "CheckpointedSequential", "checkpoint", "optim", "VerboseIdentity",
    "add_feature_planes", "append_tensors", "compare_sparse", "concatenate_feature_planes", "SparseResNet", "SparseVggNet", "UNet", "default_rng",
    "manual_seed", "permutohedral_basis",
])

from .dcls_sparse import SubmanifoldDcls  # noqa: E402 - submanifold DCLS
__all__ = sorted(__all__ + ["SubmanifoldDcls"])

from .generative import Cat, GenerativeConvolutionTranspose, Pruning, Union  # noqa: E402
__all__ = sorted(__all__ + ["Cat", "GenerativeConvolutionTranspose", "Pruning", "Union"])
