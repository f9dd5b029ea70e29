"""Parity on Paddle's own ops: every CPU-only path off (our C++ kernels and the fast layers), i.e. the op set a
GPU runs (issue 18 point 9; `python -m parity --paddle-ops`, parity/gpu_mode.py).

- The switch is real: with it on, no fast layer and no C++ kernel is used in a ViT/ResNet forward + backward
  + optimizer step (instrumented), while without it they are (so the instrumentation can see them).
- float64 forward + gradients (and BN statistics, momentum update) of every arch at <= 1e-10 (the project's
  float64 tolerance), float32 for one arch of each family at the float32 tolerances; 10 float64 training
  steps (ResNet-50 + LARS, ViT and conv-stem ViT + AdamW) at the project's 1e-9 for steps.
Small shapes (img 32, 28 for vit_huge; batch 8; MLP dims 32/64; ViTs at full width with 1 block, 2 for the
steps). The full matrix, every arch in both dtypes and 10 steps each, is the CLI:
`python -m parity --paddle-ops --arch all --dtype both` and `... --steps 10`.
"""
import numpy as np
import paddle
import pytest

from parity import gpu_mode, scenarios
from parity.compare import format_table
from parity.steps import run_steps
from torch_ref.models import ARCHS, VIT_ARCHS

def _img(arch):
    return 28 if arch == 'vit_huge' else 32


@pytest.fixture
def paddle_ops():
    with gpu_mode.paddle_ops_only():
        yield


class PathCounter:
    """Counts the calls in which a CPU-only path was taken."""

    def __init__(self, monkeypatch):
        from paddle_impl import cpu_kernels, layers
        self.kernels = self.fast = self.dense_t = 0
        usable, fast, dense = cpu_kernels.usable, layers._fast_cpu, layers._dense_transpose

        def usable_c(*a):
            r = usable(*a)
            self.kernels += bool(r)
            return r

        def fast_c(x):
            r = fast(x)
            self.fast += bool(r)
            return r

        def dense_c(*a):
            self.dense_t += 1
            return dense(*a)
        monkeypatch.setattr(cpu_kernels, 'usable', usable_c)
        monkeypatch.setattr(layers, '_fast_cpu', fast_c)
        monkeypatch.setattr(layers, '_dense_transpose', dense_c)

    def total(self):
        return self.kernels + self.fast + self.dense_t


def _train_one_step(arch):
    from paddle_impl.models import build_moco
    from paddle_impl.optimizer import LARS
    kw = dict(patch_size=8, embed_dim=32, depth=1, num_heads=2) if arch in VIT_ARCHS else {}
    paddle.seed(0)
    model = build_moco(arch, dim=16, mlp_dim=32, T=0.2, img_size=32, **kw)
    model.train()
    opt = LARS([p for p in model.parameters() if not p.stop_gradient], lr=0.1, weight_decay=1e-6)
    rng = np.random.default_rng(0)
    x1, x2 = (paddle.to_tensor(rng.standard_normal((4, 3, 32, 32)).astype('float32')) for _ in range(2))
    loss = model(x1, x2, 0.99)
    loss.backward()
    opt.step()
    return float(loss)


@pytest.mark.parametrize('arch', ['vit_conv_small', 'resnet50'])
def test_switch_turns_every_cpu_only_path_off(monkeypatch, arch):
    c = PathCounter(monkeypatch)
    loss_fast = _train_one_step(arch)
    assert c.total() > 0, 'instrumentation saw no CPU-only path with the switch off'
    c.kernels = c.fast = c.dense_t = 0
    with gpu_mode.paddle_ops_only():
        loss_paddle = _train_one_step(arch)
    assert (c.kernels, c.fast, c.dense_t) == (0, 0, 0)
    assert abs(loss_fast - loss_paddle) <= 1e-4 * abs(loss_paddle)
    c.kernels = c.fast = c.dense_t = 0
    _train_one_step(arch)  # and back on after the block
    assert c.total() > 0


def _judge(rows, dtype):
    failed = [r for r in rows if not r.passed]
    assert not failed, '\n' + format_table(rows)
    if dtype == 'float64':
        worst = max((r.rel_l2 for r in rows if r.tol is not None and r.rel_l2 is not None
                     and r.check.startswith(('forward', 'grad', 'loss'))), default=None)
        assert worst is not None and worst <= 1e-10, worst
        print(f'worst float64 forward/grad/loss rel L2: {worst:.2e}')


# float64: every arch at full width/heads/patch with 1 block (ViTs), dims 32/64, batch 8; float32: one of
# each family. The whole matrix (all archs, both dtypes, 10 steps each) is `python -m parity --paddle-ops`.
FB_DEPTH = 1
FLOAT32_ARCHS = ['vit_small', 'vit_conv_small', 'resnet50']


@pytest.mark.parametrize('arch,dtype', [(a, 'float64') for a in ARCHS] + [(a, 'float32') for a in FLOAT32_ARCHS])
def test_forward_backward_on_paddle_ops(paddle_ops, arch, dtype):
    kw = {'depth': FB_DEPTH} if arch in VIT_ARCHS else {}
    rows = scenarios.run_forward_backward(arch, dtype, img_size=_img(arch), batch=8, dim=32, mlp_dim=64, **kw)
    names = [r.check for r in rows]
    assert any(n.startswith('grad:') for n in names) and any(n.startswith('loss:') for n in names)
    _judge(rows, dtype)


# 10 training steps, float64: ResNet-50 (LARS), a ViT and a conv-stem ViT (AdamW), depth 2 (at depth 1
# vit_conv_small's float64 trajectory is ill-conditioned, tests/test_steps.py)
@pytest.mark.parametrize('arch', ['resnet50', 'vit_small', 'vit_conv_small'])
def test_10_steps_float64_on_paddle_ops(paddle_ops, arch):
    opt = 'lars' if arch == 'resnet50' else 'adamw'
    kw = {'depth': 2} if arch in VIT_ARCHS else {}
    rows = run_steps(arch, opt, steps=10, dtype='float64', img_size=32, batch=8, dim=32, mlp_dim=64,
                     per_step=False, **kw)
    failed = [r for r in rows if r.tol is not None and not r.passed]
    assert not failed, '\n' + format_table(rows)
    final = [r for r in rows if r.check.startswith('final params')]
    assert final and max(r.rel_l2 for r in final) <= 1e-9
    print(f"{arch}: final params max rel L2 {max(r.rel_l2 for r in final):.2e}")
