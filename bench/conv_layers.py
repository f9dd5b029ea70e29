"""Per-layer convolution timings of ResNet-50 (batch 8, 224, one view, forward + backward, float32):
Paddle's own F.conv2d, our im2col + one GEMM (paddle_impl.layers._Conv2dK), our oneDNN direct convolution
(layers.conv2d_onednn; '-' where oneDNN is not loadable) and torch, interleaved, median of 5. The ResNet-50
model uses ours only for kernels larger than 1x1 (conv2d_k: oneDNN where layers.onednn_conv_wins, else
im2col). With OMP_NUM_THREADS=1 the times are CPU times of the process (robust to other load), else wall.

    python -m bench.conv_layers [--only-k3]     (not part of make bench; ~3 min on 2 cores)

``--step [PAIRS] [A B]``: the whole ResNet-50 training step of bench.bench's Paddle worker instead, with
MOCO_ONEDNN_CONV switched between A and B (default 0 and auto) step by step in one process (PAIRS pairs,
default 8, after one warm-up each; the order alternates): step times and the median of the paired ratios.
"""
import os
import sys
import time

import paddle_impl  # noqa: F401  (thread and allocator defaults before paddle loads)

# (in channels, input size, out channels, kernel, stride, layers of this shape in one ResNet-50 forward)
SHAPES = [(3, 224, 64, 7, 2, 1), (64, 56, 64, 1, 1, 1), (64, 56, 64, 3, 1, 3), (64, 56, 256, 1, 1, 4),
          (256, 56, 64, 1, 1, 2), (256, 56, 128, 1, 1, 1), (128, 56, 128, 3, 2, 1), (128, 28, 512, 1, 1, 4),
          (256, 56, 512, 1, 2, 1), (512, 28, 128, 1, 1, 3), (128, 28, 128, 3, 1, 3), (512, 28, 256, 1, 1, 1),
          (256, 28, 256, 3, 2, 1), (256, 14, 1024, 1, 1, 6), (512, 28, 1024, 1, 2, 1), (1024, 14, 256, 1, 1, 5),
          (256, 14, 256, 3, 1, 5), (1024, 14, 512, 1, 1, 1), (512, 14, 512, 3, 2, 1), (512, 7, 2048, 1, 1, 3),
          (1024, 14, 2048, 1, 2, 1), (2048, 7, 512, 1, 1, 2), (512, 7, 512, 3, 1, 2)]


def main():
    import numpy as np
    import paddle
    import paddle.nn.functional as F
    import torch

    from paddle_impl import cpu_kernels, layers
    if cpu_kernels.get() is None:
        raise SystemExit('our CPU kernels are not built here (see the warning above)')
    rng = np.random.default_rng(0)
    onednn = cpu_kernels.onednn_loaded()
    clock = time.process_time if os.environ.get('OMP_NUM_THREADS') == '1' else time.perf_counter
    shapes = [sh for sh in SHAPES if sh[3] > 1] if '--only-k3' in sys.argv else SHAPES
    total = {'paddle': 0.0, 'im2col': 0.0, 'onednn': 0.0, 'torch': 0.0}
    print('in, size, out, k, stride, count: forward+backward ms (median of 5)')
    for c, h, co, k, s, count in shapes:
        p = k // 2
        x = paddle.to_tensor(rng.standard_normal((8, c, h, h)).astype('float32'))
        x.stop_gradient = c == 3  # the images take no gradient
        w = paddle.to_tensor(rng.standard_normal((co, c, k, k)).astype('float32') * 0.05)
        w.stop_gradient = False
        tx = torch.from_numpy(x.numpy()).requires_grad_(c != 3)
        tw = torch.from_numpy(w.numpy()).requires_grad_()
        ins, tins = ([w], [tw]) if c == 3 else ([x, w], [tx, tw])

        def paddle_own():
            y = F.conv2d(x, w, stride=s, padding=p)
            paddle.grad(y, ins, y)

        geom = [k, k, s, s, p, p]
        out_hw = [(h + 2 * p - k) // s + 1] * 2

        def im2col():
            y = layers._Conv2dK.apply(x, w, geom, out_hw)
            paddle.grad(y, ins, y)

        def dnnl():
            y = layers.conv2d_onednn(x, w, geom)
            paddle.grad(y, ins, y)

        def torch_conv():
            y = torch.nn.functional.conv2d(tx, tw, stride=s, padding=p)
            torch.autograd.grad(y, tins, y)

        fns = {'paddle': paddle_own, 'im2col': im2col, 'onednn': dnnl, 'torch': torch_conv}
        if not onednn:
            del fns['onednn']
        times = {n: [] for n in fns}
        for f in fns.values():
            f()
        for _ in range(5):
            for n, f in fns.items():
                t = clock()
                f()
                times[n].append(clock() - t)
        med = {n: sorted(v)[2] * 1e3 for n, v in times.items()}
        for n in med:
            total[n] += med[n] * count
        print(f'{c:5d} {h:4d} {co:5d} {k} {s} x{count}: ' + '  '.join(f'{n} {v:6.1f}' for n, v in med.items()))
    what = 'the 3x3/7x7 convolutions' if '--only-k3' in sys.argv else 'all convolutions'
    print(f'one ResNet-50 view, {what}: ' + ', '.join(f'{n} {v:.0f} ms' for n, v in total.items() if v))


def step_ab(pairs=8, a='0', b='auto'):
    import statistics

    from bench import bench
    w = bench.Worker('paddle', 'cpu', 'model')
    w.op_build('resnet50', 'cpu')
    res = {a: [], b: []}
    for v in (a, b):
        os.environ['MOCO_ONEDNN_CONV'] = v
        w.op_step()  # warm-up: primitives, allocator
    for i in range(pairs):
        for v in ((a, b) if i % 2 == 0 else (b, a)):
            os.environ['MOCO_ONEDNN_CONV'] = v
            time.sleep(bench.SETTLE_S)
            r = w.op_step()
            res[v].append((r['time'], r['cpu']))
            print(f'MOCO_ONEDNN_CONV={v}: step {r["time"]:.3f} s, CPU {r["cpu"]:.3f} s', flush=True)
    for v, xs in res.items():
        print(f'MOCO_ONEDNN_CONV={v}: median {statistics.median(t for t, _ in xs):.3f} s, min '
              f'{min(t for t, _ in xs):.3f} s, CPU median {statistics.median(c for _, c in xs):.3f} s')
    ratios = [tb / ta for (ta, _), (tb, _) in zip(res[a], res[b])]
    print(f'paired step-time ratio {b}/{a}: median {statistics.median(ratios):.3f} '
          f'({", ".join(f"{r:.3f}" for r in ratios)})')


if __name__ == '__main__':
    if '--step' in sys.argv:
        args = sys.argv[sys.argv.index('--step') + 1:]
        step_ab(int(args[0]) if args else 8, *(args[1:3] if len(args) >= 3 else ()))
    else:
        main()
