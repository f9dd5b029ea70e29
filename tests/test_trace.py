"""parity --trace: the first divergent module is named (docs/trace.md).

Planted bugs at different depths, each in one module of the Paddle twin, float64: the trace must name
exactly the planted module (forward, or state where the plant changes only a running statistic). The
library entry point parity.trace works on a pair outside MoCo (torchvision vs paddle.vision resnet18).
"""
import json
import subprocess
import sys

import numpy as np
import paddle
import paddle.nn.functional as F
import pytest
import torch

import parity
from parity import scenarios, tracing
from parity.steps import DEFAULTS

VIT = dict(img_size=32, dim=32, mlp_dim=64, depth=2)
RES = dict(img_size=32, dim=32, mlp_dim=64)


class Pair:
    """A float64 twin pair built once; every trace starts from the same weights, statistics and no grads."""

    def __init__(self, arch, **kw):
        self.arch = arch
        self.tmod, self.pmod = scenarios.build_pair(arch, 'float64', **kw)
        self.t0 = {k: v.clone() for k, v in self.tmod.state_dict().items()}
        self.p0 = {k: v.clone() for k, v in self.pmod.state_dict().items()}

    def trace(self):
        self.tmod.load_state_dict(self.t0)
        self.pmod.set_state_dict(self.p0)
        for p in self.tmod.parameters():
            p.grad = None
        self.pmod.clear_gradients(set_to_zero=False)
        return tracing.trace_moco((self.tmod, self.pmod), 'float64', batch=4, img_size=32)

    def layer(self, path):
        return dict(self.pmod.named_sublayers())[path]


@pytest.fixture(scope='module')
def vit():
    return Pair('vit_small', **VIT)


@pytest.fixture(scope='module')
def resnet():
    return Pair('resnet50', **RES)


def test_twins_trace_clean(vit):
    res = vit.trace()
    assert res.passed, res.table()
    fwd = [r for r in res.rows if r.path == 'base_encoder.blocks.1.norm1']
    assert fwd and fwd[0].fwd_rel < 1e-13 and fwd[0].bwd_rel < 1e-11
    assert 'base_encoder.blocks.0.attn.attn_drop' in res.only_torch  # listed, not skipped
    assert 'every matched module within tolerance' in res.table()


VIT_PLANTS = {
    # depth: the second block's first norm
    'layernorm eps': ('base_encoder.blocks.1.norm1', lambda l, mp: mp.setattr(l, '_epsilon', 1e-5)),
    # the first block's MLP activation: tanh approximation instead of erf
    'tanh gelu': ('base_encoder.blocks.0.mlp.act',
                  lambda l, mp: mp.setattr(l, 'forward', lambda x: F.gelu(x, approximate=True))),
    # the attention of the second block: the scale lives in the module's own code, between its children
    'attention scale': ('base_encoder.blocks.1.attn', lambda l, mp: mp.setattr(l, 'scale', l.scale * 1.001)),
    # the predictor's first BN (after the encoder and the projector)
    'predictor bn eps': ('predictor.1', lambda l, mp: mp.setattr(l, '_epsilon', 1e-3)),
}


@pytest.mark.parametrize('plant', sorted(VIT_PLANTS))
def test_vit_plant_is_named(vit, monkeypatch, plant):
    path, apply = VIT_PLANTS[plant]
    apply(vit.layer(path), monkeypatch)
    res = vit.trace()
    print('\n' + res.table(max_rows=10))
    assert res.first is not None and res.first['path'] == path and res.first['kind'] == 'forward', res.first


def test_vit_plant_transposed_projector_weight_is_named(vit):
    """A square Linear of the projector (mlp_dim x mlp_dim) loaded without its transpose."""
    path = 'base_encoder.head.3'
    key = f'{path}.weight'
    saved = vit.p0[key]
    vit.p0[key] = paddle.to_tensor(np.asarray(saved.numpy()).T.copy())
    try:
        res = vit.trace()
    finally:
        vit.p0[key] = saved
    assert res.first['path'] == path and res.first['kind'] == 'forward', res.first


def test_resnet_plant_bn_eps_is_named(resnet, monkeypatch):
    path = 'base_encoder.layer1.0.bn1'
    monkeypatch.setattr(resnet.layer(path), '_epsilon', 1e-3)
    res = resnet.trace()
    assert res.first['path'] == path and res.first['kind'] == 'forward', res.first


def test_resnet_plant_biased_running_variance_is_named(resnet, monkeypatch):
    """One bottleneck BN updates its running variance with the biased batch variance: the forward and every
    gradient agree (training mode normalises with batch statistics), only that module's state differs."""
    path = 'base_encoder.layer2.0.bn2'
    monkeypatch.setattr(resnet.layer(path), '_reduce_count', lambda x: 1)
    res = resnet.trace()
    print('\n' + res.table(max_rows=5))
    assert res.first['path'] == path and res.first['kind'] == 'state', res.first
    assert '_variance' in res.first['detail']
    assert all(r.fwd_ok and r.bwd_ok for r in res.rows)


def test_resnet_twins_trace_clean(resnet):
    res = resnet.trace()
    assert res.passed, res.table()


def test_first_step_of_k(monkeypatch):
    """K steps: an optimizer that decays 1-D parameters changes nothing at step 0 (lr 0 in warm-up) and
    shows after step 1, in the first module with a trained 1-D parameter."""
    from paddle_impl import engine
    from test_steps import LARSDecays1D
    monkeypatch.setattr(engine, 'build_optimizer',
                        lambda name, params, lr, wd, momentum: LARSDecays1D(params, lr, weight_decay=wd, momentum=momentum))
    pair = scenarios.build_pair('vit_small', 'float64', img_size=32, dim=32, mlp_dim=64, depth=1, T=1.0,
                                stop_grad_conv1=True)
    res = tracing.trace_moco_steps(pair, 'vit_small', 'lars', 3, 'float64', img_size=32, batch=4, wd=1e-2)
    print('\n' + res.table(max_rows=5))
    assert res.step == 1 and res.first['kind'] == 'state', (res.step, res.first)
    assert res.first['path'] == 'base_encoder.blocks.0.norm1'


class _GeluWrongGrad(paddle.autograd.PyLayer):
    """Exact GELU forward; a backward 0.1% too large."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return F.gelu(x)

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensor()
        cdf = 0.5 * (1 + paddle.erf(x / np.sqrt(2.)))
        pdf = paddle.exp(-0.5 * x * x) / np.sqrt(2 * np.pi)
        return g * (cdf + x * pdf) * 1.001


def test_vit_plant_wrong_backward_is_named(vit, monkeypatch):
    """A module whose forward is right and whose backward is wrong: every forward output agrees; the
    gradient arriving at its output agrees while the one it passes back (fc1's output) does not."""
    path = 'base_encoder.blocks.0.mlp.act'
    monkeypatch.setattr(vit.layer(path), 'forward', lambda x: _GeluWrongGrad.apply(x))
    res = vit.trace()
    print('\n' + res.table(max_rows=5))
    assert res.first['path'] == path and res.first['kind'] == 'backward', res.first
    assert all(r.fwd_ok for r in res.rows)


def test_nonfinite_in_one_module_is_named(vit, monkeypatch):
    path = 'base_encoder.blocks.0.norm2'
    layer = vit.layer(path)
    real = type(layer).forward
    monkeypatch.setattr(layer, 'forward', lambda x: real(layer, x) * float('nan'))
    res = vit.trace()
    assert res.first['path'] == path and res.first['kind'] == 'forward'
    row = next(r for r in res.rows if r.path == path)
    assert not row.fwd_ok and np.isnan(row.fwd_rel)


# ------------------------------------------------------------------ the library on a pair outside MoCo
@pytest.fixture(scope='module')
def resnet18_pair():
    import torchvision
    torch.manual_seed(0)
    with scenarios.torch_dtype('float64'):
        t = torchvision.models.resnet18(num_classes=10)
    with scenarios.paddle_dtype('float64'):
        p = paddle.vision.models.resnet18(num_classes=10)
    x = np.random.default_rng(0).standard_normal((4, 3, 32, 32))
    return t, p, x


def test_library_resnet18_eval_agrees(resnet18_pair):
    t, p, x = resnet18_pair
    t.eval()
    p.eval()
    res = parity.trace(t, p, x, key_map='auto')
    print('\n' + res.table(max_rows=8))
    assert res.passed, res.table()
    assert len(res.rows) > 40 and res.only_torch == [] and res.only_paddle == []
    assert all(r.bwd_rel is not None for r in res.rows if r.path.startswith('layer'))


def test_library_resnet18_train_shows_biased_variance(resnet18_pair, tmp_path):
    """paddle.vision's BatchNorm updates the running variance with the biased batch variance (torch: the
    unbiased one): in training mode every BN's state differs, from the first one (bn1) on. (Its float64
    backward kernel also differs from torch's by ~1e-10, at the tolerance, so which of the two the trace
    names first is not asserted here.)"""
    t, p, x = resnet18_pair
    t.train()
    p.train()
    res = parity.trace(t, p, x, key_map='auto')
    assert res.first is not None
    bn1 = next(r for r in res.rows if r.path == 'bn1')
    assert not bn1.state_ok and bn1.state_worst == 'bn1._variance' and bn1.state_rel > 1e-7, bn1
    assert bn1.fwd_ok
    res.to_json(str(tmp_path / 't.json'))
    data = json.loads((tmp_path / 't.json').read_text())
    assert data['first'] == res.first and len(data['rows']) == len(res.rows)


def test_library_lists_modules_without_counterpart(resnet18_pair):
    t, p, x = resnet18_pair
    t.eval()
    p.eval()
    t.extra_head = torch.nn.Identity()  # never called
    try:
        res = parity.trace(t, p, x, key_map='auto', loss_fn=lambda y: (y * y).sum())
    finally:
        del t.extra_head
    assert res.only_torch == ['extra_head'] and res.passed
    assert 'torch only extra_head' in res.table()


def test_library_dict_key_map(resnet18_pair):
    """A dict key map (torch name -> Paddle name); the Linear weight is transposed by the loader."""
    t, p, x = resnet18_pair
    t.eval()
    p.eval()
    names = {k: k.replace('running_mean', '_mean').replace('running_var', '_variance')
             for k in t.state_dict() if not k.endswith('num_batches_tracked')}
    res = parity.trace(t, p, x, key_map=names)
    assert res.passed, res.table()
    with pytest.raises(KeyError, match='fc.bias'):
        parity.trace(t, p, x, key_map={k: v for k, v in names.items() if k != 'fc.bias'})


# ------------------------------------------------------------------ the CLI
def test_cli_trace_json_and_exit_code(tmp_path):
    out = tmp_path / 'trace.json'
    cmd = [sys.executable, '-m', 'parity', '--arch', 'vit_small', '--depth', '1', '--dim', '16', '--mlp-dim', '32',
           '--batch', '4', '--trace', '--json', str(out)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert 'every matched module within tolerance' in r.stdout
    data = json.loads(out.read_text())
    assert data['traces'][0]['passed'] and data['traces'][0]['rows']


def test_cli_trace_names_a_plant_and_exits_1(monkeypatch, tmp_path, capsys):
    """Every LayerNorm of the Paddle side with epsilon 1e-5: the first one to run is named, exit status 1."""
    from paddle_impl import layers
    from parity.__main__ import main
    real = layers.LayerNorm.forward

    def planted(self, x):
        self._epsilon = 1e-5
        return real(self, x)
    monkeypatch.setattr(layers.LayerNorm, 'forward', planted)
    rc = main(['--arch', 'vit_small', '--depth', '1', '--dim', '16', '--mlp-dim', '32', '--batch', '4', '--trace',
               '--json', str(tmp_path / 't.json')])
    out = capsys.readouterr().out
    assert rc == 1 and 'FIRST DIVERGENCE: base_encoder.blocks.0.norm1 (LayerNorm), forward' in out, out[-3000:]
    assert json.loads((tmp_path / 't.json').read_text())['traces'][0]['first']['path'] == 'base_encoder.blocks.0.norm1'
