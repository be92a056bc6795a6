"""spconv 2.3.8 on the CPU as a reference point for sparsegrid's benchmarks.

This module is importable without torch or spconv installed: they are
imported lazily inside the functions, and :func:`available` tells whether
they can be.  The intended interpreter is the virtual environment
``.venv-spconv`` at the repository root (``numpy scipy torch==2.13.0
spconv==2.3.8``)::

    .venv-spconv/bin/python benchmarks/spconv_baseline.py

All functions take ``indices`` as an int32 array of shape ``(N, 4)`` with
the batch index first (as returned by ``benchmarks/scenes.py``) and a
``spatial_shape`` of three ints, and work in float32.  Timings are medians
over ``repeat`` runs of ``time.perf_counter``, after one warm-up run.

Known problems of spconv 2.3.8 on a CPU-only torch, and what this module
does about them:

* With more than one torch thread its CPU kernels give wrong and
  nondeterministic results.  :func:`subm_forward_output` and
  :func:`self_check` therefore always run with one thread; the timing
  functions use whatever :func:`set_threads` set (``__main__`` uses 1).
* Its CPU backward (``ops.indice_conv_backward``) calls
  ``get_current_stream()``, i.e. ``torch.cuda.current_stream()``, which
  raises on a CPU-only torch.  :func:`_import_spconv` replaces
  ``spconv.pytorch.ops.get_current_stream`` by a function returning 0 (the
  CPU code never uses the stream); site-packages is not edited.
* Non-submanifold layers cannot reuse an ``indice_key`` (spconv asserts
  "only support reuse subm indices"), so :func:`time_strided_forward` times
  the layer's computation, ``ops.indice_conv``, on pairs built beforehand.

Weight layout (verified by :func:`self_check`): this CPU-only build uses
``ConvAlgo.Native`` with the "KRSC" layout, weight shape
``(Cout, k0, k1, k2, Cin)``, and computes a cross-correlation in which
kernel index ``(a, b, c)`` reads the input at ``o + (a, b, c) - 1``.  So
sparsegrid's ``W`` of shape ``(27, Cin, Cout)`` (offsets row-major, last
axis fastest) maps to spconv's by
``W.reshape(3, 3, 3, Cin, Cout).transpose(4, 0, 1, 2, 3)``, no flip.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import tempfile

import numpy as np

import timing  # noqa: E402  (benchmarks/timing.py: this script's folder is on sys.path)

__all__ = [
    "available",
    "peak_memory_rulebook_forward",
    "self_check",
    "set_threads",
    "subm_forward_output",
    "time_inverse_forward",
    "time_rulebook",
    "time_strided_forward",
    "time_subm_forward",
    "time_subm_forward_backward",
    "time_subm_rulebook_forward",
    "weight_to_spconv",
]

_HERE = os.path.dirname(os.path.abspath(__file__))


# --------------------------------------------------------------------------
# Lazy import and small helpers
# --------------------------------------------------------------------------


def available():
    """Return True when torch and ``spconv.pytorch`` can be imported."""
    try:
        _import_spconv()
    except Exception:  # ImportError, or a broken binary extension
        return False
    return True


def _import_spconv():
    """Import torch and spconv.pytorch, patching spconv for a CPU-only torch.

    Returns
    -------
    torch : module
    spconv : module
        ``spconv.pytorch``.
    """
    import logging

    # spconv's modules call torch.fx's is_fx_tracing(), which logs a
    # deprecation warning once; it is noise in a benchmark table.
    logging.getLogger("torch.fx._symbolic_trace").setLevel(logging.ERROR)
    import torch
    import spconv.pytorch as spconv
    from spconv.pytorch import ops

    # The CPU backward asks for the current CUDA stream (and then ignores
    # it); on a CPU-only torch that call raises.
    ops.get_current_stream = lambda: 0
    return torch, spconv


def set_threads(n):
    """Set the number of threads torch (and so spconv's CPU kernels) uses."""
    torch, _ = _import_spconv()
    torch.set_num_threads(int(n))


def _median_time(fn, repeat):
    """Median wall time of ``fn()`` over ``repeat`` runs, after one warm-up."""
    return timing.median_ms(fn, repeat) / 1e3


def _indices_tensor(indices):
    torch, _ = _import_spconv()
    return torch.from_numpy(np.ascontiguousarray(indices, dtype=np.int32))


def _random_features(n, channels, seed=0):
    torch, _ = _import_spconv()
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, channels, generator=gen, dtype=torch.float32)


def _sparse_tensor(indices, spatial_shape, features):
    _, spconv = _import_spconv()
    return spconv.SparseConvTensor(features, _indices_tensor(indices), list(spatial_shape),
                                   batch_size=_batch_size(indices))


def _batch_size(indices):
    return int(np.asarray(indices)[:, 0].max()) + 1 if len(indices) else 1


def _subm_layer(channels_in, channels_out):
    _, spconv = _import_spconv()
    return spconv.SubMConv3d(channels_in, channels_out, 3, bias=False, indice_key="subm")


def _with_cached_rulebook(layer, x):
    """Run ``layer`` once and attach the indice pairs it built to ``x``.

    Later calls of ``layer(x)`` find the pairs under the layer's
    ``indice_key`` and skip pair generation, as every submanifold layer
    after the first one in a network does.
    """
    torch, _ = _import_spconv()
    with torch.no_grad():
        out = layer(x)
    x.indice_dict = out.indice_dict
    return x


# --------------------------------------------------------------------------
# Weight layout and correctness
# --------------------------------------------------------------------------


def weight_to_spconv(weight_kio):
    """Convert a sparsegrid weight to spconv's SubMConv3d layout.

    Parameters
    ----------
    weight_kio : ndarray, shape (27, Cin, Cout)
        Offsets row-major over the 3x3x3 box, last spatial axis fastest.

    Returns
    -------
    ndarray of float32, shape (Cout, 3, 3, 3, Cin)
        spconv's "KRSC" layout.
    """
    w = np.asarray(weight_kio, dtype=np.float32)
    cin, cout = w.shape[1], w.shape[2]
    return np.ascontiguousarray(w.reshape(3, 3, 3, cin, cout).transpose(4, 0, 1, 2, 3))


def subm_forward_output(indices, spatial_shape, features, weight_kio):
    """Output of spconv's SubMConv3d for a given sparsegrid-layout weight.

    Runs with one torch thread (spconv's CPU kernels are wrong with more)
    and restores the previous thread count afterwards.

    Parameters
    ----------
    indices : ndarray of int32, shape (N, 4)
        ``(batch, x, y, z)`` rows, unique.
    spatial_shape : sequence of 3 int
    features : ndarray, shape (N, Cin)
    weight_kio : ndarray, shape (27, Cin, Cout)
        ``out[o] += in[o + delta - 1] @ W[k]`` with ``k`` the row-major
        (last axis fastest) index of ``delta`` in the 3x3x3 box.

    Returns
    -------
    ndarray of float32, shape (N, Cout)
        Output features, row ``i`` belonging to ``indices[i]``.
    """
    torch, _ = _import_spconv()
    weight_kio = np.asarray(weight_kio)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        layer = _subm_layer(weight_kio.shape[1], weight_kio.shape[2])
        with torch.no_grad():
            layer.weight.copy_(torch.from_numpy(weight_to_spconv(weight_kio)))
            feats = torch.from_numpy(np.ascontiguousarray(features, dtype=np.float32))
            out = layer(_sparse_tensor(indices, spatial_shape, feats))
        # For a submanifold layer the output sites are the input sites, in
        # the input's order.
        return out.features.numpy().copy()
    finally:
        torch.set_num_threads(threads)


def _reference_subm(indices, spatial_shape, features, weight_kio):
    """Brute-force submanifold 3x3x3 cross-correlation on a dense grid."""
    coords = np.asarray(indices)[:, 1:].astype(np.int64)
    feats = np.asarray(features, dtype=np.float64)
    weight = np.asarray(weight_kio, dtype=np.float64)
    # Dense grid padded by one so that o + delta - 1 is always in range.
    dense = np.zeros(tuple(s + 2 for s in spatial_shape) + (feats.shape[1],))
    dense[tuple((coords + 1).T)] = feats
    out = np.zeros((coords.shape[0], weight.shape[2]))
    for k in range(27):
        delta = np.array(np.unravel_index(k, (3, 3, 3)))
        out += dense[tuple((coords + delta).T)] @ weight[k]
    return out


def self_check(seed=0):
    """Compare :func:`subm_forward_output` with a brute-force reference.

    Uses a small random input on a non-cubic grid (so that swapped axes
    would show) with a random, asymmetric weight (so that a flipped kernel
    would show).

    Returns
    -------
    float
        Maximum absolute difference; about 1e-6 when the layout is right.
    """
    rng = np.random.default_rng(seed)
    shape = (5, 6, 7)
    flat = rng.choice(int(np.prod(shape)), size=90, replace=False)
    coords = np.stack(np.unravel_index(np.sort(flat), shape), axis=1)
    indices = np.concatenate([np.zeros((coords.shape[0], 1), dtype=np.int64), coords], axis=1).astype(np.int32)
    features = rng.standard_normal((indices.shape[0], 3)).astype(np.float32)
    weight = rng.standard_normal((27, 3, 4)).astype(np.float32)
    got = subm_forward_output(indices, shape, features, weight)
    want = _reference_subm(indices, shape, features, weight)
    return float(np.abs(got - want).max())


# --------------------------------------------------------------------------
# Timings
# --------------------------------------------------------------------------


def _pairs(indices_t, spatial_shape, kernel, stride, subm):
    """spconv's own pair generation, as SparseConvolution._conv_forward calls it."""
    _import_spconv()
    from spconv.core import ConvAlgo
    from spconv.pytorch import ops

    k = [kernel] * 3
    return ops.get_indice_pairs(
        indices_t, 1, list(spatial_shape), ConvAlgo.Native,
        k, [stride] * 3, [0] * 3, [1] * 3, [0] * 3, subm, False,
    )


def time_rulebook(indices, spatial_shape, repeat=5):
    """Time building a submanifold 3x3x3 rulebook from scratch.

    Calls ``spconv.pytorch.ops.get_indice_pairs`` with exactly the arguments
    SubMConv3d uses on its first call with a fresh SparseConvTensor
    (``ConvAlgo.Native``, the only algorithm of the CPU build, which goes to
    the C++ ``SpconvOps.get_indice_pairs``).

    Returns
    -------
    float
        Median seconds.
    """
    indices_t = _indices_tensor(indices)
    return _median_time(lambda: _pairs(indices_t, spatial_shape, 3, 1, subm=True), repeat)


def time_strided_rulebook(indices, spatial_shape, kernel, stride=2, repeat=5):
    """Time building a strided (kernel, stride) rulebook and its output sites from scratch,
    as SparseConv3d(C, C, kernel, stride) does on its first call.

    Returns
    -------
    float
        Median seconds.
    """
    indices_t = _indices_tensor(indices)
    return _median_time(lambda: _pairs(indices_t, spatial_shape, kernel, stride, subm=False),
                        repeat)


def time_subm_forward(indices, spatial_shape, channels, repeat=5):
    """Time SubMConv3d(C, C, 3, bias=False) forward with a cached rulebook.

    The rulebook is built once; the timed calls find it in the input's
    ``indice_dict`` under ``indice_key="subm"``.  Runs under
    ``torch.no_grad()``.

    Returns
    -------
    float
        Median seconds.
    """
    torch, _ = _import_spconv()
    layer = _subm_layer(channels, channels)
    x = _with_cached_rulebook(layer, _sparse_tensor(indices, spatial_shape, _random_features(len(indices), channels)))

    def run():
        with torch.no_grad():
            layer(x)

    return _median_time(run, repeat)


def time_subm_rulebook_forward(indices, spatial_shape, channels, repeat=5):
    """Time SubMConv3d(C, C, 3, bias=False) forward on a fresh SparseConvTensor.

    Every timed call wraps the same indices and features in a new
    SparseConvTensor (no cached pairs), so the layer builds its rulebook
    and then convolves: what the first submanifold layer of a network
    costs per input.  Runs under ``torch.no_grad()``.

    Returns
    -------
    float
        Median seconds.
    """
    torch, _ = _import_spconv()
    layer = _subm_layer(channels, channels)
    features = _random_features(len(indices), channels)
    indices_t = _indices_tensor(indices)
    batch_size = _batch_size(indices)
    _, spconv = _import_spconv()

    def run():
        with torch.no_grad():
            layer(spconv.SparseConvTensor(features, indices_t, list(spatial_shape), batch_size))

    return _median_time(run, repeat)


def time_subm_forward_backward(indices, spatial_shape, channels, repeat=5):
    """Time SubMConv3d forward + backward with a cached rulebook.

    Features require grad; the backward pass is that of
    ``(output * g).sum()`` for a fixed random ``g`` and computes both the
    feature and the weight gradient.  Needs the ``get_current_stream`` patch
    applied by :func:`_import_spconv`.

    Returns
    -------
    float
        Median seconds.
    """
    layer = _subm_layer(channels, channels)
    features = _random_features(len(indices), channels).requires_grad_(True)
    x = _with_cached_rulebook(layer, _sparse_tensor(indices, spatial_shape, features))
    grad = _random_features(len(indices), channels, seed=1)

    def run():
        layer.zero_grad(set_to_none=True)
        features.grad = None
        layer(x).features.backward(grad)  # same gradient as (out * grad).sum()

    return _median_time(run, repeat)


def time_strided_forward(indices, spatial_shape, channels, kernel=2, stride=2, repeat=5, include_rulebook=False):
    """Time a SparseConv3d(C, C, kernel, stride, padding=0) forward.

    spconv cannot reuse cached pairs for a non-submanifold layer (it asserts
    "only support reuse subm indices"), so with ``include_rulebook=False``
    the pairs are built once with ``ops.get_indice_pairs`` and the timed
    call is ``ops.indice_conv``, the computation SparseConv3d performs after
    building its pairs.  With ``include_rulebook=True`` the whole layer
    forward is timed, pair generation included.

    Returns
    -------
    float
        Median seconds.
    """
    torch, spconv = _import_spconv()
    from spconv.core import ConvAlgo
    from spconv.pytorch import ops

    features = _random_features(len(indices), channels)
    layer = spconv.SparseConv3d(channels, channels, kernel, stride, padding=0, bias=False, indice_key="down")
    if include_rulebook:
        x = _sparse_tensor(indices, spatial_shape, features)

        def run():
            with torch.no_grad():
                layer(x)

        return _median_time(run, repeat)

    out_inds, pairs, pair_num = _pairs(_indices_tensor(indices), spatial_shape, kernel, stride, subm=False)
    weight = layer.weight.detach()

    def run():
        ops.indice_conv(features, weight, pairs, pair_num, out_inds.shape[0], False, algo=ConvAlgo.Native)

    return _median_time(run, repeat)


def time_inverse_forward(indices, spatial_shape, channels, kernel=2, stride=2, repeat=5):
    """Time SparseInverseConv3d(C, C, kernel) forward reusing a strided layer's pairs.

    A SparseConv3d(C, C, kernel, stride, indice_key="down") is run once; the
    timed call is the inverse layer on its output, which restores the
    original sites with the stored pairs (no pair generation).  Runs under
    ``torch.no_grad()``.

    Returns
    -------
    float
        Median seconds.
    """
    torch, spconv = _import_spconv()
    down = spconv.SparseConv3d(channels, channels, kernel, stride, padding=0, bias=False, indice_key="down")
    up = spconv.SparseInverseConv3d(channels, channels, kernel, indice_key="down", bias=False)
    with torch.no_grad():
        coarse = down(_sparse_tensor(indices, spatial_shape, _random_features(len(indices), channels)))

    def run():
        with torch.no_grad():
            up(coarse)

    return _median_time(run, repeat)


# --------------------------------------------------------------------------
# Memory
# --------------------------------------------------------------------------


def _rss_kib(field):
    """Read a ``Vm*`` field of /proc/self/status in KiB."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _memory_child(path, spatial_shape, channels):
    """Body of the subprocess started by :func:`peak_memory_rulebook_forward`."""
    torch, _ = _import_spconv()
    torch.set_num_threads(1)
    indices = np.load(path)
    x = _sparse_tensor(indices, spatial_shape, _random_features(len(indices), channels))
    layer = _subm_layer(channels, channels)
    # Writing 5 to clear_refs resets the peak-RSS mark (VmHWM) to the current
    # RSS, so the next VmHWM covers only what follows.
    with open("/proc/self/clear_refs", "w") as clear:
        clear.write("5")
    before = _rss_kib("VmRSS")
    with torch.no_grad():
        out = layer(x)
    peak = _rss_kib("VmHWM")
    del out
    print(json.dumps({"peak_bytes": (peak - before) * 1024}))


def peak_memory_rulebook_forward(indices, spatial_shape, channels):
    """Peak extra resident memory of building the rulebook plus one forward.

    Method: a fresh Python process (this interpreter) imports torch and
    spconv, creates the input tensors, then resets the kernel's peak-RSS
    mark (``echo 5 > /proc/self/clear_refs``), runs one SubMConv3d forward
    on a fresh SparseConvTensor (so the rulebook is built), and reports
    ``VmHWM - VmRSS_before``.  This counts everything the operation touches
    (torch's CPU allocator, spconv's C++ allocations, the output) and
    excludes the inputs and the libraries.  tracemalloc would miss all of
    it, since torch does not allocate through Python's allocator.  Memory
    that malloc reuses from pages already resident before the reset is not
    counted; in a fresh process that is small.  Linux only.

    Returns
    -------
    int
        Bytes.
    """
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "indices.npy")
        np.save(path, np.ascontiguousarray(indices, dtype=np.int32))
        code = (
            f"import sys; sys.path.insert(0, {_HERE!r}); import spconv_baseline as m; "
            f"m._memory_child({path!r}, {tuple(int(s) for s in spatial_shape)!r}, {int(channels)})"
        )
        result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return int(json.loads(result.stdout.strip().splitlines()[-1])["peak_bytes"])


# --------------------------------------------------------------------------
# Device layers and precision modes (the GPU benchmarks: bench_conv_cuda.py and
# bench_network.py). The same code runs on the CPU build for their --device cpu
# rehearsals; nothing above this section changes.
# --------------------------------------------------------------------------

#: The probe :func:`device_status` runs in a child process: import, then one tiny
#: SubMConv3d forward on the device (a broken binary can crash the interpreter, which must
#: not take the benchmark with it).
_PROBE = r"""
import json, sys
device = sys.argv[1]
import torch
import spconv
import spconv.pytorch as sp
if device == "cuda" and not torch.cuda.is_available():
    raise RuntimeError(f"torch {torch.__version__} sees no CUDA device")
idx = torch.tensor([[0, 1, 1, 1], [0, 1, 1, 2], [0, 2, 1, 1]], dtype=torch.int32, device=device)
feats = torch.ones(3, 8, device=device)
layer = sp.SubMConv3d(8, 8, 3, bias=False).to(device)
with torch.no_grad():
    out = layer(sp.SparseConvTensor(feats, idx, [4, 4, 4], 1))
if device == "cuda":
    torch.cuda.synchronize()
print("PROBE" + json.dumps({"version": spconv.__version__, "torch": torch.__version__,
                            "torch_cuda": torch.version.cuda, "rows": int(out.features.shape[0])}))
"""


def device_status(device, timeout=180):
    """Whether spconv imports and runs one layer on ``device`` (``'cuda'`` or ``'cpu'``).

    The check runs in a child process of this interpreter (same ``sys.path`` and
    environment), so an import failure or a crash of spconv's binary is reported, not
    suffered.

    Returns
    -------
    dict
        ``{"available": True, "version", "torch", "torch_cuda"}``, or
        ``{"available": False, "error": <what failed, exactly as printed>}``.
    """
    import importlib.util

    missing = [name for name in ("torch", "spconv") if importlib.util.find_spec(name) is None]
    if missing:
        return {"available": False, "error": f"ModuleNotFoundError: no module named "
                                             f"{' or '.join(map(repr, missing))} on "
                                             f"{sys.executable}'s path"}
    if device == "cuda" and os.environ.get("SPCONV_PROBED") == "1":
        # .ci/gpu-check's spconv step already imported it and ran a layer on this GPU:
        # no second cold start of torch and spconv's 284 MB library
        import spconv
        import torch
        return {"available": True, "version": getattr(spconv, "__version__", "?"),
                "torch": torch.__version__, "torch_cuda": torch.version.cuda,
                "probe": "gpu-check"}
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([p for p in sys.path if p] +
                                        [env.get("PYTHONPATH", "")]).strip(os.pathsep)
    try:
        result = subprocess.run([sys.executable, "-c", _PROBE, device], capture_output=True,
                                text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"available": False, "error": f"the spconv probe did not finish in {timeout} s"}
    for line in result.stdout.splitlines():
        if line.startswith("PROBE"):
            return {"available": True, **json.loads(line[len("PROBE"):])}
    tail = (result.stderr or result.stdout).strip().splitlines()[-12:]
    return {"available": False,
            "error": f"exit status {result.returncode}: " + "\n".join(tail)}


def import_for_device(device):
    """torch and ``spconv.pytorch`` for ``device``: on ``'cpu'`` as :func:`_import_spconv`
    (its CPU patch included, one torch thread), on ``'cuda'`` unpatched."""
    if device == "cpu":
        torch, spconv = _import_spconv()
        torch.set_num_threads(1)   # spconv's CPU kernels are wrong with more
        return torch, spconv
    import logging

    logging.getLogger("torch.fx._symbolic_trace").setLevel(logging.ERROR)
    import torch
    import spconv.pytorch as spconv
    return torch, spconv


_TF32_SWITCHES = (("backends.cuda.matmul", "allow_tf32"), ("backends.cudnn", "allow_tf32"))


@contextlib.contextmanager
def precision(mode, device):
    """Run spconv (and torch) in one of the benchmarks' precision modes.

    ``'fp32'``: float32 with TF32 off everywhere (torch's matmul and cuDNN flags and
    spconv's own ``spconv.constants.SPCONV_ALLOW_TF32``, which its GEMM kernels read at
    every call); ``'tf32'``: float32 with all three on; ``'fp16'``: float16 data
    (``.half()``), TF32 off. On the CPU every mode runs in float32 (a rehearsal).
    The previous switches are restored afterwards.

    Yields
    ------
    torch.dtype
    """
    if mode not in ("fp32", "tf32", "fp16"):
        raise ValueError(f"precision: mode must be 'fp32', 'tf32' or 'fp16'; got {mode!r}")
    torch, _ = import_for_device(device)
    from spconv import constants

    def owner(path):
        obj = torch
        for part in path.split("."):
            obj = getattr(obj, part)
        return obj

    saved = [getattr(owner(path), name) for path, name in _TF32_SWITCHES]
    saved_spconv = constants.SPCONV_ALLOW_TF32
    on = mode == "tf32"
    for path, name in _TF32_SWITCHES:
        setattr(owner(path), name, on)
    constants.SPCONV_ALLOW_TF32 = on
    try:
        yield torch.float16 if mode == "fp16" and device == "cuda" else torch.float32
    finally:
        for (path, name), value in zip(_TF32_SWITCHES, saved):
            setattr(owner(path), name, value)
        constants.SPCONV_ALLOW_TF32 = saved_spconv


def weight_to_spconv_kernel(weight_kio, kernel):
    """:func:`weight_to_spconv` for a ``kernel ** 3`` box of any size (3: submanifold,
    2: the k2s2 strided and inverse layers): (K, Cin, Cout) -> (Cout, k, k, k, Cin)."""
    w = np.asarray(weight_kio)
    cin, cout = w.shape[1], w.shape[2]
    if w.shape[0] != kernel ** 3:
        raise ValueError(f"weight_to_spconv_kernel: weight has {w.shape[0]} offsets; a "
                         f"{kernel}x{kernel}x{kernel} kernel has {kernel ** 3}")
    return np.ascontiguousarray(w.reshape(kernel, kernel, kernel, cin, cout)
                                .transpose(4, 0, 1, 2, 3))


def match_rows(ours, theirs):
    """``perm`` with ``theirs[perm[r]] == ours[r]`` for every row ``r`` (two orders of one
    set of ``(batch, x, y, z)`` rows); ValueError when the sets differ."""
    ours = np.asarray(ours, dtype=np.int64)
    theirs = np.asarray(theirs, dtype=np.int64)
    if ours.shape != theirs.shape:
        raise ValueError(f"match_rows: the site sets differ in size ({ours.shape} and "
                         f"{theirs.shape})")
    dims = np.maximum(ours.max(axis=0), theirs.max(axis=0)) + 1 if len(ours) else np.ones(4)

    def key(rows):
        k = np.zeros(len(rows), np.int64)
        for d in range(rows.shape[1]):
            k = k * int(dims[d]) + rows[:, d]
        return k

    ka, kb = key(ours), key(theirs)
    oa, ob = np.argsort(ka, kind="stable"), np.argsort(kb, kind="stable")
    if not np.array_equal(ka[oa], kb[ob]):
        raise ValueError("match_rows: the two site sets differ")
    perm = np.empty(len(ka), np.int64)
    perm[oa] = ob
    return perm


def torch_peak_bytes(fn, device):
    """Peak extra bytes torch's CUDA caching allocator hands out while ``fn()`` runs (its
    ``max_memory_allocated`` over the call minus ``memory_allocated`` before; the result
    of ``fn`` is alive at the peak). None on the CPU."""
    if device != "cuda":
        fn()
        return None
    torch, _ = import_for_device(device)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    result = fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    del result
    return int(peak)


class DeviceLayer:
    """One spconv layer on the same sites, features and weights as a sparsegrid row.

    Parameters
    ----------
    kind : {'subm', 'strided', 'inverse'}
        ``'subm'``: SubMConv3d(k) whose pairs are built once and found again under its
        ``indice_key`` (as every later layer of a network finds them); ``'strided'``:
        SparseConv3d(k, s), which rebuilds its pairs on every call (spconv reuses the
        pairs of submanifold layers only); ``'inverse'``: SparseInverseConv3d(k) on the
        output of a strided layer, reusing that layer's pairs.
    indices : int32 (N, 4)
        The fine sites (batch first).
    spatial_shape : 3 ints
    weight_kio : (K, Cin, Cout) NumPy array
        sparsegrid's layout (converted with :func:`weight_to_spconv_kernel`).
    features, grad : NumPy or CuPy arrays (CuPy's cross to torch through DLPack)
        The layer's input features and the output gradient, both in sparsegrid's row order
        (for ``'inverse'`` the input is on the coarse sites, for ``'strided'`` the
        gradient is).
    device : {'cuda', 'cpu'}
    dtype : torch.dtype
    kernel, stride : int
    coarse_indices : int32 (M, 4), needed by ``'strided'`` and ``'inverse'``
        sparsegrid's coarse sites, to carry rows between the two libraries' orders.
    """

    def __init__(self, kind, indices, spatial_shape, weight_kio, features, grad, device,
                 dtype, kernel=3, stride=1, coarse_indices=None):
        if kind not in ("subm", "strided", "inverse"):
            raise ValueError(f"DeviceLayer: kind must be 'subm', 'strided' or 'inverse'; "
                             f"got {kind!r}")
        if kind != "subm" and coarse_indices is None:
            raise ValueError(f"DeviceLayer: kind {kind!r} needs coarse_indices")
        torch, spconv = import_for_device(device)
        self.torch, self.kind, self.device = torch, kind, device
        dev = torch.device(device)
        cin, cout = int(weight_kio.shape[1]), int(weight_kio.shape[2])
        self._indices = torch.from_numpy(np.ascontiguousarray(indices, dtype=np.int32)).to(dev)
        self._shape, self._batch = list(spatial_shape), _batch_size(indices)
        self._spconv = spconv

        def to(array):   # NumPy, or a device array through DLPack (CuPy), to torch
            if isinstance(array, np.ndarray):
                tensor = torch.from_numpy(np.ascontiguousarray(array))
            else:
                tensor = torch.from_dlpack(array)
            return tensor.to(dev, dtype).contiguous()

        def into_spconv_order(tensor, perm):   # row r of ours -> row perm[r] of spconv's
            out = torch.empty_like(tensor)
            out[torch.from_numpy(perm).to(dev)] = tensor
            return out

        weight = to(weight_to_spconv_kernel(weight_kio, kernel))
        if kind == "subm":
            self.layer = spconv.SubMConv3d(cin, cout, kernel, bias=False, indice_key="subm")
        elif kind == "strided":
            self.layer = spconv.SparseConv3d(cin, cout, kernel, stride, bias=False)
        else:
            self.layer = spconv.SparseInverseConv3d(cin, cout, kernel, indice_key="down",
                                                    bias=False)
        self.layer = self.layer.to(dev, dtype)
        with torch.no_grad():
            self.layer.weight.copy_(weight)
        if kind == "subm":
            self._features = to(features)
            self._grad = to(grad)
            x = self._fine(self._features)
            with torch.no_grad():
                x.indice_dict = self.layer(x).indice_dict   # pairs built once, then reused
            self._input = x
        elif kind == "strided":
            self._features = to(features)
            with torch.no_grad():
                out = self.layer(self._fine(self._features))
            self._perm = match_rows(coarse_indices, out.indices.cpu().numpy())
            self._grad = into_spconv_order(to(grad), self._perm)
        else:
            down = spconv.SparseConv3d(1, 1, kernel, stride, bias=False,
                                       indice_key="down").to(dev, dtype)
            with torch.no_grad():
                coarse = down(self._fine(torch.ones(len(indices), 1, device=dev,
                                                    dtype=dtype)))
            perm = match_rows(coarse_indices, coarse.indices.cpu().numpy())
            self._features = into_spconv_order(to(features), perm)
            self._coarse = coarse
            self._input = coarse.replace_feature(self._features)
            self._grad = to(grad)

    def _fine(self, features):
        return self._spconv.SparseConvTensor(features, self._indices, self._shape, self._batch)

    def _inputs(self, features):
        if self.kind == "subm":
            x = self._fine(features)
            x.indice_dict = self._input.indice_dict
            return x
        if self.kind == "strided":
            return self._fine(features)   # a fresh tensor: spconv builds the pairs again
        return self._coarse.replace_feature(features)

    def forward(self):
        """One forward under ``torch.no_grad()``; returns spconv's output tensor."""
        with self.torch.no_grad():
            return self.layer(self._inputs(self._features))

    def forward_backward(self):
        """Forward with gradients, then the backward of ``(out * grad).sum()`` (feature
        and weight gradients); returns ``(features_grad, weight_grad)``."""
        self.layer.weight.grad = None
        leaf = self._features.detach().requires_grad_(True)
        out = self.layer(self._inputs(leaf))
        out.features.backward(self._grad)
        return leaf.grad, self.layer.weight.grad

    def output(self):
        """The forward's output as float64 NumPy, in sparsegrid's row order."""
        out = self.forward()
        values = out.features.detach().float().cpu().numpy().astype(np.float64)
        if self.kind == "strided":
            values = values[self._perm]
        return values

    def peak_bytes(self, which="forward"):
        """:func:`torch_peak_bytes` of :meth:`forward` or :meth:`forward_backward`."""
        fn = self.forward if which == "forward" else self.forward_backward
        return torch_peak_bytes(fn, self.device)


__all__ += ["DeviceLayer", "device_status", "import_for_device", "match_rows", "precision",
            "torch_peak_bytes", "weight_to_spconv_kernel"]


# --------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------


def main(repeat=9):
    """Print spconv's CPU timings (1 thread) for every scene of scenes.SCENES."""
    sys.path.insert(0, _HERE)
    import scenes

    if not available():
        print("spconv is not importable; run with .venv-spconv/bin/python")
        return 1
    torch, spconv_mod = _import_spconv()
    import spconv

    set_threads(1)
    print(f"spconv {spconv.__version__}, torch {torch.__version__}, {torch.get_num_threads()} thread(s), "
          f"median of {repeat}; self_check max abs err {self_check():.1e}")
    columns = ["N", "rulebook", "fwd C16", "fwd C32", "fwd C64", "f+b C32",
               "k2s2 C32", "k3s2 C32", "inv2 C32", "mem C32"]
    print(f"{'scene':<11}" + "".join(f"{c:>10}" for c in columns) + "   (ms; mem in MiB)")
    for name, make in scenes.SCENES.items():
        idx, shape = make()
        ms = lambda s: f"{s * 1e3:10.1f}"  # noqa: E731
        row = [
            f"{len(idx):10d}",
            ms(time_rulebook(idx, shape, repeat)),
            ms(time_subm_forward(idx, shape, 16, repeat)),
            ms(time_subm_forward(idx, shape, 32, repeat)),
            ms(time_subm_forward(idx, shape, 64, repeat)),
            ms(time_subm_forward_backward(idx, shape, 32, repeat)),
            ms(time_strided_forward(idx, shape, 32, 2, 2, repeat)),
            ms(time_strided_forward(idx, shape, 32, 3, 2, repeat)),
            ms(time_inverse_forward(idx, shape, 32, 2, 2, repeat)),
            f"{peak_memory_rulebook_forward(idx, shape, 32) / 2**20:10.1f}",
        ]
        print(f"{name:<11}" + "".join(row), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
