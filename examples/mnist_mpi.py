"""Train examples/mnist_sparse.py's network data-parallel over MPI ranks.

Every rank builds the same network (``mnist_sparse.build_model``), and
``sparsegrid.distributed.DataParallel`` broadcasts rank 0's initial weights. All ranks
walk the same shuffled order of global batches; each takes its contiguous share of
every batch (``--batch-size`` is the global batch: the same updates as one process with
that batch, up to batch norm's per-rank statistics and the augmentation draws). The
gradients are averaged over the ranks (weighted by shard size), batch norm's running
statistics averaged after every step. Each rank prints its throughput per epoch; rank 0
prints the held-out accuracy (each rank evaluates a share of the test batches, the
counts are summed).

    mpiexec -n 2 python -m mpi4py examples/mnist_mpi.py [--epochs 2] [--batch-size 64]
    python examples/mnist_mpi.py           # one process: the baseline
    srun -n 4 python -m mpi4py examples/mnist_mpi.py    # on a Slurm cluster

``python -m mpi4py`` makes an uncaught exception on one rank abort the whole job
(instead of leaving the others waiting); inside the training loop ``dp.guard()`` already
turns it into an exception on every rank. Needs ``pip install "sparsegrid[mpi]"`` and an
MPI library (the ``mpich`` wheel will do on one machine). Data: as mnist_sparse.py (rank 0
fetches it once, then broadcasts it).
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np

import sparsegrid
import sparsegrid.nn as scn
from sparsegrid import autodiff as ad
from sparsegrid import backend
from sparsegrid.nn.optim import SGD, ExponentialDecayLR

from datasets import load_mnist5k
from mnist_sparse import build_model, make_input
from train_utils import add_device_argument, batches_of, chosen_device


def shard(indices, rank, size):
    """This rank's contiguous share of one batch (sizes differ by at most one)."""
    return np.array_split(indices, size)[rank]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=64,
                        help="global batch, split over the ranks (default 64)")
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--threads", type=int, default=None,
                        help="sparsegrid threads per rank (default: the cores / ranks on "
                             "this machine)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--reduction", choices=["allreduce", "ordered"], default="allreduce")
    parser.add_argument("--checkpoint", default=None,
                        help="write the trained model here (rank 0 only)")
    add_device_argument(parser)
    args = parser.parse_args()
    device = chosen_device(parser, args)

    try:
        from mpi4py import MPI
    except ImportError:
        parser.error('needs mpi4py: pip install "sparsegrid[mpi]" (and an MPI library, '
                     "e.g. pip install mpich)")
    from sparsegrid.distributed import DataParallel, local_rank, save_checkpoint

    world = MPI.COMM_WORLD
    rank, size = world.Get_rank(), world.Get_size()
    node = world.Split_type(MPI.COMM_TYPE_SHARED)
    ranks_here = node.Get_size()
    node.Free()
    if device == "cuda":                    # one GPU per rank on each machine
        import cupy
        device = f"cuda:{local_rank(world) % cupy.cuda.runtime.getDeviceCount()}"
    sparsegrid.set_num_threads(args.threads or max(1, (os.cpu_count() or 1) // ranks_here))

    # the data: rank 0 fetches (and caches) it, everyone gets a copy
    data = load_mnist5k() if rank == 0 else None
    images, labels = world.bcast(data, root=0)
    order = np.random.default_rng(12345).permutation(len(images))
    train, test = order[:4000], order[4000:]

    scn.manual_seed(args.seed + rank)       # different draws: the broadcast must fix them
    model, field = build_model()
    model.to(device)
    dp = DataParallel(model, world, reduction=args.reduction)
    if rank == 0:
        n_params = sum(p.data.size for p in model.parameters())
        print(f"{size} rank(s), {sparsegrid.get_num_threads()} thread(s) each, device "
              f"{device}; MNIST: {len(train)} training digits, {len(test)} held out; "
              f"{n_params} parameters; global batch {args.batch_size}", flush=True)

    order_rng = np.random.default_rng(args.seed)            # the same on every rank
    shift_rng = np.random.default_rng([args.seed, rank])    # augmentation: per rank
    optimizer = SGD(model.parameters(), lr=args.lr, momentum=0.9, nesterov=True,
                    weight_decay=1e-4)
    scheduler = ExponentialDecayLR(optimizer, decay=0.15)
    test_batches = batches_of(len(test), 250)[rank::size]   # each rank a share

    with dp.guard():                      # a failure on one rank raises on all of them
        for epoch in range(1, args.epochs + 1):
            model.train()
            seen = loss_sum = 0.0
            compute = 0.0
            start = time.perf_counter()
            for batch in batches_of(len(train), args.batch_size, order_rng):
                mine = shard(batch, rank, size)
                inputs = make_input(images[train[mine]], field, shift_rng, device)
                t0 = time.perf_counter()
                optimizer.zero_grad()
                if len(mine):
                    loss = ad.softmax_cross_entropy(dp(inputs), labels[train[mine]])
                    loss.backward()
                    loss_sum += float(loss.item()) * len(mine)
                compute += time.perf_counter() - t0
                dp.step(optimizer, batch_size=len(mine))
                seen += len(mine)
            seconds = time.perf_counter() - start
            print(f"rank {rank}: epoch {epoch}/{args.epochs}  {int(seen)} samples in "
                  f"{seconds:.1f} s = {seen / seconds:.1f} samples/s  (forward+backward "
                  f"{100 * compute / seconds:.0f}% of it)  loss {loss_sum / seen:.4f}",
                  flush=True)
            total, slowest = dp.sum(seen), max(dp.gather(seconds))
            scheduler.step()
            if rank == 0:
                print(f"epoch {epoch}: {total / slowest:.1f} samples/s over all ranks "
                      f"(slowest rank {slowest:.1f} s)", flush=True)

        model.eval()
        correct = count = 0
        with ad.no_grad():
            for batch in test_batches:
                inputs = make_input(images[test[batch]], field, device=device)
                predicted = backend.to_numpy(dp(inputs).data.argmax(axis=1))
                correct += int((predicted == labels[test[batch]]).sum())
                count += len(batch)
        correct, count = dp.sum(correct), dp.sum(count)
        if args.checkpoint:
            save_checkpoint(args.checkpoint, dp, optimizer, scheduler, epoch=args.epochs)
    if rank == 0:
        print(f"final held-out accuracy {100 * correct / count:.2f}% on {count} digits "
              f"after {args.epochs} epochs on {size} rank(s)", flush=True)
    dp.close()


if __name__ == "__main__":
    main()
