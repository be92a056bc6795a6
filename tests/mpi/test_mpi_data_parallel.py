"""sparsegrid.distributed.DataParallel on two ranks (and more): run by
``mpiexec -n 2 python -m pytest tests/mpi`` (tests/test_mpi_launch.py does it).

Every test is collective: each rank runs the same tests in the same order, and they talk
to each other. The checks compare against references each rank computes alone (the full
batch in one process, a fresh layer on another rank's data), and compare ranks by
gathering their arrays, so that every rank asserts the same things.

Under a plain ``pytest`` run (one process) the whole module is skipped without importing
mpi4py: whether this process is one rank of a job of at least two is read from the
launcher's environment (``PMI_SIZE``: MPICH, Intel MPI, Slurm's srun with PMI;
``OMPI_COMM_WORLD_SIZE``: Open MPI; ...), then confirmed with mpi4py. (No conftest.py
here: a second ``conftest`` module would shadow tests/conftest.py, which nn_helpers
imports by that name.)
"""

import os
import time

import numpy as np
import pytest

import sparsegrid as sg
import sparsegrid.nn as scn
from nn_helpers import toy_batch, toy_model
from sparsegrid import autodiff as ad
from sparsegrid.distributed import DataParallel, PeerFailure, save_checkpoint
from sparsegrid.nn import checkpoint
from sparsegrid.nn.optim import SGD


def _world_size():
    """COMM_WORLD's size when a launcher started this process among others, else 1."""
    launched = 1
    for name in ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MPI_LOCALNRANKS", "PMIX_SIZE",
                 "SLURM_NTASKS"):
        value = os.environ.get(name, "")
        if value.isdigit():
            launched = int(value)
            break
    if launched < 2:
        return 1
    from optional import require
    return require("mpi4py.MPI").COMM_WORLD.Get_size()


if _world_size() < 2:
    pytest.skip("MPI tests: run by mpiexec -n 2 python -m pytest tests/mpi "
                "(tests/test_mpi_launch.py does)", allow_module_level=True)


@pytest.fixture
def comm():
    """A private duplicate of COMM_WORLD for one test (freed afterwards)."""
    from mpi4py import MPI
    duplicate = MPI.COMM_WORLD.Dup()
    yield duplicate
    duplicate.Free()


def plain_model(seed):
    """The toy network without batch norm, in float64 (samples do not interact, so the
    mean loss over shards averages to the full batch's)."""
    scn.manual_seed(seed)
    return scn.Sequential(
        scn.InputLayer(2, 15, mode=3),
        scn.SubmanifoldConvolution(2, 2, 8, 3, False),
        scn.ReLU(),
        scn.Convolution(2, 8, 16, 3, 2, True),          # 15 -> 7
        scn.Tanh(),
        scn.SubmanifoldConvolution(2, 16, 16, 3, True),
        scn.MaxPooling(2, 3, 2),                        # 7 -> 3
        scn.SparseToDense(2, 16),
        scn.Flatten(),
        scn.Linear(16 * 9, 3)).double()


def batch64(seed, n):
    """A toy batch with float64 features (for the float64 models)."""
    (coords, features, size), labels = toy_batch(seed=seed, n=n)
    return [coords, features.astype(np.float64), size], labels


def samples_of(inputs, labels, chosen):
    """The input and labels of samples ``chosen`` of a toy batch, renumbered 0.."""
    coords, features, _ = inputs
    chosen = np.asarray(chosen, np.int64)
    renumber = np.full(int(coords[:, -1].max()) + 1, -1)
    renumber[chosen] = np.arange(len(chosen))
    keep = renumber[coords[:, -1]] >= 0
    coords = coords[keep].copy()
    coords[:, -1] = renumber[coords[:, -1]]
    return [coords, features[keep], len(chosen)], labels[chosen]


def loss_of(model, inputs, labels):
    return ad.softmax_cross_entropy(model(inputs), labels)


def gradients(model):
    return {name: np.array(p.grad) for name, p in model.named_parameters()}


def gather(comm, value):
    return comm.allgather(value)


def assert_same_on_every_rank(comm, arrays):
    everyone = gather(comm, arrays)
    for other in everyone[1:]:
        assert list(other) == list(everyone[0])
        for key in everyone[0]:
            assert other[key].dtype == everyone[0][key].dtype, key
            assert np.array_equal(other[key], everyone[0][key]), key


def split(n, sizes, rank):
    """Rank ``rank``'s samples when ``n`` samples are cut into consecutive ``sizes``."""
    ends = np.cumsum(sizes)
    return np.arange(ends[rank] - sizes[rank], ends[rank])


# -- broadcast ---------------------------------------------------------------------------
def test_initial_parameters_and_buffers_come_from_the_root(comm):
    rank = comm.Get_rank()
    model = toy_model()
    for _, param in model.named_parameters():   # another initialisation on every rank
        param.data = np.random.default_rng(rank).standard_normal(param.shape).astype(
            param.dtype)
    for _, module in model.named_modules():
        if isinstance(module, scn.BatchNormalization):
            module.running_mean = np.full_like(module.running_mean, rank + 1.0)
    before = gather(comm, model.state_dict())
    assert not np.array_equal(before[0]["1.weight"], before[1]["1.weight"])
    params = {id(p): p for p in model.parameters()}
    dp = DataParallel(model, comm, root=1)
    assert {id(p) for p in model.parameters()} == set(params)   # the same objects
    after = model.state_dict()
    for key, value in before[1].items():
        assert np.array_equal(after[key], value), key
        assert after[key].dtype == value.dtype
    assert_same_on_every_rank(comm, after)
    dp.close()


def test_modules_that_differ_raise_on_every_rank(comm):
    rank = comm.Get_rank()
    model = scn.Sequential(scn.InputLayer(2, 15), scn.SubmanifoldConvolution(
        2, 2, 8 if rank == 0 else 9, 3, False))
    with pytest.raises(ValueError, match="modules differ between ranks 0 and 1"):
        DataParallel(model, comm)


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(buffers="sync"), ValueError, "buffers must be one of"),
    (dict(reduction="tree"), ValueError, "reduction must be one of"),
    (dict(gpu_transport="ucx"), ValueError, "gpu_transport must be one of"),
    (dict(root=2), ValueError, r"root must be a rank in \[0, 2\)"),
    (dict(root=-1), ValueError, "root must be a rank"),
    (dict(reduce_dtype=np.int32), ValueError, "reduce_dtype must be a floating dtype"),
])
def test_bad_arguments_are_refused_on_every_rank(comm, kwargs, error, match):
    if comm.Get_size() != 2 and "root" in kwargs:
        pytest.skip("written for two ranks")
    with pytest.raises(error, match=match):
        DataParallel(plain_model(0), comm, **kwargs)


def test_bad_module_and_comm(comm):
    with pytest.raises(TypeError, match="module must be a sparsegrid.nn.Module"):
        DataParallel(lambda x: x, comm)
    with pytest.raises(TypeError, match="comm must be an mpi4py intra-communicator"):
        DataParallel(plain_model(0), comm="world")
    dp = DataParallel(plain_model(0), comm)
    with pytest.raises(ValueError, match="batch_size must be an int >= 0"):
        dp.allreduce_gradients(batch_size=-1)
    dp.close()


# -- gradients ---------------------------------------------------------------------------
@pytest.mark.parametrize("reduction", ["allreduce", "ordered"])
@pytest.mark.parametrize("sizes", [(4, 4), (3, 5), (8, 0)])
def test_averaged_gradients_equal_the_full_batch_gradient(comm, reduction, sizes):
    if comm.Get_size() != 2:
        pytest.skip("shard sizes written for two ranks")
    rank = comm.Get_rank()
    inputs, labels = batch64(seed=5, n=8)
    model = plain_model(seed=rank)            # different on each rank until broadcast
    dp = DataParallel(model, comm, reduction=reduction)
    # reference: this rank alone, the whole batch, the mean loss over all 8 samples
    loss_of(model, inputs, labels).backward()
    full = gradients(model)
    model.zero_grad()
    mine = split(8, sizes, rank)
    if len(mine):
        loss_of(model, *samples_of(inputs, labels, mine)).backward()
    equal = sizes[0] == sizes[1]
    dp.allreduce_gradients(batch_size=None if equal else len(mine))
    averaged = gradients(model)
    for name, expected in full.items():
        assert averaged[name].dtype == np.float64
        scale = np.abs(expected).max()
        np.testing.assert_allclose(averaged[name], expected, rtol=1e-12,
                                   atol=1e-12 * scale, err_msg=name)
    assert_same_on_every_rank(comm, averaged)
    dp.close()


def test_the_plain_average_of_unequal_shards_is_not_the_full_batch_gradient(comm):
    """The check above can fail: without ``batch_size`` unequal shards are averaged
    per rank, which weighs the 3 samples of rank 0 like the 5 of rank 1."""
    if comm.Get_size() != 2:
        pytest.skip("written for two ranks")
    rank = comm.Get_rank()
    inputs, labels = batch64(seed=5, n=8)
    model = plain_model(seed=1)
    dp = DataParallel(model, comm)
    loss_of(model, inputs, labels).backward()
    full = gradients(model)
    model.zero_grad()
    loss_of(model, *samples_of(inputs, labels, split(8, (3, 5), rank))).backward()
    dp.allreduce_gradients()
    far = max(np.abs(gradients(model)[k] - full[k]).max() / np.abs(full[k]).max()
              for k in full)
    assert far > 1e-6
    dp.close()


def test_parameters_without_gradients(comm):
    rank = comm.Get_rank()
    model = plain_model(0)
    dp = DataParallel(model, comm)
    weight, bias = model[9].weight, model[9].bias
    for param in model.parameters():
        param.grad = None
    weight.grad = np.full(weight.shape, rank + 1.0)   # only the last layer's weight
    if rank == 0:
        bias.grad = np.full(bias.shape, 4.0)            # only on rank 0: zero elsewhere
    dp.allreduce_gradients()
    size = comm.Get_size()
    assert np.all(weight.grad == sum(range(1, size + 1)) / size)
    assert np.all(bias.grad == 4.0 / size)
    assert all(p.grad is None for p in model.parameters() if p is not weight and
               p is not bias)
    dp.close()


def test_float32_gradients_summed_in_float64(comm):
    rank = comm.Get_rank()
    model = scn.Sequential(scn.Linear(3, 2))
    dp = DataParallel(model, comm, reduce_dtype=np.float64)
    values = np.array([1.0, 2.0 ** -30, -1.0], np.float64)    # one per rank, then more
    param = model[0].weight
    param.grad = np.full(param.shape, values[rank % 3], np.float32)
    dp.allreduce_gradients()
    assert param.grad.dtype == np.float32
    expected = np.float32(np.sum(values[np.arange(comm.Get_size()) % 3]) / comm.Get_size())
    assert np.all(param.grad == expected)
    dp.close()


# -- training ----------------------------------------------------------------------------
@pytest.mark.parametrize("reduction", ["allreduce", "ordered"])
def test_k_steps_keep_replicas_identical_and_equal_full_batch_training(comm, reduction):
    if comm.Get_size() != 2:
        pytest.skip("written for two ranks")
    rank = comm.Get_rank()
    inputs, labels = batch64(seed=9, n=8)
    reference = plain_model(seed=3)            # one process, the whole batch
    reference_optimizer = SGD(reference.parameters(), lr=0.05, momentum=0.9,
                              nesterov=True, weight_decay=1e-3)
    model = plain_model(seed=10 + rank)
    dp = DataParallel(model, comm, reduction=reduction, root=0)
    dp.module.load_state_dict(reference.state_dict())   # every rank: the reference's start
    optimizer = SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True,
                    weight_decay=1e-3)
    shard = samples_of(inputs, labels, split(8, (4, 4), rank))
    with dp.guard():
        for _ in range(5):
            reference_optimizer.zero_grad()
            loss_of(reference, inputs, labels).backward()
            reference_optimizer.step()
            optimizer.zero_grad()
            loss_of(dp, *shard).backward()
            dp.step(optimizer)
    assert_same_on_every_rank(comm, model.state_dict())
    state = optimizer.state_dict()["state"]
    assert_same_on_every_rank(comm, {f"{i}": state[i]["momentum_buffer"] for i in state})
    for key, value in reference.state_dict().items():
        np.testing.assert_allclose(model.state_dict()[key], value, rtol=1e-10,
                                   atol=1e-12, err_msg=key)
    dp.close()


def test_training_with_batch_norm_keeps_replicas_identical(comm):
    rank = comm.Get_rank()
    inputs, labels = toy_batch(seed=2, n=8)
    model = toy_model()
    dp = DataParallel(model, comm)
    optimizer = SGD(model.parameters(), lr=0.05, momentum=0.9)
    mine = np.arange(rank, 8, comm.Get_size())
    shard = samples_of(inputs, labels, mine)
    with dp.guard():
        for _ in range(4):
            optimizer.zero_grad()
            loss_of(dp, *shard).backward()
            dp.step(optimizer)
    state = model.state_dict()
    assert_same_on_every_rank(comm, state)
    assert not np.array_equal(state["2.running_mean"], np.zeros(8, np.float32))
    dp.close()


# -- buffers -----------------------------------------------------------------------------
def batch_norm_input(rank):
    rng = np.random.default_rng(40 + rank)
    n = 10 + 7 * rank                               # different shard sizes
    sites = rng.choice(64, size=n, replace=False)
    indices = np.stack([np.zeros(n, int), sites // 8, sites % 8], axis=1).astype(np.int32)
    features = rng.normal(rank, 1 + rank, size=(n, 3))
    return sg.SparseTensor(features, indices, (8, 8))


@pytest.mark.parametrize("mode", ["average", "broadcast", "local"])
def test_batch_norm_running_statistics(comm, mode):
    rank, size = comm.Get_rank(), comm.Get_size()
    layer = scn.BatchNormalization(3, momentum=0.9).double()
    dp = DataParallel(layer, comm, buffers=mode, root=size - 1)
    for _ in range(3):
        layer(batch_norm_input(rank))
        dp.sync_buffers()
    # each rank's statistics alone: the same layer on rank r's data, in this process
    alone = []
    for r in range(size):
        reference = scn.BatchNormalization(3, momentum=0.9).double()
        for _ in range(3):
            reference(batch_norm_input(r))
        alone.append(reference)
    if mode == "average":
        # linear updates: averaging every step == the running average of the averaged
        # batch statistics, computed here from each rank's batch statistics
        mean = np.zeros(3)
        var = np.ones(3)
        for _ in range(3):
            batches = [batch_norm_input(r).features for r in range(size)]
            mean = 0.9 * mean + 0.1 * np.mean([b.mean(0) for b in batches], axis=0)
            var = 0.9 * var + 0.1 * np.mean([b.var(0, ddof=1) for b in batches], axis=0)
        expected_mean, expected_var = mean, var
    else:
        source = alone[size - 1] if mode == "broadcast" else alone[rank]
        expected_mean, expected_var = source.running_mean, source.running_var
    np.testing.assert_allclose(layer.running_mean, expected_mean, rtol=1e-13, atol=1e-15)
    np.testing.assert_allclose(layer.running_var, expected_var, rtol=1e-13, atol=1e-15)
    everyone = gather(comm, layer.running_mean)
    assert all(np.array_equal(e, everyone[0]) for e in everyone) == (mode != "local")
    dp.close()


# -- checkpoints -------------------------------------------------------------------------
def test_checkpoints_are_written_by_the_root_only(comm, tmp_path, monkeypatch):
    rank = comm.Get_rank()
    path = os.path.join(comm.bcast(str(tmp_path), root=0), "model.npz")
    model = toy_model()
    dp = DataParallel(model, comm)
    optimizer = SGD(model.parameters(), lr=0.1, momentum=0.9)
    calls = []
    original = checkpoint.save_checkpoint

    def slow_save(*args, **kwargs):
        calls.append(args[0])
        time.sleep(0.3)                     # the others must wait for the file
        return original(*args, **kwargs)

    monkeypatch.setattr(checkpoint, "save_checkpoint", slow_save)
    save_checkpoint(path, dp, optimizer, epoch=3)
    assert os.path.exists(path)             # complete when save_checkpoint returns
    everyone = gather(comm, calls)
    assert everyone == [[path]] + [[]] * (comm.Get_size() - 1)
    restored = toy_model()
    for param in restored.parameters():
        param.data = param.data + 1
    extra = checkpoint.load_checkpoint(path, restored)
    assert extra == {"epoch": 3}
    for key, value in model.state_dict().items():
        assert np.array_equal(restored.state_dict()[key], value), key
    comm.Barrier()                          # rank 0 removes tmp_path after its test
    assert rank >= 0
    dp.close()


def test_a_checkpoint_the_root_cannot_write_raises_on_every_rank(comm, tmp_path):
    rank = comm.Get_rank()
    path = os.path.join(comm.bcast(str(tmp_path), root=0), "missing", "model.npz")
    model = toy_model()
    with pytest.raises(FileNotFoundError if rank == 0 else PeerFailure,
                       match=None if rank == 0 else "rank 0 could not write"):
        save_checkpoint(path, model, comm=comm)
    dp = DataParallel(model, comm)
    with pytest.raises(FileNotFoundError if rank == 0 else PeerFailure):
        save_checkpoint(path, dp)
    with pytest.raises(RuntimeError, match="no more collectives"):
        dp.check()


# -- failures ----------------------------------------------------------------------------
@pytest.mark.parametrize("where", ["forward", "after the reduction", "after the loop",
                                   "every rank"])
def test_a_rank_that_raises_makes_every_rank_raise(comm, where):
    rank, size = comm.Get_rank(), comm.Get_size()
    failing = size - 1
    inputs, labels = toy_batch(seed=1, n=4)
    model = toy_model()
    dp = DataParallel(model, comm)
    optimizer = SGD(model.parameters(), lr=0.01)

    def boom(step):
        if (rank == failing or where == "every rank") and step == 2:
            raise ValueError(f"boom on rank {rank}")

    start = time.perf_counter()
    with pytest.raises((ValueError, PeerFailure)) as caught:
        with dp.guard():
            for step in range(4):
                optimizer.zero_grad()
                if where in ("forward", "every rank"):
                    boom(step)
                loss_of(dp, inputs, labels).backward()
                dp.allreduce_gradients()
                if where == "after the reduction":
                    boom(step)
                optimizer.step()
                dp.sync_buffers()
            if where == "after the loop":
                boom(2)
    seconds = time.perf_counter() - start
    if rank == failing or where == "every rank":
        assert caught.type is ValueError and f"boom on rank {rank}" in str(caught.value)
    else:
        assert caught.type is PeerFailure
        assert caught.value.ranks == (failing,)
        assert f"ValueError: boom on rank {failing}" in str(caught.value)
    assert seconds < 60
    # the failure is known everywhere: no rank waits in another collective
    with pytest.raises(RuntimeError, match="no more collectives after a failure"):
        dp.allreduce_gradients()
    # the communicator it came from is still in step on every rank
    assert comm.allreduce(1) == size


def test_sum_of_metrics(comm):
    rank, size = comm.Get_rank(), comm.Get_size()
    dp = DataParallel(scn.Sequential(scn.Linear(2, 2)), comm)
    total = dp.sum(rank)
    assert type(total) is int and total == size * (size - 1) // 2
    half = dp.sum(0.5)
    assert type(half) is float and half == 0.5 * size
    assert dp.sum(rank == 0) == 1
    matrix = dp.sum(np.array([[1, rank]]))
    assert matrix.shape == (1, 2) and np.array_equal(matrix, [[size, total]])
    assert dp.gather(rank * 10) == [10 * r for r in range(size)]
    with pytest.raises(TypeError, match="must be a number or a numeric array"):
        dp.sum("three")
    # an int on one rank and a float on another add as numbers; small ints do not wrap
    mixed = dp.sum(0 if rank == 0 else 3.5)
    assert type(mixed) is float and mixed == 3.5 * (size - 1)
    assert dp.sum(np.array([100], np.int8))[0] == 100 * size
    with pytest.raises(ValueError, match="different shapes"):
        dp.sum(np.zeros(3 + rank))
    dp.close()


def test_batch_size_given_on_some_ranks_only_raises_on_every_rank(comm):
    rank = comm.Get_rank()
    model = plain_model(0)
    dp = DataParallel(model, comm)
    for p in model.parameters():
        p.grad = np.ones_like(p.data)
    with pytest.raises(ValueError, match="on every rank or on none"):
        dp.allreduce_gradients(batch_size=None if rank == 0 else 3)
    dp.close()


def test_a_bad_gradient_on_one_rank_is_reported_on_every_rank(comm):
    rank, size = comm.Get_rank(), comm.Get_size()
    model = scn.Sequential(scn.Linear(3, 2))
    dp = DataParallel(model, comm)
    weight = model[0].weight
    weight.grad = np.ones(weight.shape) if rank == 0 else np.ones((7,))
    expected = (PeerFailure, "rank 1: ValueError: allreduce_gradients: a gradient of shape") \
        if rank == 0 else (ValueError, r"a gradient of shape \(7,\)")
    with pytest.raises(expected[0], match=expected[1] if rank else None) as caught:
        with dp.guard():
            dp.allreduce_gradients()
    if rank == 0:
        assert expected[1] in str(caught.value) and caught.value.ranks == (1,)
    assert comm.allreduce(1) == size
