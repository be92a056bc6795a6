"""DCLS (construct method): construct_kernel + dense convolution against a dense
convolution with a full kernel of the dilated size, in the same run.

2-D, channels first, float32, stride 1, padding ``dilated_kernel_size // 2`` (the output
keeps the input's size). For every dilated size the baseline is
``denseconv.conv(x, W)`` with a learnable dense ``W`` of shape (C, C/groups, n, n); for
every kernel count, ``construct_kernel`` alone and ``dcls_conv`` (construct + the same
convolution). Forward, and forward + backward (gradients of x and of every parameter:
weight, P, SIG, bias for DCLS; W and bias for the baseline). Best of ``--repeat`` after
one warm-up, in ms; ``ratio`` is dcls_conv / dense (the construct method's price over the
convolution it ends in: above 1 by the construction's share). For the bilinear versions
('v0', 'v1') also the construct-free path (``method='construct_free'``: one GEMM per
kernel offset some tap touches), forward and forward + backward, and ``touched``, the
fraction of the n x n offsets it runs (what ``method='auto'`` compares with 0.5).
``--shared`` gives every filter the same positions (the older API's im2col layers share
them across output channels), so few offsets are touched.

    .venv/bin/python benchmarks/bench_dcls.py [--sizes 7 11 15 19 23 27 31]
        [--counts 9 16 26 34 40] [--n 2] [--channels 32] [--size 64 64] [--groups 1]
        [--version gauss] [--repeat 3] [--device cpu] [--shared]

``--device cuda`` runs on CuPy (times then include a device synchronisation per call).
"""

from __future__ import annotations

import argparse
import platform

import numpy as np

from sparsegrid import autodiff as ad
from sparsegrid import backend, dcls, denseconv


from timing import best_ms  # noqa: E402  (best_ms(fn, repeat, sync))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[7, 11, 15, 19, 23, 27, 31])
    parser.add_argument("--counts", type=int, nargs="+", default=[9, 16, 26, 34, 40])
    parser.add_argument("--n", type=int, default=2)
    parser.add_argument("--channels", type=int, default=32)
    parser.add_argument("--size", type=int, nargs=2, default=(64, 64))
    parser.add_argument("--groups", type=int, default=1)
    parser.add_argument("--version", default="gauss", choices=dcls.VERSIONS)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--shared", action="store_true",
                        help="the same positions for every (output, input) channel pair")
    args = parser.parse_args()
    c, g = args.channels, args.groups
    device = args.device

    if device == "cpu":
        def sync():
            pass
    else:
        import cupy

        def sync():
            cupy.cuda.Device().synchronize()

    def put(a):
        return backend.to_device(a, device)

    rng = np.random.default_rng(0)
    h, w = args.size
    x = put(rng.standard_normal((args.n, c, h, w), dtype=np.float32))
    grad_out = put(rng.standard_normal((args.n, c, h, w), dtype=np.float32))
    bias = put(rng.standard_normal(c, dtype=np.float32))
    print(f"DCLS construct + conv vs dense conv of the dilated size: N={args.n}, C={c} -> {c}, "
          f"groups={g}, {h}x{w}, version={args.version!r}, float32, {device}, best of "
          f"{args.repeat}")
    print(f"{platform.processor() or platform.machine()}, numpy {np.__version__}")
    head = (f"{'size':>5} {'KC':>4} | {'construct':>9} {'(+bwd)':>8} | {'dcls fwd':>9} "
            f"{'dense fwd':>9} {'ratio':>6} | {'dcls f+b':>9} {'dense f+b':>9} {'ratio':>6} | "
            f"{'free fwd':>9} {'free f+b':>9} {'touched':>7}")
    free = args.version in dcls.CONSTRUCT_FREE_VERSIONS
    print(head)
    print("-" * len(head))
    for n in args.sizes:
        pad = n // 2
        dense_w = put((rng.standard_normal((c, c // g, n, n)) / np.sqrt(c // g * n * n))
                      .astype(np.float32))

        def dense_forward():
            return denseconv.conv(x, dense_w, bias, padding=pad, groups=g)

        def dense_backward():
            tx = ad.Tensor(x, requires_grad=True)
            tw = ad.Tensor(dense_w, requires_grad=True)
            tb = ad.Tensor(bias, requires_grad=True)
            denseconv.conv(tx, tw, tb, padding=pad, groups=g).backward(grad_out)
            return tx.grad, tw.grad, tb.grad

        dense_f = best_ms(dense_forward, args.repeat, sync)
        dense_fb = best_ms(dense_backward, args.repeat, sync)
        for kc in args.counts:
            shape = (c, c // g, kc)
            weight = put((rng.uniform(-1, 1, shape) / np.sqrt(c // g * kc)).astype(np.float32))
            P = np.clip(rng.normal(0, n / 4, (2,) + shape), -pad, pad)
            if args.shared:
                P = np.broadcast_to(P[:, :1, :1], P.shape)
            P = put(np.ascontiguousarray(P).astype(np.float32))
            SIG = put(np.full((2,) + shape, 0.23, np.float32)) \
                if args.version in ("gauss", "max") else None
            grad_kernel = put(rng.standard_normal((c, c // g, n, n), dtype=np.float32))

            def leaves():
                return [None if a is None else ad.Tensor(a, requires_grad=True)
                        for a in (weight, P, SIG)]

            def construct():
                return dcls.construct_kernel(weight, P, SIG, n, args.version)

            def construct_backward():
                tw, tp, ts = leaves()
                dcls.construct_kernel(tw, tp, ts, n, args.version).backward(grad_kernel)
                return tw.grad, tp.grad

            def dcls_forward(method="construct"):
                return dcls.dcls_conv(x, weight, P, SIG, bias, n, padding=pad, groups=g,
                                      version=args.version, method=method)

            def dcls_backward(method="construct"):
                tx = ad.Tensor(x, requires_grad=True)
                tw, tp, ts = leaves()
                tb = ad.Tensor(bias, requires_grad=True)
                dcls.dcls_conv(tx, tw, tp, ts, tb, n, padding=pad, groups=g,
                               version=args.version, method=method).backward(grad_out)
                return tx.grad, tw.grad, tp.grad

            cons_f = best_ms(construct, args.repeat, sync)
            cons_fb = best_ms(construct_backward, args.repeat, sync)
            dcls_f = best_ms(dcls_forward, args.repeat, sync)
            dcls_fb = best_ms(dcls_backward, args.repeat, sync)
            if free:
                free_f = best_ms(lambda: dcls_forward("construct_free"), args.repeat, sync)
                free_fb = best_ms(lambda: dcls_backward("construct_free"), args.repeat, sync)
                touched = len(dcls.touched_offsets(P, n, args.version)) / (n * n)
                tail = f"{free_f:9.1f} {free_fb:9.1f} {touched:7.2f}"
            else:
                tail = f"{'-':>9} {'-':>9} {'-':>7}"
            print(f"{n:>5} {kc:>4} | {cons_f:9.2f} {cons_fb:8.2f} | {dcls_f:9.1f} "
                  f"{dense_f:9.1f} {dcls_f / dense_f:6.2f} | {dcls_fb:9.1f} {dense_fb:9.1f} "
                  f"{dcls_fb / dense_fb:6.2f} | {tail}")


if __name__ == "__main__":
    main()
