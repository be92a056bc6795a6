"""sparsegrid inside PyTorch (sparsegrid.interop.torch): the same network run in
sparsegrid alone gives identical values and gradients; torch's own finite differences
(torch.autograd.gradcheck) agree; parameters, buffers, devices and modes are shared."""

import copy

import numpy as np
import pytest

from optional import require

torch = require("torch", "the PyTorch bridge (CI installs torch==2.13.0)")

import sparsegrid as sg  # noqa: E402
import sparsegrid.functional as F  # noqa: E402
import sparsegrid.nn as scn  # noqa: E402
from sparsegrid.autodiff import Tensor  # noqa: E402
from sparsegrid.interop.torch import SparseModule, SparseOutput, apply, from_torch  # noqa: E402


def cloud(rng, n=60, size=8, dim=3, batch=2, channels=3, dtype=np.float64):
    idx = np.c_[rng.integers(0, batch, (n, 1)), rng.integers(0, size, (n, dim))]
    idx = np.unique(idx, axis=0)
    return idx, rng.standard_normal((len(idx), channels)).astype(dtype)


def backbone(dim=3):
    return scn.Sequential(
        scn.SubmanifoldConvolution(dim, 3, 8, 3, False),
        scn.BatchNormReLU(8),
        scn.Convolution(dim, 8, 12, 2, 2, True),
        scn.SubmanifoldConvolution(dim, 12, 12, 2, True),      # even filter
        scn.Deconvolution(dim, 12, 6, 2, 2, False),
        scn.MaxPooling(dim, 2, 1),
    )


def run_alone(net, idx, feat, size, grad_out_fn):
    """The reference: the network run in sparsegrid alone, gradients from its autodiff."""
    x_feat = Tensor(feat.copy(), requires_grad=True)
    out = net(sg.SparseTensor(x_feat, idx, size))
    out.features.backward(grad_out_fn(out.features.data))
    grads = {name: p.grad for name, p in net.named_parameters()}
    return out, x_feat.grad, grads


@pytest.mark.parametrize("dim", [1, 2, 3, 4])
def test_same_values_and_gradients_as_sparsegrid_alone(rng, dim):
    idx, feat = cloud(rng, n=80, size=6, dim=dim)
    size = (6,) * dim
    net = backbone(dim).double()
    reference = copy.deepcopy(net)
    w = np.asarray(rng.standard_normal((10_000,)))

    def grad_fn(values):
        return np.ascontiguousarray(w[:values.size].reshape(values.shape))

    ref_out, ref_fgrad, ref_grads = run_alone(reference, idx, feat, size, grad_fn)

    model = SparseModule(net)
    f = torch.tensor(feat, requires_grad=True)
    out = model(f, torch.tensor(idx), size)
    assert isinstance(out, SparseOutput)
    np.testing.assert_array_equal(out.features.detach().numpy(), ref_out.features.data)
    np.testing.assert_array_equal(out.indices.numpy(), ref_out.indices)
    assert out.spatial_shape == ref_out.spatial_shape and out.batch_size == 2
    (out.features * torch.from_numpy(grad_fn(out.features.detach().numpy()))).sum().backward()
    np.testing.assert_allclose(f.grad.numpy(), ref_fgrad, rtol=1e-6, atol=1e-12)
    torch_grads = {name[len("sparse."):]: p.grad for name, p in model.named_parameters()}
    assert set(torch_grads) == set(ref_grads)
    for name, g in ref_grads.items():
        np.testing.assert_allclose(torch_grads[name].numpy(), g, rtol=1e-6, atol=1e-12,
                                   err_msg=name)
    # running statistics went to the torch buffers, as in sparsegrid alone
    for name, buf in model.named_buffers():
        np.testing.assert_array_equal(buf.numpy(), reference.state_dict()[name[7:]])


def test_torch_finite_differences_through_a_chain(rng):
    """gradcheck: torch's own float64 finite differences, through two wrapped modules
    with a torch op between them, for the input features and every parameter."""
    idx, feat = cloud(rng, n=30, size=6)
    first = SparseModule(scn.Sequential(scn.SubmanifoldConvolution(3, 3, 4, 3, True),
                                        scn.Tanh()).double())
    second = SparseModule(scn.Sequential(scn.Convolution(3, 4, 2, 2, 2, True)).double())
    x = sg.SparseTensor(feat, idx, (6, 6, 6))
    params = [*first.parameters(), *second.parameters()]

    def f(features, *_):
        mid = first(x, features=features)
        mid = mid.replace(torch.sin(mid.features))
        return second(mid).features

    inputs = (torch.tensor(feat, requires_grad=True), *params)
    assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-7, rtol=1e-5)


def test_apply_a_functional_op_with_torch_weights(rng):
    idx, feat = cloud(rng, n=25, size=5)
    x = sg.SparseTensor(feat, idx, (5, 5, 5))
    weight = torch.tensor(rng.standard_normal((27, 3, 2)), requires_grad=True)
    bias = torch.tensor(rng.standard_normal(2), requires_grad=True)
    out = apply(F.submanifold_conv, x, weight, bias)
    ref = F.submanifold_conv(x, weight.detach().numpy(), bias.detach().numpy())
    np.testing.assert_array_equal(out.features.detach().numpy(), ref.features)
    assert torch.autograd.gradcheck(lambda w, b: apply(F.submanifold_conv, x, w, b).features,
                                    (weight, bias), eps=1e-6, atol=1e-7)


def test_dense_outputs_and_input_layers(rng):
    """[coords, features] through an InputLayer, out as a dense torch tensor, and out
    through OutputLayer (rows of the input)."""
    coords = np.unique(rng.integers(0, 10, (40, 2)), axis=0)
    feat = rng.standard_normal((len(coords), 2))
    to_dense = scn.Sequential(scn.InputLayer(2, 10, mode=4),
                              scn.SubmanifoldConvolution(2, 2, 3, 3, False),
                              scn.SparseToDense(2, 3)).double()
    rows = scn.Sequential(scn.InputLayer(2, 10, mode=4),
                          scn.SubmanifoldConvolution(2, 2, 3, 3, False),
                          scn.OutputLayer(2)).double()
    for net, shape in ((to_dense, (1, 3, 10, 10)), (rows, (len(coords), 3))):
        model = SparseModule(net)
        f = torch.tensor(feat, requires_grad=True)
        out = model([torch.tensor(coords), f])
        assert isinstance(out, torch.Tensor) and tuple(out.shape) == shape
        ref = copy.deepcopy(net)([coords, feat])
        np.testing.assert_array_equal(out.detach().numpy(), ref.data)
        out.sum().backward()
        assert f.grad is not None and f.grad.shape == f.shape
        assert torch.autograd.gradcheck(lambda t: model([torch.tensor(coords), t]),
                                        (torch.tensor(feat, requires_grad=True),),
                                        eps=1e-6, atol=1e-7)


def test_parameters_are_shared_memory_and_train_with_torch_optim(rng):
    idx, feat = cloud(rng, n=50, size=6, dtype=np.float32)
    net = scn.Sequential(scn.SubmanifoldConvolution(3, 3, 8, 3, False), scn.BatchNormReLU(8),
                         scn.SubmanifoldConvolution(3, 8, 2, 3, True))
    model = SparseModule(net)
    assert list(model.sparse.state_dict()) == list(net.state_dict())
    weight = dict(model.named_parameters())["sparse.0.weight"]
    assert np.shares_memory(weight.detach().numpy(), net[0].weight.data)
    target = torch.tensor(rng.integers(0, 2, len(idx)))
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    x = sg.SparseTensor(feat, idx, (6, 6, 6))
    losses = []
    for _ in range(15):
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x).features, target)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0]
    # the sparsegrid module computes with what torch trained
    np.testing.assert_array_equal(net[0].weight.data, weight.detach().numpy())
    net.eval()
    with sg.autodiff.no_grad():
        alone = net(x).features.data
    model.eval()
    assert not net.training
    with torch.no_grad():
        bridged = model(x).features
    assert not bridged.requires_grad
    np.testing.assert_array_equal(bridged.numpy(), alone)
    # the module's own flags and gradients are untouched by the bridge
    assert all(p.requires_grad and p.grad is None for p in net.parameters())


def test_state_dict_round_trip_and_double(rng):
    idx, feat = cloud(rng, n=30, size=5, dtype=np.float32)
    model = SparseModule(scn.Sequential(scn.SubmanifoldConvolution(3, 3, 4, 3, True),
                                        scn.BatchNormalization(4)))
    other = SparseModule(scn.Sequential(scn.SubmanifoldConvolution(3, 3, 4, 3, True),
                                        scn.BatchNormalization(4)))
    other.load_state_dict(model.state_dict())
    x = sg.SparseTensor(feat, idx, (5, 5, 5))
    np.testing.assert_array_equal(model(x).features.detach().numpy(),
                                  other(x).features.detach().numpy())
    model.double()
    assert all(p.dtype == torch.float64 for p in model.parameters())
    out = model(x, features=torch.tensor(feat, dtype=torch.float64))
    assert out.features.dtype == torch.float64


def test_in_place_changes_before_backward_are_caught(rng):
    idx, feat = cloud(rng, n=30, size=5)
    model = SparseModule(scn.Sequential(scn.SubmanifoldConvolution(3, 3, 4, 3, True),
                                        scn.ReLU()).double())
    f = torch.tensor(feat, requires_grad=True)
    out = model(f, torch.tensor(idx), (5, 5, 5))
    out.features.mul_(2)
    with pytest.raises(RuntimeError, match="inplace"):
        out.features.sum().backward()


def test_zero_copy_in_and_out(rng):
    idx, feat = cloud(rng, n=30, size=5)
    f = torch.tensor(feat)
    x = from_torch(f, torch.tensor(idx), (5, 5, 5))
    assert np.shares_memory(x.features, f.numpy())
    out = SparseModule(scn.Sequential(scn.SubmanifoldConvolution(3, 3, 4, 3, True)).double())(x)
    # the torch output views the array sparsegrid computed
    assert out.features.data_ptr() == out.tensor.features.__array_interface__["data"][0]


def test_bad_arguments():
    with pytest.raises(TypeError, match="sparsegrid.nn.Module"):
        SparseModule(torch.nn.Linear(2, 2))
    model = SparseModule(scn.Sequential(scn.SubmanifoldConvolution(2, 1, 1, 3, False)))
    x = sg.SparseTensor(np.ones((2, 1), np.float32), [[0, 0, 0], [0, 1, 1]], (3, 3))
    with pytest.raises(ValueError, match=r"shape \(2, C\)"):
        model(x, features=torch.ones(3, 1))
    with pytest.raises(TypeError, match="requires a gradient"):
        sg.SparseTensor(torch.ones(2, 1, requires_grad=True), [[0, 0, 0], [0, 1, 1]], (3, 3))


def _gpu():
    from sparsegrid import backend
    return torch.cuda.is_available() and backend.cuda_available()


@pytest.mark.skipif(not _gpu(), reason="needs a GPU seen by both torch and CuPy")
def test_on_a_gpu_as_on_the_cpu(rng):
    """model.cuda(): the shared parameters move, CUDA tensors become CuPy arrays, the CUDA
    kernels run; values and gradients match the CPU's (float32 tolerances)."""
    import cupy
    idx, feat = cloud(rng, n=400, size=12, dtype=np.float32)
    net = backbone(3)
    model = SparseModule(net)
    results = []
    for device in ("cpu", "cuda"):
        model.to(device)
        model.zero_grad()
        f = torch.tensor(feat, device=device, requires_grad=True)
        out = model(f, torch.tensor(idx, device=device), (12, 12, 12))
        assert out.features.device.type == device
        if device == "cuda":
            assert isinstance(net[0].weight.data, cupy.ndarray)
        (out.features ** 2).sum().backward()
        results.append([out.features.detach().cpu().numpy(), f.grad.cpu().numpy(),
                        *(p.grad.cpu().numpy() for p in model.parameters())])
    for a, b in zip(*results):
        np.testing.assert_allclose(b, a, rtol=2e-4, atol=2e-4)
    with pytest.raises((TypeError, ValueError), match="cpu"):
        model(torch.tensor(feat), torch.tensor(idx), (12, 12, 12))


# -- regressions found in review ------------------------------------------------------------

def _small(rng):
    idx, feat = cloud(rng, n=40, size=6)
    return idx, feat, scn.Sequential(scn.SubmanifoldConvolution(3, 3, 4, 3, True)).double()


def test_a_weight_shared_by_two_layers_is_one_torch_parameter(rng):
    idx, feat, _ = _small(rng)
    a = scn.SubmanifoldConvolution(3, 3, 3, 3, False)
    b = scn.SubmanifoldConvolution(3, 3, 3, 3, False)
    b.weight = a.weight
    net = scn.Sequential(a, b).double()
    ref = copy.deepcopy(net)
    model = SparseModule(net)
    assert len(list(model.parameters())) == 1
    f = torch.tensor(feat)
    out = model(f, torch.tensor(idx), (6, 6, 6))
    out.features.sum().backward()
    x = sg.SparseTensor(feat, idx, (6, 6, 6))
    ref(x).features.sum().backward()
    (param,) = model.parameters()
    np.testing.assert_allclose(param.grad.numpy(), ref[0].weight.grad, rtol=1e-12)
    before = param.detach().clone()
    torch.optim.SGD(model.parameters(), lr=1.0).step()
    np.testing.assert_allclose((before - param.detach()).numpy(), ref[0].weight.grad,
                               rtol=1e-12)          # one step of the true gradient


def test_a_parameter_changed_between_forward_and_backward_is_caught(rng):
    idx, feat, net = _small(rng)
    model = SparseModule(net)
    out = model(torch.tensor(feat, requires_grad=True), torch.tensor(idx), (6, 6, 6))
    with torch.no_grad():
        next(model.parameters()).mul_(3)
    with pytest.raises(RuntimeError, match="inplace"):
        out.features.sum().backward()


def test_changes_on_the_sparsegrid_side_are_kept(rng):
    idx, feat, net = _small(rng)
    model = SparseModule(net)
    state = {k: np.full_like(v, 0.5) for k, v in net.state_dict().items()}
    net.load_state_dict(state)                         # rebinds the sparsegrid arrays
    model(torch.tensor(feat), torch.tensor(idx), (6, 6, 6))
    np.testing.assert_array_equal(net[0].weight.data, 0.5)
    np.testing.assert_array_equal(model.sparse.state_dict()["0.weight"].numpy(), 0.5)


def test_no_graph_under_no_grad_and_the_graph_is_freed_after_backward(rng):
    import gc
    import weakref
    from sparsegrid.interop import torch as bridge
    idx, feat, net = _small(rng)
    model = SparseModule(net)
    calls = []
    original = bridge._Call.__init__

    def spy(self, *args):
        original(self, *args)
        calls.append(weakref.ref(self))

    bridge._Call.__init__ = spy
    try:
        with torch.no_grad():
            out = model(torch.tensor(feat), torch.tensor(idx), (6, 6, 6))
        assert not out.features.requires_grad
        gc.collect()
        assert calls[-1]() is None                     # nothing kept
        out = model(torch.tensor(feat, requires_grad=True), torch.tensor(idx), (6, 6, 6))
        assert calls[-1]().output.requires_grad          # a graph, while torch needs it
        out.features.sum().backward()
        gc.collect()
        assert calls[-1]() is None                       # freed, output still alive
        assert out.features.shape[0] == len(idx)
    finally:
        bridge._Call.__init__ = original
