"""Inference latency per image of one MoCo v3 backbone, five ways, in one run:
eager Paddle (paddle_impl), Paddle Inference (the paddle.jit.save export of convert/export.py, without and
with its oneDNN option), onnxruntime (the paddle2onnx export) and eager torch (torch_ref), same weights.

``run(reps=...)`` returns {'latency_ms_per_image': {engine: {'1': ms, '32': ms}}, ...}: per batch size, the
median over ``reps`` timed calls of the whole batch divided by the batch; the engines take turns call by
call, so a busy machine slows them alike. ``python -m bench.inference`` prints a table (and --out writes
the JSON). The bench of bench/bench.py can include this result as is.
"""
import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time

import numpy as np

ENGINES = ('eager_paddle', 'paddle_inference', 'paddle_inference_onednn', 'onnxruntime', 'eager_torch')


def _build(arch, img_size, vit_kwargs, seed):
    """(paddle model, torch model) of the backbone, same random weights, eval mode, float32."""
    import paddle
    import torch

    from convert import keymap
    from convert.bridge import load_into_torch, paddle_state_numpy
    from paddle_impl import models as pm
    from torch_ref import models as tm
    paddle.seed(seed)
    nc = 1000 if arch == 'resnet50' else 0
    pmodel = pm.encoder_factory(arch, img_size=img_size, **vit_kwargs)(num_classes=nc)
    tmodel = tm.encoder_factory(arch, img_size=img_size, **vit_kwargs)(num_classes=nc)
    if arch == 'resnet50':
        pmodel.fc, tmodel.fc = paddle.nn.Identity(), torch.nn.Identity()
    pmodel.eval()
    load_into_torch(tmodel, keymap.paddle_to_torch(paddle_state_numpy(pmodel)))
    return pmodel, tmodel.float().eval()


def _engines(pmodel, tmodel, prefix, threads):
    """{engine: f(x) -> numpy output}."""
    import torch

    from convert import export as E
    torch.set_num_threads(threads)
    pred = E.predictor(prefix, onednn=False, threads=threads)
    pred_dnn = E.predictor(prefix, onednn=True, threads=threads)
    sess = E.onnx_session(prefix + '.onnx', threads=threads)
    return {'eager_paddle': lambda x: E.eager_paddle(pmodel, x),
            'paddle_inference': lambda x: E.run_predictor(pred, x),
            'paddle_inference_onednn': lambda x: E.run_predictor(pred_dnn, x),
            'onnxruntime': lambda x: E.run_onnx(sess, x),
            'eager_torch': lambda x: E.eager_torch(tmodel, x)}


def _time(fns, x, reps):
    """{engine: [seconds per call]}, engines taking turns; one untimed warm-up call each first."""
    out = {name: [] for name in fns}
    for f in fns.values():
        f(x)
    for _ in range(reps):
        for name, f in fns.items():
            t = time.perf_counter()
            f(x)
            out[name].append(time.perf_counter() - t)
    return out


def run(reps=5, arch='vit_small', img_size=224, batches=(1, 32), vit_kwargs=None, threads=None, seed=0):
    """Latency per image (ms) of each engine at each batch size; see the module docstring."""
    from convert import export as E
    vit_kwargs = dict(vit_kwargs or {})
    threads = int(threads or os.environ.get('OMP_NUM_THREADS') or os.cpu_count() or 1)
    pmodel, tmodel = _build(arch, img_size, vit_kwargs, seed)
    tmp = tempfile.mkdtemp(prefix='bench-inference-')
    try:
        prefix = os.path.join(tmp, 'model')
        t = time.perf_counter()
        E.jit_save(pmodel, prefix, img_size)
        E.to_onnx(prefix, prefix + '.onnx')
        export_s = time.perf_counter() - t
        fns = _engines(pmodel, tmodel, prefix, threads)
        lat, diffs = {name: {} for name in fns}, {}
        rng = np.random.default_rng(seed)
        for b in batches:
            x = rng.standard_normal((b, 3, img_size, img_size)).astype('float32')
            ref = fns['eager_paddle'](x)
            for name, f in fns.items():
                if name != 'eager_paddle':
                    d = float(np.abs(f(x).astype(np.float64) - ref).max() / np.abs(ref).max())
                    diffs[name] = max(diffs.get(name, 0.0), d)
            for name, times in _time(fns, x, reps).items():
                lat[name][str(b)] = 1000.0 * statistics.median(times) / b
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {'model': {'arch': arch, 'img_size': img_size, **vit_kwargs, 'output': 'backbone features'},
            'reps': reps, 'threads': threads, 'dtype': 'float32', 'export_seconds': export_s,
            'latency_ms_per_image': lat, 'max_rel_diff_vs_eager_paddle': diffs, 'machine': _machine()}


def _machine():
    import onnxruntime
    import paddle
    import torch
    cpu = platform.processor()
    try:
        with open('/proc/cpuinfo') as f:
            cpu = next((ln.split(':', 1)[1].strip() for ln in f if ln.startswith('model name')), cpu)
    except OSError:
        pass
    return {'cpu': cpu, 'cores': os.cpu_count(), 'python': platform.python_version(), 'paddle': paddle.__version__,
            'torch': torch.__version__, 'onnxruntime': onnxruntime.__version__}


def table(res):
    bs = list(next(iter(res['latency_ms_per_image'].values())))
    lines = ['engine                     ' + ''.join(f'batch {b:>4} ms/img ' for b in bs)]
    for name, per in res['latency_ms_per_image'].items():
        lines.append(f'{name:<27}' + ''.join(f'{per[b]:>17.2f} ' for b in bs))
    return '\n'.join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(prog='python -m bench.inference', description=__doc__.splitlines()[0])
    p.add_argument('--reps', type=int, default=5)
    p.add_argument('-a', '--arch', default='vit_small')
    p.add_argument('--img-size', type=int, default=224)
    p.add_argument('--batches', default='1,32')
    p.add_argument('--out', default=None, help='write the result as JSON')
    a = p.parse_args(argv)
    res = run(a.reps, a.arch, a.img_size, tuple(int(b) for b in a.batches.split(',')))
    print(table(res))
    if a.out:
        with open(a.out, 'w') as f:
            json.dump(res, f, indent=1)
    return 0


if __name__ == '__main__':
    sys.exit(main())
