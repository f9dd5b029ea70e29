"""Checkpoint conversion torch <-> Paddle (convert/checkpoints.py, python -m convert).

Checkpoints are written by torch_ref in exactly the official layouts (main_moco, main_lincls,
convert_to_deit), at img_size 32 with small MoCo heads (dim 16, mlp_dim 32); the encoders keep their full
width and depth, so arch detection is the real one. vit_large / vit_huge are checked on torch meta-device
models (exact shapes, no memory); set MOCO_TEST_BIG=1 to also convert a real vit_large.
"""
import os
import pathlib
import pickle
import shutil
import subprocess
import sys

import numpy as np
import paddle
import pytest
import torch

from convert import checkpoints as C
from convert.__main__ import main as cli
from paddle_impl import io as pio
from torch_ref import models as tm

IMG, DIM, MLP = 32, 16, 32
ROOT = pathlib.Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------ official-layout writers

def _prefixed(sd):
    return {'module.' + k: v for k, v in sd.items()}


def quick_build(fn, seed=0):
    """``fn()`` (a torch_ref model) built on the meta device, then given random weights of a sensible scale:
    the official structure and names without the slow init of a full-width encoder on 2 cores (the values do
    not matter to a conversion test; every tensor differs, BN statistics included)."""
    with torch.device('meta'):
        model = fn()
    model = model.to_empty(device='cpu')
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in list(model.named_parameters()) + list(model.named_buffers()):
            if name.endswith('num_batches_tracked'):
                t.fill_(3)
            elif name.endswith('running_var'):
                t.copy_(torch.rand(t.shape, generator=g) + 0.5)
            elif t.ndim == 1 and name.endswith('weight'):
                t.copy_(1 + 0.1 * torch.randn(t.shape, generator=g))
            elif t.ndim <= 1 or name.endswith(('cls_token', 'pos_embed')):
                t.copy_(0.1 * torch.randn(t.shape, generator=g))
            else:
                t.copy_(torch.randn(t.shape, generator=g) / float(np.prod(t.shape[1:])) ** 0.5)
    return model


def write_pretrain(arch, path, seed=0):
    """main_moco's checkpoint after one real training step (AdamW, GradScaler)."""
    torch.manual_seed(seed)
    model = quick_build(lambda: tm.build_moco(arch, dim=DIM, mlp_dim=MLP, T=0.2, img_size=IMG), seed)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)
    scaler = torch.amp.GradScaler('cpu')
    x1, x2 = torch.randn(4, 3, IMG, IMG), torch.randn(4, 3, IMG, IMG)
    loss = model(x1, x2, 0.99)
    scaler.scale(loss).backward()
    scaler.step(opt)
    scaler.update()
    torch.save({'epoch': 5, 'arch': arch, 'state_dict': _prefixed(model.state_dict()),
                'optimizer': opt.state_dict(), 'scaler': scaler.state_dict()}, path)
    return model.eval()


def write_linear(arch, path, num_classes=10, seed=0):
    """main_lincls's checkpoint: classifier only trained (SGD momentum), model in eval mode."""
    torch.manual_seed(seed)
    model = quick_build(lambda: tm.encoder_factory(arch, img_size=IMG)(num_classes=num_classes), seed)
    head = 'fc' if arch == 'resnet50' else 'head'
    for name, p in model.named_parameters():
        p.requires_grad = name.startswith(head + '.')
    params = [p for p in model.parameters() if p.requires_grad]
    assert len(params) == 2
    opt = torch.optim.SGD(params, lr=0.1, momentum=0.9, weight_decay=0.)
    model.eval()
    torch.nn.functional.cross_entropy(model(torch.randn(2, 3, IMG, IMG)), torch.tensor([1, 2])).backward()
    opt.step()
    torch.save({'epoch': 90, 'arch': arch, 'state_dict': _prefixed(model.state_dict()),
                'best_acc1': torch.tensor(12.5), 'optimizer': opt.state_dict()}, path)
    return model


def official_deit(pretrain_path, out_path):
    """moco-v3 convert_to_deit.py: module.base_encoder.* minus the head, prefix stripped, {'model': sd}."""
    sd = torch.load(pretrain_path, map_location='cpu', weights_only=True)['state_dict']
    head = 'module.base_encoder.fc' if any('base_encoder.fc' in k for k in sd) else 'module.base_encoder.head'
    out = {k[len('module.base_encoder.'):]: v for k, v in sd.items()
           if k.startswith('module.base_encoder') and not k.startswith(head)}
    torch.save({'model': out}, out_path)


def assert_same(a, b, path=''):
    """Bitwise equality of two torch.load results (tensors: dtype, shape, values; containers: keys, order)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape, path
        assert torch.equal(a, b), path
    elif isinstance(a, dict):
        assert isinstance(b, dict) and list(a) == list(b), (path, list(a)[:4], list(b)[:4])
        for k in a:
            assert_same(a[k], b[k], f'{path}/{k}')
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f'{path}[{i}]')
    else:
        assert type(a) is type(b) and a == b, (path, a, b)


def tload(p):
    return torch.load(p, map_location='cpu', weights_only=True)


def quiet(*_):
    pass


# --------------------------------------------------------------------------------------------- fixtures

@pytest.fixture(scope='module')
def work(tmp_path_factory):
    d = tmp_path_factory.mktemp('convert')
    yield d
    _made.clear()
    shutil.rmtree(d, ignore_errors=True)  # the official inputs: ~4 GB of full-width checkpoints


@pytest.fixture(autouse=True)
def _drop_outputs(request):
    """What a test writes into the module's folder goes when the test ends (the official inputs stay): kept, the
    outputs of this module alone would fill ~9 GB of the disk CI shares."""
    if 'work' not in request.fixturenames:
        yield
        return
    work = request.getfixturevalue('work')
    before = set(os.listdir(work))
    yield
    inputs = {p.name for p, _ in _made.values()}
    for name in set(os.listdir(work)) - before - inputs:
        path = work / name
        shutil.rmtree(path) if path.is_dir() else path.unlink()


_made = {}


def official(work, kind, arch):
    """(path, torch model) of an official-layout file, written once per module."""
    key = (kind, arch)
    if key not in _made:
        p = work / f'{kind}-{arch}.pth.tar'
        if kind == 'pretrain':
            _made[key] = (p, write_pretrain(arch, p))
        elif kind == 'linear':
            _made[key] = (p, write_linear(arch, p))
        else:  # deit, from the pretrain file; its reference model is loaded from it by plain torch
            src, _ = official(work, 'pretrain', arch)
            official_deit(src, p)
            enc = quick_build(lambda: tm.encoder_factory(arch, img_size=IMG)(num_classes=0))
            enc.load_state_dict(tload(p)['model'], strict=True)
            _made[key] = (p, enc)
    return _made[key]


def release_model(kind, arch):
    """Forget a cached torch model (paths stay): full-width encoders are large."""
    p, _ = _made[(kind, arch)]
    _made[(kind, arch)] = (p, None)


def paddle_features_f64(paddle_file, kind, x):
    """Load our .pdparams (safe loader) into a float64 Paddle model and run ``x``."""
    ck = C.read_checkpoint(paddle_file)
    assert ck.framework == 'paddle' and ck.kind == kind
    pmodel = C.paddle_model(ck, 'float64')
    return C.model_outputs(pmodel, kind, x)


def torch_features_f64(model, kind, x):
    m = model.double().eval()  # in place: the cached model is released after its test
    return C.model_outputs(m, kind, x)


# ------------------------------------------------------------------------------------ round trips

CASES = [('pretrain', 'vit_small'), ('pretrain', 'vit_conv_small'), ('pretrain', 'resnet50'),
         ('linear', 'vit_base'), ('linear', 'vit_conv_base'), ('linear', 'resnet50'), ('deit', 'vit_small')]


@pytest.mark.parametrize('kind,arch', CASES, ids=[f'{k}-{a}' for k, a in CASES])
def test_roundtrip_exact_and_features(work, kind, arch):
    src, model = official(work, kind, arch)
    pd_file = work / f'{kind}-{arch}.pdparams'
    back = work / f'{kind}-{arch}.back.pth.tar'
    lines = []
    ck = C.torch2paddle(src, pd_file, log=lines.append)
    assert (ck.kind, ck.arch) == (kind, arch) and ck.img_size == (None if arch == 'resnet50' else IMG)
    if kind == 'pretrain':
        assert (ck.dim, ck.mlp_dim) == (DIM, MLP) and any('optimizer: converted' in s for s in lines)
    raw = pio.load_checkpoint(pd_file)  # our safe format
    if kind in ('pretrain', 'linear'):
        assert raw['format'] == C.FORMAT and raw['arch'] == arch and int(raw['epoch']) in (5, 90)
        assert not any(k.startswith('module.') or k.endswith(('running_mean', 'num_batches_tracked'))
                       for k in raw['state_dict'])
    C.paddle2torch(pd_file, back, log=quiet)
    assert_same(tload(src), tload(back))  # bitwise, incl. optimizer, scaler, num_batches_tracked, key order

    # the converted model computes what the original does (float64: only rounding noise may differ)
    x = np.random.default_rng(1).standard_normal((2, 3, IMG, IMG))
    ref = torch_features_f64(model, kind, x)
    got = paddle_features_f64(pd_file, kind, x)
    release_model(kind, arch)
    for name, (d, rel) in C.relative_differences(ref, got).items():
        assert rel < 1e-10, (name, d, rel)


def test_paddle_layout_matches_real_paddle_models(work):
    """The expected-shape tables (torch layout + key map) equal the state dicts of real paddle_impl models."""
    for kind, arch in [('pretrain', 'vit_small'), ('pretrain', 'resnet50'), ('linear', 'vit_conv_small')]:
        ck = C.Checkpoint(path='-', kind=kind, arch=arch, img_size=IMG, dim=DIM, mlp_dim=MLP, num_classes=10)
        spec = C.torch_shapes_to_paddle(C.expected_shapes(kind, arch, IMG, DIM, MLP, 10))
        if kind == 'pretrain':
            from paddle_impl import models as pm
            m = pm.build_moco(arch, dim=DIM, mlp_dim=MLP, img_size=IMG)
        else:
            from paddle_impl import models as pm
            m = pm.encoder_factory(arch, img_size=IMG)(num_classes=10)
        real = {k: tuple(v.shape) for k, v in m.state_dict().items()}
        assert real == spec, (kind, arch, set(real) ^ set(spec))
        del ck, m


def _meta_model(kind, arch, img):
    with torch.device('meta'):
        if kind == 'pretrain':
            return tm.build_moco(arch, dim=DIM, mlp_dim=MLP, img_size=img)
        return tm.encoder_factory(arch, img_size=img)(num_classes=(1000 if kind == 'linear' else 0))


def _fake(shape, dtype=np.float32):
    return np.broadcast_to(np.zeros((), dtype), shape)  # right shape, no memory


@pytest.mark.parametrize('arch', tm.ARCHS)
def test_detection_every_arch(arch):
    """Kind, arch, image size and head dims come from key names and shapes, for every arch (large/huge on
    torch meta-device models: the real code's shapes without the memory)."""
    img = 28 if arch == 'vit_huge' else IMG
    for kind in ('pretrain', 'linear', 'backbone'):
        m = _meta_model(kind, arch, img)
        real = {k: tuple(v.shape) for k, v in m.state_dict().items()}
        if kind == 'backbone' and arch == 'resnet50':
            real = {k: v for k, v in real.items() if not k.startswith('fc.')}
        spec = C.expected_shapes(kind, arch, img, DIM, MLP, 1000)
        assert list(spec.items()) == list(real.items()), (kind, arch)  # same keys, order and shapes
        sd = {k: _fake(s, np.int64 if k.endswith('num_batches_tracked') else np.float32) for k, s in real.items()}
        obj = ({'epoch': 1, 'arch': arch, 'state_dict': _prefixed(sd), 'optimizer': {}} if kind != 'backbone'
               else sd)
        ck = C.from_object(obj, f'{kind}-{arch}')
        assert (ck.kind, ck.arch) == (kind, arch)
        assert ck.img_size == (None if arch == 'resnet50' else img)
        if kind == 'pretrain':
            assert (ck.dim, ck.mlp_dim) == (DIM, MLP)
        if kind == 'linear':
            assert ck.num_classes == 1000
        if arch in ('vit_large', 'vit_huge') or kind == 'backbone':
            continue
        # a file of this arch named as another arch: a clear line
        other = 'vit_base' if arch != 'vit_base' else 'vit_small'
        with pytest.raises(pio.CheckpointError, match=f'holds a {arch}, not a {other}'):
            C.from_object(obj, 'f', arch=other)


@pytest.mark.skipif(not os.environ.get('MOCO_TEST_BIG'), reason='set MOCO_TEST_BIG=1 (builds vit_large, ~1 min)')
def test_vit_large_linear_real(work):
    src, model = official(work, 'linear', 'vit_large')
    out = work / 'large.pdparams'
    C.torch2paddle(src, out, verify=True, log=print)
    C.paddle2torch(out, work / 'large.back.pth', log=quiet)
    assert_same(tload(src), tload(work / 'large.back.pth'))


# ---------------------------------------------------------------------------- other paths through


def _verified(argv, capsys, n):
    assert cli([str(a) for a in argv] + ['--verify']) == 0
    printed = capsys.readouterr().out
    rels = [float(l.split('relative ')[1].split(',')[0]) for l in printed.splitlines() if l.startswith('verify:')]
    assert len(rels) == n and max(rels) < 1e-4, printed
    return max(rels)


def test_verify_float32_cli(work, capsys):
    """--verify: one random batch through torch and Paddle (float32), both directions."""
    src, _ = official(work, 'pretrain', 'vit_small')
    _verified(['torch2paddle', '--input', src, '--output', work / 'verified.pdparams'], capsys, 2)
    deit, _ = official(work, 'deit', 'vit_small')
    pd = work / 'verified-deit.pdparams'
    C.torch2paddle(deit, pd, log=quiet)
    _verified(['paddle2torch', '--input', pd, '--output', work / 'verified-deit.pth'], capsys, 1)
    assert_same(tload(deit), tload(work / 'verified-deit.pth'))


def test_verify_failure_keeps_nothing(work, capsys, monkeypatch):
    src, _ = official(work, 'linear', 'resnet50')
    out = work / 'broken.pdparams'
    real = C.build_output

    def broken(ck, fw):
        obj, notes = real(ck, fw)
        w = obj['state_dict']['fc.weight']
        obj['state_dict']['fc.weight'] = w + 1.0
        return obj, notes
    monkeypatch.setattr(C, 'build_output', broken)
    rc = cli(['torch2paddle', '--input', str(src), '--output', str(out), '--verify', '--img-size', '32'])
    err = capsys.readouterr().err
    assert rc == 1 and err.startswith('error: verification failed') and err.count('\n') == 1
    assert not out.exists() and not [p for p in os.listdir(work) if p.startswith('.broken')]


def test_extract_matches_convert_to_deit(work):
    src, model = official(work, 'pretrain', 'vit_small')
    deit_official, _ = official(work, 'deit', 'vit_small')
    mine = work / 'extract.pth'
    C.extract(src, mine, log=quiet)
    assert_same(tload(deit_official), tload(mine))
    # from the Paddle pretrain file too, into Paddle and back
    pd_pre = work / 'pretrain-vit_small.pdparams'
    if not pd_pre.exists():
        C.torch2paddle(src, pd_pre, log=quiet)
    pd_bb = work / 'extract.pdparams'
    bb = C.extract(pd_pre, pd_bb, log=quiet)
    assert bb.kind == 'deit' and pio.load_checkpoint(pd_bb)['kind'] == 'deit'
    C.paddle2torch(pd_bb, work / 'extract.back.pth', log=quiet)
    assert_same(tload(deit_official), tload(work / 'extract.back.pth'))
    sd, ck = C.load_backbone(src)
    assert ck.kind == 'deit' and 'head.weight' not in sd and sd['blocks.0.attn.qkv.weight'].shape == (384, 1152)


def test_safetensors_both_ways(work):
    src, _ = official(work, 'pretrain', 'resnet50')
    st = work / 'r50.safetensors'
    lines = []
    C.torch2paddle(src, st, log=lines.append)
    assert any('optimizer: dropped' in s for s in lines)
    tensors, meta = pio.load_safetensors(st)
    assert meta['framework'] == 'paddle' and meta['kind'] == 'pretrain' and meta['arch'] == 'resnet50'
    assert 'base_encoder.bn1._mean' in tensors
    back = work / 'r50.back.pth.tar'
    C.paddle2torch(st, back, log=quiet)
    a, b = tload(src), tload(back)
    assert_same(a['state_dict'], b['state_dict'])  # num_batches_tracked kept through metadata
    assert a['epoch'] == b['epoch'] and 'optimizer' not in b
    st2 = work / 'r50.torch.safetensors'
    C.paddle2torch(work / 'r50.safetensors', st2, log=quiet)
    assert pio.load_safetensors(st2)[1]['framework'] == 'torch'


def test_paddle_native_checkpoint(work):
    """A checkpoint a Paddle trainer writes with paddle.save (tensors, Paddle's optimizer state)."""
    from paddle_impl import models as pm
    paddle.seed(0)
    m = pm.build_moco('vit_small', dim=DIM, mlp_dim=MLP, img_size=IMG)
    opt = paddle.optimizer.AdamW(parameters=m.parameters())
    f = work / 'native.pdparams'
    paddle.save({'epoch': 2, 'arch': 'vit_small', 'state_dict': m.state_dict(), 'optimizer': opt.state_dict()},
                str(f))
    lines = []
    out = work / 'native.pth.tar'
    C.paddle2torch(f, out, log=lines.append)
    assert any(s.startswith('optimizer:') and 'dropped' in s for s in lines)
    t = tload(out)
    assert list(t) == ['epoch', 'arch', 'state_dict'] and t['epoch'] == 2
    w = t['state_dict']['module.base_encoder.blocks.0.attn.qkv.weight'].numpy()
    assert np.array_equal(w, m.base_encoder.blocks[0].attn.qkv.weight.numpy().T)
    assert int(t['state_dict']['module.predictor.1.num_batches_tracked']) == 0


# ------------------------------------------------------------------------------------------ bad inputs

def _run(argv, capsys):
    rc = cli([str(a) for a in argv])
    cap = capsys.readouterr()
    return rc, cap.err


def _one_error_line(err):
    return err.startswith('error: ') and err.count('\n') == 1 and 'Traceback' not in err


def test_bad_inputs_clear_errors(work, tmp_path, capsys):
    pre, _ = official(work, 'pretrain', 'vit_small')
    lin, _ = official(work, 'linear', 'resnet50')
    rnd = tmp_path / 'random.pth.tar'
    rnd.write_bytes(np.random.default_rng(0).bytes(100_000))
    cut = tmp_path / 'cut.pth.tar'
    cut.write_bytes(lin.read_bytes()[: lin.stat().st_size // 3])
    out = tmp_path / 'out.pdparams'
    cases = [
        (['torch2paddle', '--input', rnd, '--output', out], 'is not a'),
        (['torch2paddle', '--input', cut, '--output', out], 'corrupt or truncated'),
        (['torch2paddle', '--input', pre, '--output', out, '--arch', 'vit_base'], 'holds a vit_small, not a vit_base'),
        (['torch2paddle', '--input', pre, '--output', out, '--arch', 'vit_tiny'], 'unknown --arch'),
        (['torch2paddle', '--input', lin, '--output', out, '--kind', 'pretrain'],
         'is a linear-classification (classifier) checkpoint, not a MoCo pre-training one'),
        (['torch2paddle', '--input', pre, '--output', out, '--kind', 'linear'],
         'is a MoCo pre-training checkpoint, not a linear-classification'),
        (['extract', '--input', lin, '--output', tmp_path / 'bb.pth'], 'extracting a backbone needs a MoCo pre'),
        (['torch2paddle', '--input', pre, '--output', tmp_path / 'no' / 'such' / 'x.pdparams'], 'does not exist'),
        (['torch2paddle', '--input', pre, '--output', out, '--img-size', '224'], 'not 224'),
        (['torch2paddle', '--input', pre, '--output', tmp_path / 'x.pth'], 'PyTorch file name'),
        (['paddle2torch', '--input', pre, '--output', tmp_path / 'x.pth'], 'already a PyTorch checkpoint'),
        (['torch2paddle', '--input', tmp_path / 'missing.pth', '--output', out], 'does not exist'),
    ]
    for argv, msg in cases:
        rc, err = _run(argv, capsys)
        assert rc == 2 and _one_error_line(err) and msg in err, (argv, err)
    assert sorted(os.listdir(tmp_path)) == ['cut.pth.tar', 'random.pth.tar']  # no output, no temporaries


def test_crafted_pickles_never_run(work, tmp_path, capsys):
    class Evil:
        def __reduce__(self):
            return (pathlib.Path.touch, (tmp_path / 'MARKER',))
    sd = {'module.w': torch.ones(2)}
    evil_pth = tmp_path / 'evil.pth.tar'
    torch.save({'epoch': 1, 'state_dict': sd, 'x': Evil()}, evil_pth)
    evil_raw = tmp_path / 'evil-raw.pth.tar'
    evil_raw.write_bytes(pickle.dumps(Evil(), protocol=2))
    evil_pd = tmp_path / 'evil.pdparams'
    evil_pd.write_bytes(pickle.dumps({'state_dict': {'w': np.ones(2)}, 'x': Evil()}, protocol=4))
    for f in (evil_pth, evil_raw, evil_pd):
        for cmd, out in (('torch2paddle', 'o.pdparams'), ('paddle2torch', 'o.pth'), ('extract', 'o.pth')):
            rc, err = _run([cmd, '--input', f, '--output', tmp_path / out], capsys)
            assert rc == 2 and _one_error_line(err) and 'refused' in err, (f, cmd, err)
        rc, err = _run(['inspect', f], capsys)
        assert rc == 2 and 'refused' in err
        with pytest.raises(pio.CheckpointError, match='refused'):
            C.read_checkpoint(f)
    assert not (tmp_path / 'MARKER').exists()
    assert sorted(os.listdir(tmp_path)) == ['evil-raw.pth.tar', 'evil.pdparams', 'evil.pth.tar']


def test_module_entry_point_one_line(tmp_path):
    rnd = tmp_path / 'junk.pth.tar'
    rnd.write_bytes(b'\x00' * 100)
    r = subprocess.run([sys.executable, '-m', 'convert', 'torch2paddle', '--input', str(rnd), '--output',
                        str(tmp_path / 'o.pdparams')], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and _one_error_line(r.stderr), r.stderr
    assert not (tmp_path / 'o.pdparams').exists()


def test_optimizer_interop_with_paddle_trainer(work):
    """torch AdamW state -> our .pdparams -> the Paddle trainer's optimizer (utils.load_optimizer_state); and
    the Paddle trainer's own checkpoint (utils.optimizer_state) -> a torch optimizer that loads it."""
    from paddle_impl import utils
    from paddle_impl import models as pm
    from paddle_impl.layers import model_parameters
    from paddle_impl.optimizer import build_optimizer
    src, _ = official(work, 'pretrain', 'vit_small')
    pd = work / 'interop.pdparams'
    C.torch2paddle(src, pd, log=quiet)
    ck = pio.load_checkpoint(pd)
    t = tload(src)
    m = pm.build_moco('vit_small', dim=DIM, mlp_dim=MLP, img_size=IMG)
    m.set_state_dict(ck['state_dict'])
    opt = build_optimizer('adamw', model_parameters(m), 1e-3, 0.1)
    utils.load_optimizer_state(opt, m, ck['optimizer'])
    names = [k for k in t['state_dict'] if not k.endswith(('running_mean', 'running_var', 'num_batches_tracked'))]
    i = names.index('module.base_encoder.blocks.3.mlp.fc1.weight')
    p = dict(m.named_parameters())['base_encoder.blocks.3.mlp.fc1.weight']
    assert np.array_equal(opt._accumulators['moment2'][p.name].numpy(), t['optimizer']['state'][i]['exp_avg_sq'].numpy().T)
    assert np.allclose(opt._accumulators['beta1_pow_acc'][p.name].numpy(), 0.9 ** 2)

    # a checkpoint as paddle_impl.main_moco writes it -> official torch layout -> torch.optim.AdamW loads it
    native = work / 'trainer.pdparams'
    pio.save_checkpoint({'format': 'x', 'epoch': 1, 'iteration': 0, 'global_step': 1, 'arch': 'vit_small',
                         'state_dict': m.state_dict(), 'optimizer': utils.optimizer_state(opt, m), 'scaler': {},
                         'args': {'weight_decay': 0.1, 'momentum': 0.9}, 'rng': {'python': (3, (1, 2), None)}},
                        native)
    lines = []
    out = work / 'trainer.pth.tar'
    C.paddle2torch(native, out, log=lines.append)
    assert any('optimizer: converted' in s for s in lines) and any('not written' in s and 'rng' in s for s in lines)
    back = tload(out)
    assert list(back) == ['epoch', 'arch', 'state_dict', 'optimizer', 'scaler']
    tmodel = quick_build(lambda: tm.build_moco('vit_small', dim=DIM, mlp_dim=MLP, img_size=IMG))
    topt = torch.optim.AdamW(tmodel.parameters(), lr=1e-3, weight_decay=0.1)
    topt.load_state_dict(back['optimizer'])
    torch.amp.GradScaler('cpu').load_state_dict(back['scaler'])
    for k in ('exp_avg', 'exp_avg_sq', 'step'):
        assert torch.equal(back['optimizer']['state'][i][k], t['optimizer']['state'][i][k]), k
    assert set(back['optimizer']['state']) == set(t['optimizer']['state'])
    g0, g1 = back['optimizer']['param_groups'][0], t['optimizer']['param_groups'][0]
    assert {k: g0[k] for k in ('lr', 'betas', 'eps', 'weight_decay', 'params')} == \
           {k: g1[k] for k in ('lr', 'betas', 'eps', 'weight_decay', 'params')}


def test_legacy_torch_file_through_torch(work, tmp_path):
    """A pre-1.6 torch file: numpy alone cannot read it; with torch installed the converter uses
    torch.load(weights_only=True)."""
    deit, _ = official(work, 'deit', 'vit_small')
    old = tmp_path / 'old.pth'
    torch.save(tload(deit), old, _use_new_zipfile_serialization=False)
    with pytest.raises(pio.CheckpointError, match='legacy'):
        pio.load_torch_file_safe(old)
    ck = C.read_checkpoint(old)
    assert (ck.kind, ck.arch, ck.img_size) == ('deit', 'vit_small', IMG)


# ------------------------------------------------------------------------- plain paddle.load (issue 15)

def same_content(plain, safe, path=''):
    """What plain ``paddle.load`` returns (Tensors) equals what our safe loader returns (numpy arrays):
    same keys in the same order, same dtypes, shapes and values, same plain Python values."""
    if isinstance(safe, (np.ndarray, np.generic)):
        assert isinstance(plain, (paddle.Tensor, np.ndarray, np.generic)), (path, type(plain))
        p = plain.numpy() if isinstance(plain, paddle.Tensor) else np.asarray(plain)
        s = np.asarray(safe)
        assert p.dtype == s.dtype and p.shape == s.shape, (path, p.dtype, s.dtype, p.shape, s.shape)
        assert np.array_equal(p, s, equal_nan=True), path
    elif isinstance(safe, dict):
        assert isinstance(plain, dict) and list(plain) == list(safe), (path, list(plain)[:4], list(safe)[:4])
        for k in safe:
            same_content(plain[k], safe[k], f'{path}/{k}')
    elif isinstance(safe, (list, tuple)):
        assert isinstance(plain, (list, tuple)) and len(plain) == len(safe), path
        for i, (a, b) in enumerate(zip(plain, safe)):
            same_content(a, b, f'{path}[{i}]')
    else:
        assert type(plain) is type(safe) and plain == safe, (path, plain, safe)


def test_every_paddle_file_convert_writes_loads_with_plain_paddle_load(work):
    """torch2paddle (pretrain with AdamW + scaler, linear with SGD momentum, deit) and extract (deit and
    backbone) write .pdparams that plain paddle.load reads (trusted files), with the content of our safe
    loader. (The trainers' checkpoints are covered with the trainers.)"""
    written = []
    for kind, arch in (('pretrain', 'vit_small'), ('linear', 'resnet50'), ('deit', 'vit_small')):
        src, _ = official(work, kind, arch)
        out = work / f'plain-{kind}-{arch}.pdparams'
        C.torch2paddle(src, out, log=quiet)
        written.append(out)
    src, _ = official(work, 'pretrain', 'vit_small')
    for kind in ('deit', 'backbone'):
        out = work / f'plain-extract-{kind}.pdparams'
        C.extract(src, out, kind=kind, log=quiet)
        written.append(out)
    for p in written:
        safe = pio.load_checkpoint(str(p))
        plain = paddle.load(str(p))
        same_content(plain, safe, p.name)
