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

# torch.nn.functional -> sparsegrid.nn.functional; torch.nn's losses (issue 13)
from . import functional  # noqa: E402
from .losses import (BCELoss, BCEWithLogitsLoss, CrossEntropyLoss, L1Loss,  # noqa: E402
                     MSELoss, NLLLoss, SmoothL1Loss)
__all__ = sorted(__all__ + ["functional", "BCELoss", "BCEWithLogitsLoss", "CrossEntropyLoss",
                            "L1Loss", "MSELoss", "NLLLoss", "SmoothL1Loss"])

# SparseConvNet's tensor surface, sparseconvnet.utils, ClassificationTrainValidate and its
# counters (which the layers add to through this module: ``scn.<counter> = 0`` resets them)
from ..tensor import Metadata, SparseConvNetTensor  # noqa: E402
from . import utils  # noqa: E402
from .utils import (SCN, AddCoords, batch_location_tensors, checkpoint101,  # noqa: E402
                    checkpoint_restore, checkpoint_save, checkpointFunction,
                    has_only_one_nonzero_digit, is_power2, is_square, matplotlib_cubes,
                    matplotlib_planes, optionalTensor, optionalTensorReturn,
                    pad_with_batch_idx, ply_scatter, prepare_BLInput, random_rotation,
                    spectral_norm_svd, squareroot_rotation, threadDatasetIterator,
                    toLongTensor, visdom_scatter, voxelize_pointcloud)
from .trainer import ClassificationTrainValidate  # noqa: E402

forward_pass_multiplyAdd_count = 0
forward_pass_hidden_states = 0

__all__ = sorted(set(__all__) | {
    "ClassificationTrainValidate", "Metadata", "SCN", "SparseConvNetTensor",
    "batch_location_tensors", "checkpoint101", "checkpoint_restore", "checkpoint_save",
    "checkpointFunction", "forward_pass_hidden_states", "forward_pass_multiplyAdd_count",
    "has_only_one_nonzero_digit", "is_power2", "is_square", "matplotlib_cubes",
    "matplotlib_planes", "optionalTensor", "optionalTensorReturn", "pad_with_batch_idx",
    "ply_scatter", "prepare_BLInput", "random_rotation", "spectral_norm_svd",
    "squareroot_rotation", "threadDatasetIterator", "toLongTensor", "utils",
    "visdom_scatter", "voxelize_pointcloud"})

# torch.save / torch.load's counterparts (the port rule maps them here)
from .checkpoint import load, save  # noqa: E402
__all__ = sorted(__all__ + ["load", "save"])

# mixed precision: loss scaling for float16 training (docs/mixed_precision.md)
from . import amp  # noqa: E402
from .amp import GradScaler, SkippedStepWarning  # noqa: E402
__all__ = sorted(__all__ + ["amp", "GradScaler", "SkippedStepWarning"])

# gradient clipping with torch.nn.utils' semantics (also as scn.utils.clip_grad_norm_)
from .clip import clip_grad_norm_, clip_grad_value_  # noqa: E402
utils.clip_grad_norm_, utils.clip_grad_value_ = clip_grad_norm_, clip_grad_value_
__all__ = sorted(__all__ + ["clip_grad_norm_", "clip_grad_value_"])
