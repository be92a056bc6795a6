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
