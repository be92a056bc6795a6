"""Forward and backward time per batch of the example networks (hello world, MNIST,
handwriting), at 1 and 2 threads.

    python benchmarks/bench_training.py [--repeats 20]

Inputs: SCN's hello-world messages (batch 2); 64 MNIST digits and 64 KanjiVG characters
when their caches exist (run the examples once), otherwise random sparse pictures with the
same number of active sites. Each step includes the input layer and so every rulebook
of the batch (nothing is cached across steps, as in training). Times are medians over ``--repeats`` steps after 3 warm-up
steps; each thread count runs in a fresh process.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import time

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))


def hello_world():
    import hello_world as hw  # builds the model at import; reuse its pieces
    import sparsegrid.nn as scn
    # The input layer is timed too: every batch builds its rulebooks, as in training.
    return scn.Sequential(hw.input_layer, hw.model), [hw.locations, hw.features], None


def random_pictures(n, size, sites, channels, rng):
    coords, feats = [], []
    for b in range(n):
        flat = rng.choice(size * size, size=sites, replace=False)
        xy = np.stack(np.unravel_index(flat, (size, size)), axis=1)
        coords.append(np.concatenate([xy, np.full((sites, 1), b)], axis=1))
        feats.append(rng.random((sites, channels)).astype(np.float32))
    return [np.concatenate(coords), np.concatenate(feats), n]


def mnist(rng):
    import mnist_sparse
    model, field = mnist_sparse.build_model()
    try:
        import datasets
        if not (datasets.cache_dir() / "mnist5k.npz").exists():
            raise FileNotFoundError
        images, labels = datasets.load_mnist5k()
        inputs = mnist_sparse.make_input(images[:64], field, rng)
        source = "MNIST digits"
    except (FileNotFoundError, ImportError):
        inputs, labels = random_pictures(64, field, 150, 1, rng), rng.integers(0, 10, 64)
        source = "random pictures (no MNIST cache)"
    return model, inputs, np.asarray(labels[:64]), source


def handwriting(rng):
    import handwriting as hwr
    model, size = hwr.build_model(200)
    try:
        import datasets
        if not list(datasets.cache_dir().glob("kanjivg*.npz")):
            raise FileNotFoundError
        characters = datasets.kanjivg_classes(200)
        labels = rng.integers(0, 200, 64)
        inputs = hwr.make_input(characters, labels, size, rng)
        source = "KanjiVG characters"
    except (FileNotFoundError, ImportError):
        inputs, labels = random_pictures(64, size, 290, 3, rng), rng.integers(0, 200, 64)
        source = "random pictures (no KanjiVG cache)"
    return model, inputs, labels, source


def time_steps(model, inputs, labels, repeats):
    from sparsegrid import autodiff as ad
    forward, backward = [], []
    for i in range(repeats + 3):
        model.zero_grad()
        t0 = time.perf_counter()
        out = model(inputs)
        loss = ad.mean(out * out) if labels is None else ad.softmax_cross_entropy(out, labels)
        t1 = time.perf_counter()
        loss.backward()
        t2 = time.perf_counter()
        if i >= 3:
            forward.append(t1 - t0)
            backward.append(t2 - t1)
    return 1e3 * float(np.median(forward)), 1e3 * float(np.median(backward))


def child(repeats):
    import contextlib
    import io
    import sparsegrid
    import sparsegrid.nn as scn
    rng = np.random.default_rng(0)
    rows = {}
    with contextlib.redirect_stdout(io.StringIO()):   # hello_world prints at import
        model, inputs, labels = hello_world()
    rows["hello world (batch 2)"] = time_steps(model, inputs, labels, repeats) + \
        ("SCN's messages",)
    scn.manual_seed(0)
    model, inputs, labels, source = mnist(rng)
    rows["MNIST network (batch 64)"] = time_steps(model, inputs, labels, repeats) + (source,)
    scn.manual_seed(0)
    model, inputs, labels, source = handwriting(rng)
    rows["handwriting network (batch 64)"] = time_steps(model, inputs, labels, repeats) + \
        (source,)
    print(json.dumps({"threads": sparsegrid.get_num_threads(), "rows": rows}))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args.repeats)
    results = []
    for threads in (1, 2):
        env = dict(os.environ, SPARSEGRID_NUM_THREADS=str(threads))
        out = subprocess.run([sys.executable, __file__, "--child", "--repeats",
                              str(args.repeats)], env=env, capture_output=True, text=True,
                             check=True)
        results.append(json.loads(out.stdout.strip().splitlines()[-1]))
    print(f"{'network':34s} {'threads':>7s} {'forward ms':>11s} {'backward ms':>12s}  input")
    for name in results[0]["rows"]:
        for r in results:
            f, b, source = r["rows"][name]
            print(f"{name:34s} {r['threads']:7d} {f:11.1f} {b:12.1f}  {source}")


if __name__ == "__main__":
    main()
