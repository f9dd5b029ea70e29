"""--reference official: the torch side built from a checkout of the original facebookresearch/moco-v3.

The original code is not in this repository (CC-BY-NC 4.0). These tests write a STAND-IN folder with the
original's layout (moco/builder.py, moco/optimizer.py, vits.py) whose modules are thin wrappers of
torch_ref, plus a stand-in timm side folder, and check the loading mechanism: timm shadowed for vits.py
only, a 1-process gloo group, ``.cuda()`` on the labels run on the CPU, bad folders reported in one line.
Against a real checkout: ``make parity-official OFFICIAL=DIR TIMM=DIR`` (docs/trace.md).
"""
import subprocess
import sys
import textwrap

import pytest
import torch

import torch_ref.vits  # noqa: F401  (loaded with the project's timm before any shadowing)
from parity import official as O
from parity.compare import format_table
from parity.steps import run_steps

BUILDER = '''
    """Stand-in for the original moco/builder.py (test fixture): torch_ref's MoCo, with the original's
    loss habits: all_gather over the process group, the rank from torch.distributed, labels .cuda()."""
    import torch
    import torch.distributed
    import torch.nn as nn
    from torch_ref import builder as _b

    CALLS = {'cuda': 0}


    def _loss(self, q, k):
        q = nn.functional.normalize(q, dim=1)
        k = nn.functional.normalize(k, dim=1)
        ks = [torch.ones_like(k) for _ in range(torch.distributed.get_world_size())]
        torch.distributed.all_gather(ks, k, async_op=False)
        k = torch.cat(ks, dim=0)
        logits = torch.einsum('nc,mc->nm', [q, k]) / self.T
        N = logits.shape[0]
        labels = (torch.arange(N, dtype=torch.long) + N * torch.distributed.get_rank()).cuda()
        CALLS['cuda'] += 1
        return nn.CrossEntropyLoss()(logits, labels) * (2 * self.T)


    class MoCo_ViT(_b.MoCo_ViT):
        contrastive_loss = _loss


    class MoCo_ResNet(_b.MoCo_ResNet):
        contrastive_loss = _loss
'''
OPTIMIZER = '''
    """Stand-in for the original moco/optimizer.py (test fixture)."""
    from torch_ref.optimizer import LARS  # noqa: F401
'''
VITS = '''
    """Stand-in for the original vits.py (test fixture): needs the side timm (a module timm 1.0 lacks)."""
    from timm.models.layers.helpers import to_2tuple  # noqa: F401  (only in the side folder)
    import timm
    from torch_ref import vits as _v

    TIMM_SEEN = timm.__version__
    VisionTransformerMoCo = _v.VisionTransformerMoCo
    ConvStem = _v.ConvStem
    __all__ = ['vit_small', 'vit_base', 'vit_conv_small', 'vit_conv_base']


    def vit_small(**kwargs):
        return _v.vit_small(**kwargs)


    def vit_conv_small(**kwargs):
        return _v.vit_conv_small(**kwargs)
'''


@pytest.fixture(scope='module')
def standin(tmp_path_factory):
    root = tmp_path_factory.mktemp('official')
    src, side = root / 'moco-v3', root / 'timm049'
    (src / 'moco').mkdir(parents=True)
    (src / 'moco' / '__init__.py').write_text('')
    (src / 'moco' / 'builder.py').write_text(textwrap.dedent(BUILDER))
    (src / 'moco' / 'optimizer.py').write_text(textwrap.dedent(OPTIMIZER))
    (src / 'vits.py').write_text(textwrap.dedent(VITS))
    (side / 'timm' / 'models' / 'layers').mkdir(parents=True)
    (side / 'timm' / '__init__.py').write_text("__version__ = '0.4.9-standin'\n")
    (side / 'timm' / 'models' / '__init__.py').write_text('')
    (side / 'timm' / 'models' / 'layers' / '__init__.py').write_text('')
    (side / 'timm' / 'models' / 'layers' / 'helpers.py').write_text('def to_2tuple(x):\n    return (x, x)\n')
    return str(src), str(side)


@pytest.fixture(scope='module')
def off(standin):
    return O.Official(*standin)


def test_timm_shadowed_for_vits_only(off):
    import timm
    before = timm.__file__
    assert off.vits.TIMM_SEEN == '0.4.9-standin'
    import timm as after
    assert after.__file__ == before and sys.modules['timm'].__file__ == before  # the project's timm is back
    assert not after.__version__.startswith('0.4.9')


def test_forward_backward_against_standin(off):
    from parity import scenarios
    calls = off.builder.CALLS['cuda']
    pair = O.build_official_pair(off, 'vit_small', 'float64', 32, 16, 32, 0.2, 0, True, depth=1)
    assert type(pair[0]).__module__.endswith('.builder')
    rows = scenarios.run_forward_backward('vit_small', 'float64', 32, 4, 16, 32, pair=pair, depth=1)
    rows += O.dtype_rows(*pair, reference='the original code')
    assert all(r.passed for r in rows), format_table(rows)
    assert off.builder.CALLS['cuda'] > calls  # the labels' .cuda() ran, on the CPU
    assert str(pair[0].base_encoder.pos_embed.dtype) == 'torch.float32'
    assert torch.distributed.is_initialized() and torch.distributed.get_world_size() == 1


def test_steps_against_standin(off):
    pair = O.build_official_pair(off, 'vit_small', 'float64', 32, 16, 32, 1.0, 0, True, depth=1)
    rows = run_steps('vit_small', 'lars', steps=3, dtype='float64', batch=4, dim=16, mlp_dim=32, pair=pair,
                     torch_optimizer=O.official_optimizer(off), per_step=False, depth=1)
    assert all(r.passed for r in rows if r.tol is not None), format_table(rows)


def test_cuda_shim_is_needed():
    if torch.cuda.is_available():
        pytest.skip('a CUDA device is present: .cuda() works without the shim')
    with pytest.raises((RuntimeError, AssertionError)):
        torch.arange(3).cuda()
    with O.cuda_as_cpu():
        assert torch.arange(3).cuda().device.type == 'cpu'


def _cli(args):
    return subprocess.run([sys.executable, '-m', 'parity', '--arch', 'vit_small', '--depth', '1', '--dim', '16',
                           '--mlp-dim', '32', '--batch', '4', '--no-init'] + args, capture_output=True, text=True,
                          timeout=900)


def test_cli_trace_and_steps_against_standin(standin):
    src, side = standin
    r = _cli(['--reference', 'official', '--official-src', src, '--timm-src', side, '--trace'])
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert 'against the original code' in r.stdout and 'every matched module within tolerance' in r.stdout
    r = _cli(['--reference', 'official', '--official-src', src, '--timm-src', side, '--steps', '2'])
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]


def test_bad_folders_one_line(standin, tmp_path):
    src, side = standin
    cases = [
        (['--official-src', str(tmp_path / 'none')], 'not a folder; expected a checkout of facebookresearch/moco-v3'),
        (['--official-src', str(tmp_path)], 'no moco/builder.py, moco/optimizer.py, vits.py there'),
        (['--official-src', src, '--timm-src', str(tmp_path)], 'no timm/__init__.py there'),
        (['--official-src', src], 'needs timm 0.4.9'),
        (['--official-src', src, '--timm-src', side, '--arch', 'vit_large'], 'the original code has no vit_large'),
    ]
    for extra, needle in cases:
        args = ['--reference', 'official'] + extra
        r = _cli(args) if '--arch' not in extra else subprocess.run(
            [sys.executable, '-m', 'parity'] + args, capture_output=True, text=True, timeout=300)
        lines = [x for x in r.stderr.splitlines() if x.startswith('error:')]
        assert r.returncode == 2 and len(lines) == 1 and needle in lines[0], (extra, r.stderr[-2000:])
        assert 'Traceback' not in r.stderr
