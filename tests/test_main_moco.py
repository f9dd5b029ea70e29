"""Pre-training CLI (paddle_impl/main_moco.py): tiny runs through the command line, checkpoints, exact
resume (file and auto), bad input, NaN handling, and two CPU processes (DataParallel + CPU SyncBN) against
one process holding the whole batch.

Tiny settings: 24 generated 40x40 images in 3 classes, 32x32 input, batch 8 (3 iterations per epoch),
a ViT of width 32 / depth 1 / patch 8 and MLP dims 16/32; ResNet-50 with the same small MLP dims.
Run as a script (under paddle.distributed.launch) this file is also the worker of the SyncBN check.
"""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PY = sys.executable

TINY_VIT = ['-a', 'vit_small', '--vit-patch-size', '8', '--vit-embed-dim', '32', '--vit-depth', '1',
            '--vit-num-heads', '2', '--moco-dim', '16', '--moco-mlp-dim', '32', '--img-size', '32']
COMMON = ['-b', '8', '--epochs', '2', '--warmup-epochs', '1', '-j', '0', '-p', '1', '--seed', '0', '--moco-m-cos',
          '--crop-min', '0.2']


def _env(threads=2, **extra):
    env = dict(os.environ)
    env.pop('MOCO_DEBUG_NAN_AT_STEP', None)
    env.update(OMP_NUM_THREADS=str(threads), PYTHONPATH=REPO)
    env.update({k: str(v) for k, v in extra.items()})
    return env


def run_cli(args, timeout=240, **env_extra):
    return subprocess.run([PY, '-m', 'paddle_impl.main_moco', *args], cwd=REPO, env=_env(**env_extra),
                          capture_output=True, text=True, timeout=timeout)


def launch(nproc, script_args, log_dir, timeout=240):
    cmd = [PY, '-m', 'paddle.distributed.launch', '--nproc_per_node', str(nproc), '--log_dir', str(log_dir),
           *script_args]
    return subprocess.run(cmd, cwd=REPO, env=_env(threads=1), capture_output=True, text=True, timeout=timeout)


def load(path):
    from paddle_impl.io import load_checkpoint
    return load_checkpoint(str(path))


def steps(out_dir):
    with open(os.path.join(out_dir, 'metrics.jsonl')) as f:
        recs = [json.loads(line) for line in f if line.strip()]
    return [(r['global_step'], r['epoch'], r['iteration'], r['loss'], r['lr'], r['m'])
            for r in recs if r['type'] == 'step']


def make_images(root, classes=3, per_class=8, size=40, seed=0):
    from PIL import Image
    rng = np.random.default_rng(seed)
    for c in range(classes):
        os.makedirs(os.path.join(root, 'train', f'class{c}'), exist_ok=True)
        for k in range(per_class):
            a = (rng.random((size, size, 3)) * 160).astype(np.uint8)
            a[..., c] = 255 - a[..., c]  # a colour per class
            Image.fromarray(a).save(os.path.join(root, 'train', f'class{c}', f'{k}.png'))
    return str(root)


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
    return make_images(tmp_path_factory.mktemp('data'))


@pytest.fixture(scope='module')
def full_run(data_dir, tmp_path_factory):
    """Two epochs uninterrupted (LARS, the default optimizer): the reference of the resume tests."""
    out = tmp_path_factory.mktemp('full')
    r = run_cli([data_dir, *TINY_VIT, *COMMON, '--output-dir', str(out)])
    assert r.returncode == 0, r.stderr[-3000:]
    return str(out)


def test_run_writes_checkpoints_metrics_and_plot(full_run):
    names = sorted(os.listdir(full_run))
    for f in ('checkpoint_0000.pdparams', 'checkpoint_0001.pdparams', 'metrics.jsonl', 'curves.png', 'log.txt'):
        assert f in names
    assert not [n for n in names if n.endswith('.tmp') or n.startswith('.')], names  # nothing half-written

    ck = load(os.path.join(full_run, 'checkpoint_0001.pdparams'))
    for key in ('epoch', 'iteration', 'global_step', 'arch', 'state_dict', 'optimizer', 'scaler', 'args', 'rng'):
        assert key in ck
    assert (ck['epoch'], ck['iteration'], ck['global_step'], ck['arch']) == (2, 0, 6, 'vit_small')
    assert ck['args']['batch_size'] == 8 and ck['args']['vit_embed_dim'] == 32
    sd = ck['state_dict']
    assert not [k for k in sd if k.startswith(('module.', '_layers.'))]
    assert {k.split('.')[0] for k in sd} == {'base_encoder', 'momentum_encoder', 'predictor'}
    assert sd['base_encoder.head.0.weight'].shape == (32, 32)  # projector replaced the head
    assert 'predictor.1._variance' in sd  # BN running statistics are saved
    # LARS momentum buffers, keyed by parameter names, for trainable parameters only
    mu = ck['optimizer']['accumulators']['mu']
    assert 'base_encoder.blocks.0.attn.qkv.weight' in mu
    assert not [k for k in mu if k.startswith('momentum_encoder.')]
    assert set(ck['rng']) >= {'python', 'numpy', 'paddle_cpu'}
    ck0 = load(os.path.join(full_run, 'checkpoint_0000.pdparams'))
    assert (ck0['epoch'], ck0['iteration'], ck0['global_step']) == (1, 0, 3)

    recs = steps(full_run)
    assert [r[0] for r in recs] == [1, 2, 3, 4, 5, 6]
    lrs = [r[4] for r in recs]
    base = 0.6 * 8 / 256  # lr scaled by batch / 256; warm-up over epoch 0, then cosine
    assert lrs[0] == 0.0 and lrs[3] == pytest.approx(base) and lrs[4] < base
    ms = [r[5] for r in recs]
    assert ms[0] == pytest.approx(0.99) and all(b > a for a, b in zip(ms, ms[1:]))
    assert all(np.isfinite(r[3]) for r in recs)
    with open(os.path.join(full_run, 'curves.png'), 'rb') as f:
        assert f.read(8) == b'\x89PNG\r\n\x1a\n'
    with open(os.path.join(full_run, 'log.txt')) as f:
        log = f.read()
    assert 'ETA' in log and 'img/s' in log and 'Loss' in log


def test_resume_file_then_auto_continues_exactly(full_run, data_dir, tmp_path):
    out = str(tmp_path)
    args = [data_dir, *TINY_VIT, *COMMON, '--output-dir', out]
    r = run_cli(args + ['--max-steps', '4'])  # stops after iteration 1 of epoch 1
    assert r.returncode == 0, r.stderr[-3000:]
    ck = load(os.path.join(out, 'checkpoint_0001.pdparams'))
    assert (ck['epoch'], ck['iteration'], ck['global_step']) == (1, 1, 4)

    r = run_cli(args + ['--resume', os.path.join(out, 'checkpoint_0001.pdparams'), '--max-steps', '1'])
    assert r.returncode == 0, r.stderr[-3000:]
    assert "loaded checkpoint" in r.stdout and 'iteration 1' in r.stdout
    ck = load(os.path.join(out, 'checkpoint_0001.pdparams'))
    assert (ck['epoch'], ck['iteration'], ck['global_step']) == (1, 2, 5)

    r = run_cli(args + ['--resume', 'auto'])
    assert r.returncode == 0, r.stderr[-3000:]

    # same steps, same losses, same schedules; same final weights and optimizer state, bit for bit
    assert steps(out) == steps(full_run)
    a = load(os.path.join(full_run, 'checkpoint_0001.pdparams'))
    b = load(os.path.join(out, 'checkpoint_0001.pdparams'))
    assert (b['epoch'], b['iteration'], b['global_step']) == (2, 0, 6)
    for k, v in a['state_dict'].items():
        np.testing.assert_array_equal(v, b['state_dict'][k], err_msg=k)
    for k, v in a['optimizer']['accumulators']['mu'].items():
        np.testing.assert_array_equal(v, b['optimizer']['accumulators']['mu'][k], err_msg=k)

    # everything done: a further auto-resume has nothing to train
    r = run_cli(args + ['--resume', 'auto'])
    assert r.returncode == 0 and 'nothing to train' in r.stdout


def test_adamw_amp_save_freq_and_optimizer_mismatch(data_dir, tmp_path):
    out = str(tmp_path)
    r = run_cli([data_dir, *TINY_VIT, *COMMON, '--optimizer', 'adamw', '--lr', '1e-3', '--wd', '0.1', '--amp',
                 '--save-freq', '2', '--max-steps', '2', '--output-dir', out])
    assert r.returncode == 0, r.stderr[-3000:]
    ck = load(os.path.join(out, 'checkpoint_0000.pdparams'))
    assert (ck['epoch'], ck['iteration']) == (0, 2)
    assert {'moment1', 'moment2', 'beta1_pow_acc', 'beta2_pow_acc'} <= set(ck['optimizer']['accumulators'])
    r = run_cli([data_dir, *TINY_VIT, *COMMON, '--resume', 'auto', '--output-dir', out])  # LARS now
    assert r.returncode == 2
    assert r.stderr.strip().startswith('error:') and 'adamw' in r.stderr.lower()


def test_resnet50_step_and_checkpoint(data_dir, tmp_path):
    r = run_cli([data_dir, '-a', 'resnet50', '--moco-dim', '16', '--moco-mlp-dim', '32', '--img-size', '32',
                 '-b', '8', '--epochs', '1', '-j', '0', '--seed', '0', '--crop-min', '0.2', '--max-steps', '1',
                 '--output-dir', str(tmp_path)])
    assert r.returncode == 0, r.stderr[-3000:]
    ck = load(tmp_path / 'checkpoint_0000.pdparams')
    assert ck['arch'] == 'resnet50' and (ck['epoch'], ck['iteration']) == (0, 1)
    sd = ck['state_dict']
    assert sd['base_encoder.fc.0.weight'].shape == (2048, 32) and 'base_encoder.layer1.0.bn1._mean' in sd
    assert 'predictor.3.weight' in sd and 'predictor.4._mean' not in sd  # ResNet predictor: no last BN


def test_nan_loss_stops_without_saving(data_dir, tmp_path):
    out = str(tmp_path)
    r = run_cli([data_dir, *TINY_VIT, *COMMON, '--save-freq', '1', '--output-dir', out],
                MOCO_DEBUG_NAN_AT_STEP=5)
    assert r.returncode == 3
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith('error: loss is nan'), r.stderr[-2000:]
    assert 'epoch 1' in lines[0] and 'iteration 2/3' in lines[0] and 'global step 5' in lines[0]
    assert 'checkpoint_0001.pdparams' in lines[0]
    ck = load(os.path.join(out, 'checkpoint_0001.pdparams'))  # the last good one: after step 4
    assert (ck['epoch'], ck['iteration'], ck['global_step']) == (1, 1, 4)
    assert all(np.isfinite(v).all() for v in ck['state_dict'].values())
    assert [s[0] for s in steps(out)] == [1, 2, 3, 4]
    assert not [n for n in os.listdir(out) if n.endswith('.tmp')]


def test_cli_error_is_one_line(tmp_path):
    r = run_cli([str(tmp_path / 'missing'), '-a', 'vit_small'])
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [
        f'error: data folder {tmp_path / "missing"} does not exist: expected '
        f'{tmp_path / "missing"}/train/<class>/<images>']


def _bad_cases(data_dir, full_run, tmp):
    os.makedirs(os.path.join(tmp, 'notrain', 'val'), exist_ok=True)
    empty_class = make_images(os.path.join(tmp, 'emptyclass'), classes=2, per_class=2)
    os.makedirs(os.path.join(empty_class, 'train', 'zzz_empty'))
    with open(os.path.join(tmp, 'afile'), 'w') as f:
        f.write('x')
    ck = os.path.join(full_run, 'checkpoint_0000.pdparams')
    tiny = [*TINY_VIT, '-b', '8', '--epochs', '1', '-j', '0']
    return {
        'data missing': ([os.path.join(tmp, 'nope'), *tiny], 'does not exist'),
        'no train folder': ([os.path.join(tmp, 'notrain'), *tiny], 'no train/ sub-folder'),
        'class without images': ([empty_class, *tiny], 'without any image'),
        'batch larger than data': ([data_dir, *tiny[:-6], '-b', '32', '--epochs', '1', '-j', '0'],
                                   'larger than the data set'),
        'resume missing': ([data_dir, *tiny, '--resume', os.path.join(tmp, 'nope.pdparams')], 'no such file'),
        'resume other arch': ([data_dir, '-a', 'resnet50', '--img-size', '32', '-b', '8', '--resume', ck],
                              'arch vit_small'),
        'resume not a checkpoint': ([data_dir, *tiny, '--resume', os.path.join(tmp, 'afile')], 'afile'),
        'output parent missing': ([data_dir, *tiny, '--output-dir', os.path.join(tmp, 'no', 'out')],
                                  'parent folder'),
        'output is a file': ([data_dir, *tiny, '--output-dir', os.path.join(tmp, 'afile')], 'not a folder'),
        'bad arch': ([data_dir, '-a', 'vit_tiny'], 'known: vit_small'),
        'vit flags on resnet': ([data_dir, '-a', 'resnet50', '--vit-depth', '2'], 'ViT archs only'),
        'img size vs patch': ([data_dir, '-a', 'vit_small', '--img-size', '30', '-b', '8', '-j', '0'],
                              'multiple of the patch size'),
    }


CASES = ['data missing', 'no train folder', 'class without images', 'batch larger than data', 'resume missing',
         'resume other arch', 'resume not a checkpoint', 'output parent missing', 'output is a file', 'bad arch',
         'vit flags on resnet', 'img size vs patch']


@pytest.mark.parametrize('case', CASES)
def test_bad_input_one_line_error(case, data_dir, full_run, tmp_path, capsys, monkeypatch):
    from paddle_impl import main_moco
    monkeypatch.chdir(tmp_path)  # the default --output-dir '.'
    argv, expect = _bad_cases(data_dir, full_run, str(tmp_path))[case]
    code = main_moco.main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and err[0].startswith('error: '), err
    assert expect in err[0], err[0]


def test_batch_smaller_than_world(data_dir, tmp_path, capsys, monkeypatch):
    from paddle_impl import main_moco, utils
    monkeypatch.setattr(utils, 'init_distributed', lambda: (0, 2))
    code = main_moco.main([data_dir, *TINY_VIT, '-b', '1', '-j', '0', '--output-dir', str(tmp_path)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and 'smaller than the number of processes (2)' in err[0], err


def test_two_cpu_processes_match_one(full_run, data_dir, tmp_path):
    """DataParallel + gathered keys + synchronised BN: two processes with 4 images each take the same
    steps as one process with all 8 (same global batches, same augmentations)."""
    out = tmp_path / 'out'
    r = launch(2, ['paddle_impl/main_moco.py', data_dir, *TINY_VIT, *COMMON, '--max-steps', '3',
                   '--output-dir', str(out)], tmp_path / 'log')
    logs = ''.join(open(p).read()[-2000:] for p in sorted((tmp_path / 'log').glob('workerlog.*')))
    assert r.returncode == 0, logs
    two = steps(out)
    one = steps(full_run)[:3]
    assert [s[:3] for s in two] == [s[:3] for s in one]
    np.testing.assert_allclose([s[3] for s in two], [s[3] for s in one], rtol=2e-6)
    ck = load(out / 'checkpoint_0000.pdparams')
    assert ck['world_size'] == 2 and (ck['epoch'], ck['iteration']) == (1, 0)
    ref = load(os.path.join(full_run, 'checkpoint_0000.pdparams'))
    for k, v in ref['state_dict'].items():
        np.testing.assert_allclose(ck['state_dict'][k], v, rtol=1e-4, atol=1e-6, err_msg=k)


def test_cpu_syncbn_equals_global_batch_bn(tmp_path):
    """utils.convert_sync_batchnorm on 2 CPU processes (float64): outputs, input gradients, parameter
    gradients (summed over ranks) and running statistics equal one BN over the whole batch."""
    res = tmp_path / 'syncbn.json'
    r = launch(2, ['tests/test_main_moco.py', '--syncbn-worker', str(res)], tmp_path / 'log')
    logs = ''.join(open(p).read()[-3000:] for p in sorted((tmp_path / 'log').glob('workerlog.*')))
    assert r.returncode == 0 and res.exists(), logs
    with open(res) as f:
        result = json.load(f)
    for name, errs in result.items():
        for what, err in errs.items():
            if what == 'unsynced_output_diff':
                assert err > 1e-3, (name, what, err)  # the check would see a BN that is not synchronised
            else:
                assert err < 1e-12, (name, what, err)


# ------------------------------------------------------------------------------- SyncBN worker (script)

def _syncbn_worker(out_path):
    sys.path.insert(0, REPO)
    import paddle_impl  # noqa: F401
    import paddle
    import paddle.distributed as dist
    from paddle_impl import utils
    from paddle_impl.layers import BatchNorm1D, BatchNorm2D

    dist.init_parallel_env()
    rank, world = dist.get_rank(), dist.get_world_size()
    paddle.set_default_dtype('float64')
    results = {}
    for name, make, shape in (('bn1d', lambda: BatchNorm1D(5), [8, 5]),
                              ('bn1d_noaffine', lambda: BatchNorm1D(5, affine=False), [8, 5]),
                              ('bn2d', lambda: BatchNorm2D(4), [8, 4, 3, 3])):
        rng = np.random.default_rng(1)
        x = rng.standard_normal(shape) * 3 + 1
        gy = rng.standard_normal(shape)
        ref, sync, local = make(), make(), make()
        if ref.weight is not None:
            w, b = rng.standard_normal(shape[1]), rng.standard_normal(shape[1])
            for layer in (ref, sync, local):
                layer.weight.set_value(w)
                layer.bias.set_value(b)
        utils.convert_sync_batchnorm(sync)
        n = shape[0] // world
        sl = slice(rank * n, (rank + 1) * n)

        xr = paddle.to_tensor(x, stop_gradient=False)
        (ref(xr) * paddle.to_tensor(gy)).sum().backward()  # one BN over the whole batch
        xs = paddle.to_tensor(x[sl], stop_gradient=False)
        ys = sync(xs)  # this rank's part, statistics shared
        (ys * paddle.to_tensor(gy[sl])).sum().backward()
        yl = local(paddle.to_tensor(x[sl]))  # this rank's part alone

        # the global-batch BN output from its definition (biased variance, eps 1e-5)
        axes = tuple([0] + list(range(2, len(shape))))
        y_full = (x - x.mean(axis=axes, keepdims=True)) / np.sqrt(x.var(axis=axes, keepdims=True) + 1e-5)
        if ref.weight is not None:
            bshape = [1, shape[1]] + [1] * (len(shape) - 2)
            y_full = y_full * ref.weight.numpy().reshape(bshape) + ref.bias.numpy().reshape(bshape)
        errs = {
            'output': float(np.abs(ys.numpy() - y_full[sl]).max()),
            'input_grad': float(np.abs(xs.grad.numpy() - xr.grad.numpy()[sl]).max()),
            'running_mean': float(np.abs(sync._mean.numpy() - ref._mean.numpy()).max()),
            'running_var': float(np.abs(sync._variance.numpy() - ref._variance.numpy()).max()),
            'unsynced_output_diff': float(np.abs(yl.numpy() - y_full[sl]).max()),
        }
        if ref.weight is not None:
            for pname in ('weight', 'bias'):
                g = getattr(sync, pname).grad.clone()
                dist.all_reduce(g)
                errs[f'{pname}_grad'] = float(np.abs(g.numpy() - getattr(ref, pname).grad.numpy()).max())
        results[name] = errs
    if rank == 0:
        with open(out_path, 'w') as f:
            json.dump(results, f, indent=1)


if __name__ == '__main__':
    if len(sys.argv) == 3 and sys.argv[1] == '--syncbn-worker':
        _syncbn_worker(sys.argv[2])
    else:
        sys.exit('usage: test_main_moco.py --syncbn-worker OUT.json (under paddle.distributed.launch)')
