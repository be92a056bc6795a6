"""SparseConvNet's network builders: SparseVggNet, SparseResNet, UNet, FullyConvolutionalNet.

Each returns a :class:`Sequential` with SCN's module tree, so ``state_dict()`` keys line up
with an SCN model built by the same call.
"""

from __future__ import annotations

from .containers import AddTable, ConcatTable, Identity, JoinTable, Sequential
from .layers import (BatchNormLeakyReLU, BatchNormReLU, Convolution, Deconvolution,
                     MaxPooling, NetworkInNetwork, SubmanifoldConvolution, UnPooling,
                     _dimension, _flag_arg, _given, _int_arg, _real_arg, _sizes)


def _sequence_arg(owner, name, value, expected="a list", integer_array=False):
    """A list or tuple as a list; with ``integer_array`` also a 1-D integer array (NumPy, or
    anything with ``tolist``, such as a torch tensor) as a list of ints."""
    if integer_array and getattr(value, "ndim", None) == 1 and hasattr(value, "tolist"):
        items = value.tolist()
        if all(isinstance(v, int) and not isinstance(v, bool) for v in items):
            return items
    if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
        raise TypeError(f"{owner}: {name} must be {expected}; got {_given(value)}")
    return list(value)


def _planes_arg(owner, value):
    planes = _sequence_arg(owner, "nPlanes", value, "a non-empty list of positive ints",
                           integer_array=True)
    if not planes:
        raise ValueError(f"{owner}: nPlanes must be a non-empty list of positive ints; got "
                         f"{value!r}")
    return [_int_arg(owner, f"nPlanes[{i}]", n) for i, n in enumerate(planes)]


def _downsample_arg(owner, value, dimension):
    pair = _sequence_arg(owner, "downsample", value, "a (filter_size, stride) pair",
                         integer_array=True)
    if len(pair) != 2:
        raise ValueError(f"{owner}: downsample must be a (filter_size, stride) pair; got "
                         f"{len(pair)} items: {value!r}")
    _sizes(owner, pair[0], dimension, "downsample filter_size")
    _sizes(owner, pair[1], dimension, "downsample stride")
    return pair


def _plus_branch(dimension, n_in, planes, depth):
    """The VGG+ side branch: ``depth`` strided 3/2 convolutions down, then as many
    Deconvolutions back up, with submanifold convolutions and BNReLU in between."""
    branch = Sequential()
    a = n_in
    for _ in range(depth):
        branch.add(Convolution(dimension, a, planes, 3, 2, False)).add(BatchNormReLU(planes))
        branch.add(SubmanifoldConvolution(dimension, planes, planes, 3, False))
        branch.add(BatchNormReLU(planes))
        a = planes
    for level in range(depth):
        branch.add(Deconvolution(dimension, planes, planes, 3, 2, False))
        if level < depth - 1:
            branch.add(BatchNormReLU(planes))
            branch.add(SubmanifoldConvolution(dimension, planes, planes, 3, False))
            branch.add(BatchNormReLU(planes))
    return branch


def SparseVggNet(dimension, nInputPlanes, layers):
    """VGG-style network of submanifold convolutions (SCN).

    Layer codes: ``'MP'`` MaxPooling(3, 2); ``['MP', f, s]``; ``'C3/2'`` or
    ``['C3/2', n]`` a Convolution(3, 2) + BatchNormReLU; ``['C', n]`` SubM3 + BatchNormReLU;
    ``['C', n, m, ...]`` (VGG+, 3 to 5 entries) a ConcatTable of SubM3 -> n and side
    branches going 1, 2, 3 levels down (m planes each) and back up, joined, then
    BatchNormReLU on the summed planes.
    """
    _dimension("SparseVggNet", dimension)
    planes = _int_arg("SparseVggNet", "nInputPlanes", nInputPlanes)
    layers = _sequence_arg("SparseVggNet", "layers", layers, "a list of layer codes")
    net = Sequential()
    for code in layers:
        if code == "MP":
            net.add(MaxPooling(dimension, 3, 2))
        elif code[0] == "MP":
            net.add(MaxPooling(dimension, code[1], code[2]))
        elif code == "C3/2":
            net.add(Convolution(dimension, planes, planes, 3, 2, False))
            net.add(BatchNormReLU(planes))
        elif code[0] == "C3/2":
            net.add(Convolution(dimension, planes, code[1], 3, 2, False))
            planes = code[1]
            net.add(BatchNormReLU(planes))
        elif code[0] == "C" and len(code) == 2:
            net.add(SubmanifoldConvolution(dimension, planes, code[1], 3, False))
            planes = code[1]
            net.add(BatchNormReLU(planes))
        elif code[0] == "C" and 3 <= len(code) <= 5:
            table = ConcatTable().add(SubmanifoldConvolution(dimension, planes, code[1], 3,
                                                             False))
            for depth, branch_planes in enumerate(code[2:], start=1):
                table.add(_plus_branch(dimension, planes, branch_planes, depth))
            net.add(table).add(JoinTable())
            planes = sum(code[1:])
            net.add(BatchNormReLU(planes))
        else:
            raise ValueError(f"SparseVggNet: unknown layer code {code!r}; use 'MP', "
                             "['MP', f, s], 'C3/2', ['C3/2', n], ['C', n] or ['C', n, m(, ...)]")
    return net


def SparseResNet(dimension, nInputPlanes, layers):
    """Pre-activation ResNet of basic blocks (SCN); ``layers`` = [('b', n, reps, stride)].

    The first block of a group is BNReLU then a ConcatTable of (SubM3 or Conv3/stride,
    BNReLU, SubM3) and a shortcut (Conv3/stride, NetworkInNetwork or Identity), added;
    later blocks are ConcatTable(BNReLU, SubM3, BNReLU, SubM3 ; Identity) + AddTable.
    A final BNReLU closes the network.
    """
    owner = "SparseResNet"
    _dimension(owner, dimension)
    planes = _int_arg(owner, "nInputPlanes", nInputPlanes)
    layers = _sequence_arg(owner, "layers", layers, "a list of ('b', n, reps, stride)")
    for i, block in enumerate(layers):
        if not isinstance(block, (list, tuple)) or len(block) != 4:
            raise ValueError(f"{owner}: layers[{i}] must be ('b', n, reps, stride); got "
                             f"{block!r}")
        _int_arg(owner, f"layers[{i}] n", block[1])
        _int_arg(owner, f"layers[{i}] reps", block[2])
        _int_arg(owner, f"layers[{i}] stride", block[3])
    net = Sequential()

    def shortcut(n_in, n_out, stride):
        if stride > 1:
            return Convolution(dimension, n_in, n_out, 3, stride, False)
        if n_in != n_out:
            return NetworkInNetwork(n_in, n_out, False)
        return Identity()

    for block_type, n, reps, stride in layers:
        if not str(block_type).startswith("b"):
            raise ValueError(f"SparseResNet: only basic blocks ('b', n, reps, stride) exist; "
                             f"got {block_type!r}")
        for rep in range(reps):
            if rep == 0:
                net.add(BatchNormReLU(planes))
                first = SubmanifoldConvolution(dimension, planes, n, 3, False) if stride == 1 \
                    else Convolution(dimension, planes, n, 3, stride, False)
                residual = Sequential(first, BatchNormReLU(n),
                                      SubmanifoldConvolution(dimension, n, n, 3, False))
                net.add(ConcatTable(residual, shortcut(planes, n, stride)))
            else:
                residual = Sequential(BatchNormReLU(planes),
                                      SubmanifoldConvolution(dimension, planes, n, 3, False),
                                      BatchNormReLU(n),
                                      SubmanifoldConvolution(dimension, n, n, 3, False))
                net.add(ConcatTable(residual, Identity()))
            planes = n
            net.add(AddTable())
    net.add(BatchNormReLU(planes))
    return net


def _block(net, dimension, a, b, residual_blocks, norm):
    if residual_blocks:
        net.add(ConcatTable(
            Identity() if a == b else NetworkInNetwork(a, b, False),
            Sequential(norm(a), SubmanifoldConvolution(dimension, a, b, 3, False),
                       norm(b), SubmanifoldConvolution(dimension, b, b, 3, False))))
        net.add(AddTable())
    else:
        net.add(Sequential(norm(a), SubmanifoldConvolution(dimension, a, b, 3, False)))


def UNet(dimension, reps, nPlanes, residual_blocks=False, downsample=(2, 2), leakiness=0,
         n_input_planes=-1):
    """U-Net of VGG or residual blocks (SCN): per level ``reps`` blocks, a strided
    Convolution(downsample) to the next level, the level below, a Deconvolution back, the
    skip concatenated (2 * nPlanes[0] planes), and ``reps`` more blocks. Output: the input's
    sites with nPlanes[0] channels; blocks use BatchNormLeakyReLU(leakiness)."""
    owner = "UNet"
    dimension = _dimension(owner, dimension)
    reps = _int_arg(owner, "reps", reps)
    nPlanes = _planes_arg(owner, nPlanes)
    residual_blocks = _flag_arg(owner, "residual_blocks", residual_blocks)
    f, s = _downsample_arg(owner, downsample, dimension)
    leakiness = _real_arg(owner, "leakiness", leakiness)
    if _int_arg(owner, "n_input_planes", n_input_planes, -1) == 0:
        raise ValueError(f"{owner}: n_input_planes must be a positive int or -1 (nPlanes[0]); "
                         "got 0")

    def norm(n):
        return BatchNormLeakyReLU(n, leakiness=leakiness)

    def level(planes, n_in=-1):
        net = Sequential()
        for _ in range(reps):
            _block(net, dimension, n_in if n_in != -1 else planes[0], planes[0],
                   residual_blocks, norm)
            n_in = -1
        if len(planes) > 1:
            net.add(ConcatTable(
                Identity(),
                Sequential(norm(planes[0]),
                           Convolution(dimension, planes[0], planes[1], f, s, False),
                           level(planes[1:]),
                           norm(planes[1]),
                           Deconvolution(dimension, planes[1], planes[0], f, s, False))))
            net.add(JoinTable())
            for i in range(reps):
                _block(net, dimension, planes[0] * (2 if i == 0 else 1), planes[0],
                       residual_blocks, norm)
        return net

    return level(list(nPlanes), n_input_planes)


def FullyConvolutionalNet(dimension, reps, nPlanes, residual_blocks=False, downsample=(2, 2)):
    """Multi-scale network (SCN): per level ``reps`` blocks, then the level below brought
    back by UnPooling and concatenated; output channels sum(nPlanes) on the input's sites."""
    owner = "FullyConvolutionalNet"
    dimension = _dimension(owner, dimension)
    reps = _int_arg(owner, "reps", reps)
    nPlanes = _planes_arg(owner, nPlanes)
    residual_blocks = _flag_arg(owner, "residual_blocks", residual_blocks)
    f, s = _downsample_arg(owner, downsample, dimension)

    def level(planes):
        net = Sequential()
        for _ in range(reps):
            _block(net, dimension, planes[0], planes[0], residual_blocks, BatchNormReLU)
        if len(planes) > 1:
            net.add(ConcatTable(
                Identity(),
                Sequential(BatchNormReLU(planes[0]),
                           Convolution(dimension, planes[0], planes[1], f, s, False),
                           level(planes[1:]),
                           UnPooling(dimension, f, s))))
            net.add(JoinTable())
        return net

    return level(list(nPlanes))


__all__ = ["FullyConvolutionalNet", "SparseResNet", "SparseVggNet", "UNet"]
