"""python -m convert export: Paddle Inference (paddle.jit.save) and ONNX (paddle2onnx), checked with the real
components: Paddle Inference's predictor, onnxruntime, and the torch_ref twin.

The sources are real: a main_moco run, a main_lincls run and a main_finetune run (one epoch each, tiny ViT:
img 32, patch 8, width 48, depth 2), and an official-layout PyTorch ResNet-50 classifier written by torch_ref.
Every exported file is checked here against a reference computed by the test itself (eager model built from
the checkpoint by hand, or the torch model that wrote the file), not only through --verify.
"""
import json
import os
import pathlib
import pickle
import subprocess
import sys
import textwrap

import numpy as np
import paddle
import pytest

from convert.__main__ import main as cli
from paddle_impl import io as pio
from paddle_impl import models as pm
from test_lincls import make_data

ROOT = pathlib.Path(__file__).resolve().parents[1]
TINY = dict(patch_size=8, embed_dim=48, depth=2, num_heads=3)
TINY_FLAGS = ['--vit-patch-size', '8', '--vit-embed-dim', '48', '--vit-depth', '2', '--vit-num-heads', '3']
IMG = 32


def _main(module, argv):
    import importlib
    rc = importlib.import_module(f'paddle_impl.{module}').main([str(a) for a in argv])
    assert rc in (0, None), f'{module} exited {rc}'


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
    """Checkpoints of real one-epoch runs of the three trainers on tiny data."""
    root = tmp_path_factory.mktemp('export')
    data = make_data(root / 'data')
    common = ['-b', 8, '--epochs', 1, '-j', 0, '--seed', 0]
    _main('main_moco', [data, '-a', 'vit_small', *TINY_FLAGS, '--moco-dim', 16, '--moco-mlp-dim', 32,
                        '--img-size', IMG, *common, '--output-dir', root / 'pre'])
    pre = root / 'pre' / 'checkpoint_0000.pdparams'
    _main('main_lincls', [data, '-a', 'vit_small', '--pretrained', pre, *common, '--output-dir', root / 'lin'])
    _main('main_finetune', [data, '-a', 'vit_small', '--finetune', pre, *common, '--output-dir', root / 'ft'])
    return {'root': root, 'pretrain': pre, 'linear': root / 'lin' / 'checkpoint.pdparams',
            'finetune': root / 'ft' / 'checkpoint.pdparams'}


def reference_model(path):
    """The eager Paddle model of a trainer checkpoint, built here by hand (not by convert/export.py)."""
    ck = pio.load_checkpoint(str(path))
    if ck['kind'] == 'pretrain':
        sd = {k[len('base_encoder.'):]: v for k, v in ck['state_dict'].items()
              if k.startswith('base_encoder.') and not k.startswith('base_encoder.head.')}
        nc = 0
    else:
        sd = ck['state_dict'] if ck['kind'] == 'linear' else ck['model']
        nc = ck['num_classes']
    model = pm.encoder_factory('vit_small', img_size=IMG, **TINY)(num_classes=nc)
    assert set(model.state_dict()) == set(sd)
    model.set_state_dict({k: paddle.to_tensor(np.asarray(v)) for k, v in sd.items()})
    model.eval()
    return model


def eager(model, x):
    with paddle.no_grad():
        return model(paddle.to_tensor(x)).numpy()


def inference_outputs(prefix, x, onednn=False):
    from paddle import inference
    config = inference.Config(f'{prefix}.json', f'{prefix}.pdiparams')
    config.disable_gpu()
    config.enable_onednn() if onednn else config.disable_onednn()
    pred = inference.create_predictor(config)
    h = pred.get_input_handle(pred.get_input_names()[0])
    h.reshape(list(x.shape))
    h.copy_from_cpu(x)
    pred.run()
    return pred.get_output_handle(pred.get_output_names()[0]).copy_to_cpu()


def onnx_outputs(path, x):
    import onnxruntime as ort
    sess = ort.InferenceSession(str(path), providers=['CPUExecutionProvider'])
    return sess.run(None, {sess.get_inputs()[0].name: x})[0]


def rel(a, b):
    return float(np.abs(np.asarray(a, np.float64) - b).max() / np.abs(a).max())


def run_cli(argv, capsys):
    capsys.readouterr()
    rc = cli([str(a) for a in argv])
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def batch(n, seed=1):
    return np.random.default_rng(seed).standard_normal((n, 3, IMG, IMG)).astype('float32')


# ------------------------------------------------------------------------------------------ exports

@pytest.mark.parametrize('kind', ['pretrain', 'linear', 'finetune'])
def test_export_trainer_checkpoint_both_formats_verified(runs, kind, capsys):
    prefix = runs['root'] / f'exp-{kind}'
    rc, out, err = run_cli(['export', '--input', runs[kind], '--output', prefix, '--format', 'both', '--verify'],
                           capsys)
    assert rc == 0, err
    checks = [line for line in out.splitlines() if line.startswith('verify:')]
    assert len(checks) == 3 and all('relative difference' in c for c in checks), out  # predictor, ORT, torch
    assert sorted(p.name for p in runs['root'].glob(f'exp-{kind}.*')) == \
        [f'exp-{kind}.json', f'exp-{kind}.onnx', f'exp-{kind}.pdiparams']
    assert not [p for p in os.listdir(runs['root']) if p.startswith('.export')]  # no temporary left
    ref_model = reference_model(runs[kind])
    for n in (1, 5):  # the batch dimension is dynamic
        x = batch(n)
        ref = eager(ref_model, x)
        assert ref.shape == (n, 48 if kind == 'pretrain' else 3)
        got = inference_outputs(prefix, x)
        assert got.shape == ref.shape and rel(ref, got) <= 1e-5
        assert rel(ref, inference_outputs(prefix, x, onednn=True)) <= 1e-5
        got = onnx_outputs(f'{prefix}.onnx', x)
        assert got.shape == ref.shape and rel(ref, got) <= 1e-4


def test_backbone_of_a_classifier_equals_the_pretrained_features(runs, capsys):
    """main_lincls keeps the pre-trained backbone frozen: its exported backbone gives main_moco's features."""
    a, b = runs['root'] / 'bb-pre', runs['root'] / 'bb-lin'
    assert run_cli(['export', '--input', runs['pretrain'], '--output', a, '--kind', 'backbone'], capsys)[0] == 0
    assert run_cli(['export', '--input', runs['linear'], '--output', b, '--kind', 'backbone'], capsys)[0] == 0
    assert not os.path.exists(f'{a}.onnx')  # --format paddle is the default
    x = batch(3)
    fa, fb = inference_outputs(a, x), inference_outputs(b, x)
    assert fa.shape == (3, 48) and np.array_equal(fa, fb)


def _official_resnet_classifier(path, num_classes=5, seed=0):
    """An official main_lincls-layout ResNet-50 file written by torch_ref, random weights and BN statistics."""
    import torch

    from torch_ref import models as tm
    torch.manual_seed(seed)
    model = tm.encoder_factory('resnet50', img_size=IMG)(num_classes=num_classes)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if name.endswith('running_var'):
                t.copy_(torch.rand(t.shape) + 0.5)
            elif name.endswith('running_mean') or (name.endswith('bias') and t.ndim == 1):
                t.copy_(0.1 * torch.randn(t.shape))
            elif name.endswith('weight') and t.ndim == 1:
                t.copy_(1 + 0.1 * torch.randn(t.shape))
    model.eval()
    torch.save({'epoch': 90, 'arch': 'resnet50', 'best_acc1': 70.0,
                'state_dict': {'module.' + k: v for k, v in model.state_dict().items()}}, path)
    return model


def test_official_pytorch_resnet50_classifier(tmp_path, capsys):
    import torch
    src = tmp_path / 'linear-r50.pth.tar'
    tmodel = _official_resnet_classifier(src)
    prefix = tmp_path / 'r50'
    rc, out, err = run_cli(['export', '--input', src, '--output', prefix, '--format', 'both', '--verify',
                            '--img-size', 64], capsys)
    assert rc == 0, err
    assert 'linear' in out.splitlines()[-1] and sorted(os.listdir(tmp_path)) == \
        ['linear-r50.pth.tar', 'r50.json', 'r50.onnx', 'r50.pdiparams']
    x = batch(2)  # 32x32: a ResNet export takes any height and width
    with torch.no_grad():
        ref = tmodel(torch.from_numpy(x)).numpy()
    assert ref.shape == (2, 5)
    assert rel(ref, inference_outputs(prefix, x)) <= 1e-5
    assert rel(ref, onnx_outputs(f'{prefix}.onnx', x)) <= 1e-4
    # ONNX only: no Paddle files
    rc, _, err = run_cli(['export', '--input', src, '--output', tmp_path / 'only', '--format', 'onnx'], capsys)
    assert rc == 0 and os.path.exists(tmp_path / 'only.onnx') and not os.path.exists(tmp_path / 'only.json'), err


# ---------------------------------------------------------------------------------------- bad inputs

def _one_line(err):
    return err.startswith('error: ') and err.count('\n') == 1 and 'Traceback' not in err


def test_bad_inputs_one_line_exit_2(runs, tmp_path, capsys):
    before = sorted(os.listdir(tmp_path))
    # a pre-training file asked as a classifier
    rc, _, err = run_cli(['export', '--input', runs['pretrain'], '--output', tmp_path / 'm', '--kind', 'linear'],
                         capsys)
    assert rc == 2 and _one_line(err) and 'holds no classifier' in err and '--kind backbone' in err, err
    # unwritable prefix: a folder that does not exist, a folder nobody may write in, a folder as prefix
    rc, _, err = run_cli(['export', '--input', runs['pretrain'], '--output', tmp_path / 'nope' / 'm'], capsys)
    assert rc == 2 and _one_line(err) and 'does not exist' in err, err
    rc, _, err = run_cli(['export', '--input', runs['pretrain'], '--output', '/proc/self/m'], capsys)
    assert rc == 2 and _one_line(err) and 'cannot write' in err, err
    rc, _, err = run_cli(['export', '--input', runs['pretrain'], '--output', tmp_path], capsys)
    assert rc == 2 and _one_line(err) and 'is a folder' in err, err
    # a truncated checkpoint
    cut = tmp_path / 'cut.pdparams'
    data = open(runs['pretrain'], 'rb').read()
    cut.write_bytes(data[:len(data) // 2])
    rc, _, err = run_cli(['export', '--input', cut, '--output', tmp_path / 'm'], capsys)
    assert rc == 2 and _one_line(err) and 'corrupt or truncated' in err, err
    assert sorted(os.listdir(tmp_path)) == sorted(before + ['cut.pdparams'])  # nothing written


class _Touch:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (pathlib.Path.touch, (pathlib.Path(self.path),))


def test_crafted_pickle_never_runs(tmp_path, capsys):
    marker = tmp_path / 'pwned'
    blob = pickle.dumps({'format': 'mocov3-paddle/1', 'kind': 'pretrain', 'x': _Touch(marker)})
    pickle.loads(blob)  # control: a plain unpickler does run it
    assert marker.exists()
    marker.unlink()
    evil = tmp_path / 'evil.pdparams'
    evil.write_bytes(blob)
    rc, _, err = run_cli(['export', '--input', evil, '--output', tmp_path / 'm', '--format', 'both'], capsys)
    assert rc == 2 and _one_line(err) and 'refused' in err, err
    assert not marker.exists() and sorted(os.listdir(tmp_path)) == ['evil.pdparams']


def test_module_entry_point_one_line(runs):
    r = subprocess.run([sys.executable, '-m', 'convert', 'export', '--input', str(runs['pretrain']), '--output',
                        str(runs['root'] / 'x'), '--kind', 'linear'], cwd=ROOT, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 2 and _one_line(r.stderr), r.stderr


# ------------------------------------------------------------------------------ nothing is installed

GUARD = textwrap.dedent('''
    import json, os, subprocess, sys
    # the libraries are imported first: importing Paddle itself runs `ldd --version` through a shell
    import onnxruntime, paddle, paddle.inference, paddle2onnx, torch  # noqa
    import convert.export, paddle_impl, torch_ref.models  # noqa
    calls = []

    def refuse(name):
        def f(*a, **k):
            calls.append([name, repr(a)[:300]])
            raise OSError(f'test: {name} refused')
        return f
    subprocess.Popen = refuse('subprocess.Popen')
    for name in ('system', 'popen', 'posix_spawn', 'posix_spawnp', 'spawnv', 'spawnve', 'spawnvp', 'execv',
                 'execve', 'execvp', 'execvpe', 'fork', 'forkpty'):
        if hasattr(os, name):
            setattr(os, name, refuse('os.' + name))
    from convert.__main__ import main
    rc = main(['export', '--input', sys.argv[1], '--output', sys.argv[2], '--format', 'both', '--verify'])
    ours = {'rc': rc, 'calls': list(calls), 'polygraphy': 'polygraphy' in sys.modules}
    calls.clear()
    # planted: paddle2onnx's default post-pass (polygraphy) asks for a pip install; caught by the same guard
    os.environ['POLYGRAPHY_INSTALL_CMD'] = 'false'  # even if a call slipped through, it would run `false`
    paddle2onnx.export(sys.argv[2] + '.json', sys.argv[2] + '.pdiparams', save_file=sys.argv[2] + '-p.onnx',
                       opset_version=17, optimize_tool='polygraphy')
    print(json.dumps({'ours': ours, 'planted': list(calls)}))
''')


def test_export_starts_no_subprocess_and_installs_nothing(runs):
    """The whole export (--format both --verify) runs with every way of starting a process refused (after the
    libraries are imported); the same guard catches paddle2onnx's own default pass asking pip for
    onnx_graphsurgeon (so the check can fail)."""
    prefix = runs['root'] / 'guarded'
    # MOCO_CPU_KERNELS=0: our CPU kernels are compiled on first use (a compiler process, by design); the
    # export itself must start nothing
    env = dict(os.environ, MOCO_CPU_KERNELS='0')
    r = subprocess.run([sys.executable, '-c', GUARD, str(runs['pretrain']), str(prefix)], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert res['ours'] == {'rc': 0, 'calls': [], 'polygraphy': False}, res
    assert any('onnx_graphsurgeon' in c[1] for c in res['planted']), res['planted']
    assert os.path.exists(f'{prefix}.onnx')


# ------------------------------------------------------------------------------------------ benchmark

def test_inference_bench_runs_every_engine():
    from bench import inference
    res = inference.run(reps=1, arch='vit_small', img_size=IMG, batches=(1, 2), vit_kwargs=TINY)
    engines = ['eager_paddle', 'paddle_inference', 'paddle_inference_onednn', 'onnxruntime', 'eager_torch']
    assert list(res['latency_ms_per_image']) == engines
    for e in engines:
        for b in ('1', '2'):
            v = res['latency_ms_per_image'][e][b]
            assert isinstance(v, float) and 0 < v < 60_000, (e, b, v)
    assert res['max_rel_diff_vs_eager_paddle'] and all(d <= 1e-4 for d in res['max_rel_diff_vs_eager_paddle'].values())
