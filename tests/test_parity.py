"""The float64 parity proof and its float32 companion, over every arch; and proof the harness can fail."""
import subprocess
import sys

import numpy as np
import paddle
import pytest
import torch

from convert import bridge
from convert.keymap import KeyMapError, check_state_dict, paddle_to_torch, torch_to_paddle
from parity import scenarios
from parity.compare import format_table
from torch_ref.models import ARCHS, VIT_ARCHS

SMALL = dict(dim=64, mlp_dim=128)
DEPTH = {'vit_large': 2, 'vit_huge': 2}  # full width/heads/patch; full depth is checked for structure below


def _img(arch):
    return 28 if arch == 'vit_huge' else 32


def _kw(arch):
    return {'depth': DEPTH[arch]} if arch in DEPTH else {}


def _assert_rows(rows):
    failed = [r for r in rows if not r.passed]
    assert not failed, '\n' + format_table(rows)


@pytest.mark.parametrize('dtype', ['float64', 'float32'])
@pytest.mark.parametrize('arch', ARCHS)
def test_forward_backward_parity(arch, dtype):
    rows = scenarios.run_forward_backward(arch, dtype, img_size=_img(arch), batch=8, **SMALL, **_kw(arch))
    _assert_rows(rows)
    names = [r.check for r in rows]
    assert any(n.startswith('grad:') for n in names) and any(n.startswith('loss:') for n in names)


@pytest.mark.parametrize('arch', [a for a in VIT_ARCHS])
def test_pos_embed_built_independently(arch):
    _assert_rows(scenarios.pos_embed_rows(arch))


@pytest.mark.parametrize('arch', ['vit_small', 'vit_conv_small', 'resnet50'])
def test_init_distributions(arch):
    _assert_rows(scenarios.init_rows(arch, img_size=32, **SMALL))


@pytest.mark.parametrize('arch', ['vit_small', 'vit_base', 'resnet50'])
def test_real_size_224_float32(arch):
    """Real-size models at 224: forward features and the MoCo loss agree in float32."""
    tmod, pmod = scenarios.build_pair(arch, 'float32', img_size=224, dim=256, mlp_dim=4096, T=0.2)
    # batch 4: at 2, every BN1d output is ±1 and float32 rounding flips near-ties (measured 1.2e-3 on the loss)
    x1, x2 = scenarios.inputs('float32', 4, 224, 0)
    tmod.train()
    pmod.train()
    with torch.no_grad():
        lt = tmod(torch.from_numpy(x1), torch.from_numpy(x2), 0.99).item()
    with paddle.no_grad():
        lp = float(pmod(paddle.to_tensor(x1), paddle.to_tensor(x2), 0.99))
    assert abs(lp - lt) / abs(lt) < 1e-4, (lp, lt)
    tmod.eval()
    pmod.eval()
    from paddle_impl.models import backbone_features as pf
    from torch_ref.models import backbone_features as tf
    with torch.no_grad():
        ft = tf(tmod.base_encoder, torch.from_numpy(x1)).numpy()
    with paddle.no_grad():
        fp = pf(pmod.base_encoder, paddle.to_tensor(x1)).numpy()
    assert np.linalg.norm(fp - ft) / np.linalg.norm(ft) < 1e-4


def test_vit_large_full_depth_structure():
    """The paper's ViT-L/16: full depth on both sides, same keys and shapes through the key map, 304M."""
    from paddle_impl import vits as pv
    from torch_ref import vits as tv
    t = tv.vit_large(img_size=32, num_classes=0)
    p = pv.vit_large(img_size=32, num_classes=0)
    tsd, _ = torch_to_paddle(bridge.torch_state_numpy(t))
    check_state_dict(tsd, {k: v.shape for k, v in p.state_dict().items()}, 'vit_large')
    n = sum(v.numel() for v in t.parameters())
    assert 300e6 < n < 310e6, n
    assert len(t.blocks) == len(p.blocks) == 24


def test_vit_huge_config():
    from paddle_impl.vits import ARCH_CONFIGS as pc
    from torch_ref.vits import ARCH_CONFIGS as tc
    assert tc['vit_huge'] == pc['vit_huge'] == (14, 1280, 32, 16, False)
    assert tc['vit_large'] == pc['vit_large'] == (16, 1024, 24, 16, False)


# ------------------------------------------------------------------ the harness must be able to fail
def test_planted_layernorm_eps_is_caught():
    tmod, pmod = scenarios.build_pair('vit_small', 'float64', **SMALL)
    for m in pmod.sublayers():
        if isinstance(m, paddle.nn.LayerNorm):
            m._epsilon = 1e-5  # official: 1e-6
    rows = scenarios.run_forward_backward('vit_small', 'float64', pair=(tmod, pmod), **SMALL)
    failed = {r.check for r in rows if not r.passed}
    assert 'forward: backbone features' in failed and 'grad: every trainable parameter' in failed


def test_planted_biased_running_variance_is_caught(monkeypatch):
    """One change only: the running variance takes the biased batch variance (n instead of n - 1). The
    float64 BN definition (normalisation, epsilon, momentum in float64) stays as it is, so the forward,
    the loss and every gradient still agree; only the running statistics fail."""
    from paddle_impl import layers
    monkeypatch.setattr(layers._UnbiasedVarMixin, '_reduce_count', lambda self, x: 1)  # n / (n - 1) not applied
    rows = scenarios.run_forward_backward('resnet50', 'float64', **SMALL)
    failed = {r.check for r in rows if not r.passed}
    assert failed == {'BN running mean/var after the step'}, format_table(rows)


# ------------------------------------------------------------------ key map
def test_keymap_round_trip_exact():
    torch.manual_seed(0)
    tmod, _ = scenarios.build_pair('vit_conv_small', 'float32', **SMALL)
    sd = bridge.torch_state_numpy(tmod)
    p, extras = torch_to_paddle(sd)
    back = paddle_to_torch(p, extras)
    assert set(back) == set(sd)
    for k in sd:
        assert back[k].dtype == sd[k].dtype and np.array_equal(back[k], sd[k]), k


def test_keymap_errors_name_the_keys():
    _, pmod = scenarios.build_pair('resnet50', 'float32', **SMALL)
    expected = {k: v.shape for k, v in pmod.state_dict().items()}
    sd = {k: np.zeros(v) for k, v in expected.items()}
    del sd['base_encoder.conv1.weight']
    sd['base_encoder.bogus'] = np.zeros(3)
    sd['predictor.0.weight'] = np.zeros((3, 3))
    with pytest.raises(KeyMapError) as e:
        check_state_dict(sd, expected, 'x.pdparams')
    msg = str(e.value)
    assert 'base_encoder.conv1.weight' in msg and 'base_encoder.bogus' in msg and 'predictor.0.weight' in msg
    with pytest.raises(KeyMapError):
        bridge.load_into_paddle(pmod, sd)


# ------------------------------------------------------------------ bad input
def test_unknown_arch_and_bad_img_size():
    from paddle_impl import models as pm
    from torch_ref import models as tm
    for mod in (pm, tm):
        with pytest.raises(ValueError, match='known: vit_small'):
            mod.build_moco('vit_tiny')
        with pytest.raises(ValueError, match='multiple of the patch size 16'):
            mod.build_moco('vit_small', img_size=40)


def test_cli_errors_one_line():
    for argv, needle in ((['--arch', 'vit_tiny'], 'known: vit_small'), (['--arch', 'vit_small', '--img-size', '30'], 'patch size 16')):
        r = subprocess.run([sys.executable, '-m', 'parity'] + argv, capture_output=True, text=True)
        assert r.returncode == 2
        assert needle in r.stderr and 'Traceback' not in r.stderr
