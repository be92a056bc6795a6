"""Dense convolution: sparsegrid.denseconv.conv against PyTorch's conv2d, same data.

The dense baseline of SBNet's benchmark: N=1, 200 x 350, Cin=192 -> Cout=48, 3x3,
padding 'same', float32, channels first (NCHW) and channels last (NHWC). Prints the best of
``--repeat`` runs (after a warm-up) of the forward and of forward + backward (gradients of
the input, the weight and the bias), in ms, and -- when torch is importable -- the same
for ``torch.nn.functional.conv2d`` on the same arrays, with the ratio sparsegrid / torch
(below 1: sparsegrid is faster) and the largest difference of the outputs.

    .venv/bin/python benchmarks/bench_denseconv.py [--repeat 5] [--size 200 350]
"""

from __future__ import annotations

import argparse

import numpy as np

from sparsegrid import autodiff as ad
from sparsegrid import denseconv


from timing import best_ms  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--size", type=int, nargs=2, default=(200, 350))
    parser.add_argument("--cin", type=int, default=192)
    parser.add_argument("--cout", type=int, default=48)
    args = parser.parse_args()
    h, w = args.size
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, args.cin, h, w), dtype=np.float32)
    weight = (rng.standard_normal((args.cout, args.cin, 3, 3), dtype=np.float32)
              / np.sqrt(9 * args.cin)).astype(np.float32)
    bias = rng.standard_normal(args.cout, dtype=np.float32)
    grad = rng.standard_normal((1, args.cout, h, w), dtype=np.float32)
    try:
        import torch
        import torch.nn.functional as F
    except ImportError:
        torch = None
    print(f"conv N=1 {h}x{w} C={args.cin}->{args.cout} 3x3 'same' float32, best of "
          f"{args.repeat}")
    if torch is not None:
        print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    else:
        print("torch not importable: sparsegrid only")

    for layout in ("NCHW", "NHWC"):
        xl = x if layout == "NCHW" else np.ascontiguousarray(x.transpose(0, 2, 3, 1))
        gl = grad if layout == "NCHW" else np.ascontiguousarray(grad.transpose(0, 2, 3, 1))

        def forward():
            return denseconv.conv(xl, weight, bias, padding="same", layout=layout)

        def forward_backward():
            tx = ad.Tensor(xl, requires_grad=True)
            tw = ad.Tensor(weight, requires_grad=True)
            tb = ad.Tensor(bias, requires_grad=True)
            denseconv.conv(tx, tw, tb, padding="same", layout=layout).backward(gl)
            return tx.grad, tw.grad, tb.grad

        fwd, fwd_bwd = best_ms(forward, args.repeat), best_ms(forward_backward, args.repeat)
        line = f"sparsegrid {layout}: forward {fwd:8.1f} ms   forward+backward {fwd_bwd:8.1f} ms"
        if torch is not None:
            tx0 = torch.from_numpy(x)
            tw0, tb0 = torch.from_numpy(weight), torch.from_numpy(bias)
            tg = torch.from_numpy(grad)
            if layout == "NHWC":
                tx0 = tx0.contiguous(memory_format=torch.channels_last)
                tg = tg.contiguous(memory_format=torch.channels_last)

            def torch_forward():
                with torch.no_grad():
                    return F.conv2d(tx0, tw0, tb0, padding="same")

            def torch_forward_backward():
                tx = tx0.detach().requires_grad_(True)
                tw = tw0.detach().requires_grad_(True)
                tb = tb0.detach().requires_grad_(True)
                F.conv2d(tx, tw, tb, padding="same").backward(tg)
                return tx.grad, tw.grad, tb.grad

            t_fwd = best_ms(torch_forward, args.repeat)
            t_fwd_bwd = best_ms(torch_forward_backward, args.repeat)
            ours = forward()
            theirs = torch_forward().numpy()
            if layout == "NHWC":
                theirs = theirs.transpose(0, 2, 3, 1)
            diff = float(np.abs(ours - theirs).max())
            line += (f"\n     torch {layout}: forward {t_fwd:8.1f} ms   forward+backward "
                     f"{t_fwd_bwd:8.1f} ms   ratio {fwd / t_fwd:.2f} / {fwd_bwd / t_fwd_bwd:.2f}"
                     f"   max |diff| {diff:.2e}")
        print(line)


if __name__ == "__main__":
    main()
