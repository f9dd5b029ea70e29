"""GPU paths that can be checked on the CPU (issue 18).

- No GPU->CPU sync in BatchNorm: a ResNet-50 MoCo training step (float32 and float64, plain and synchronised
  BN) calls ``Tensor.numel`` zero times (``int(x.numel())`` waits for the GPU; the static shape does not).
- The float32 BN path asks the kernel whether it stores the biased or the unbiased running variance
  (layers.kernel_stores_unbiased) and corrects only the biased case: with a fake kernel that stores the
  unbiased variance (as cuDNN does), the running variance still follows torch's rule, and forcing the old
  assumption onto that kernel is caught (the correction would then be applied twice).
- The synchronised BN with a mocked two-process world gives the global-batch statistics.
"""
import numpy as np
import paddle
import pytest

from paddle_impl import layers, utils
from paddle_impl.models import build_moco


class NumelCounter:
    def __init__(self, monkeypatch):
        self.calls = 0
        orig = paddle.Tensor.numel

        def counting(t, *a, **k):
            self.calls += 1
            return orig(t, *a, **k)
        monkeypatch.setattr(paddle.Tensor, 'numel', counting)


def _resnet_step(dtype, batch=4):
    prev = paddle.get_default_dtype()
    paddle.set_default_dtype(dtype)
    try:
        paddle.seed(0)
        model = build_moco('resnet50', dim=16, mlp_dim=32, T=0.2, img_size=32)
    finally:
        paddle.set_default_dtype(prev)
    model.train()
    rng = np.random.default_rng(0)
    x1, x2 = (paddle.to_tensor(rng.standard_normal((batch, 3, 32, 32)).astype(dtype)) for _ in range(2))
    loss = model(x1, x2, 0.99)
    loss.backward()
    return model, float(loss)


def test_numel_counter_can_count(monkeypatch):
    c = NumelCounter(monkeypatch)
    x = paddle.ones([4, 3, 2, 2])
    assert int(x.numel()) // 3 == 16 and c.calls == 1
    assert layers.reduce_count(x) == 16 and c.calls == 1  # the static shape: no numel


@pytest.mark.parametrize('dtype', ['float32', 'float64'])
def test_no_numel_in_a_resnet_step(monkeypatch, dtype):
    c = NumelCounter(monkeypatch)
    model, loss = _resnet_step(dtype)
    assert np.isfinite(loss)
    n_bn = sum(isinstance(m, paddle.nn.layer.norm._BatchNormBase) for m in model.sublayers())
    assert n_bn > 100  # ResNet-50 x 2 encoders + MLP heads: every one of them ran without numel
    assert c.calls == 0


def _two_rank_world(monkeypatch):
    """A world of two processes holding identical batches: the all-reduce of a sum is twice the sum."""
    monkeypatch.setattr(utils, 'world_size', lambda: 2)
    monkeypatch.setattr(utils, 'all_reduce_sum', lambda x, group=None: x + x)


def test_sync_bn_mocked_world_global_stats_and_no_numel(monkeypatch):
    _two_rank_world(monkeypatch)
    rng = np.random.default_rng(1)
    x = rng.standard_normal((4, 3, 5, 5))
    prev = paddle.get_default_dtype()
    paddle.set_default_dtype('float64')
    try:
        bn = layers.BatchNorm2D(3)
    finally:
        paddle.set_default_dtype(prev)
    utils.convert_sync_batchnorm(bn, group=object())
    bn.train()
    c = NumelCounter(monkeypatch)
    y = bn(paddle.to_tensor(x)).numpy()
    assert c.calls == 0
    v = x.transpose(1, 0, 2, 3).reshape(3, -1)  # both ranks hold x: the global batch is x twice
    g = np.concatenate([v, v], axis=1)
    ref = (x - v.mean(1)[None, :, None, None]) / np.sqrt(v.var(1) + 1e-5)[None, :, None, None]
    np.testing.assert_allclose(y, ref, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(bn._variance.numpy(), 0.9 + 0.1 * g.var(1, ddof=1), rtol=1e-13)
    np.testing.assert_allclose(bn._mean.numpy(), 0.1 * g.mean(1), rtol=1e-13, atol=1e-15)


# ---------------------------------------------------------------------------------------------- BN probe

def _unbiased_storing_kernel(x, running_mean, running_var, weight, bias, momentum, epsilon, data_format):
    """Paddle's kernel for the output and the mean; the running variance updated with the UNBIASED batch
    variance, as cuDNN does."""
    old_var = running_var.numpy().astype(np.float64)
    y = layers.F.batch_norm(x, running_mean, running_var, weight=weight, bias=bias, training=True,
                            momentum=momentum, epsilon=epsilon, data_format=data_format, use_global_stats=False)
    a = x.numpy().astype(np.float64)
    ch = 1 if data_format.startswith('NC') else a.ndim - 1
    v = np.moveaxis(a, ch, 0).reshape(a.shape[ch], -1)
    m = float(np.float32(momentum))
    running_var.set_value((m * old_var + (1 - m) * v.var(1, ddof=1)).astype(running_var.numpy().dtype))
    return y


@pytest.fixture
def fresh_probe(monkeypatch):
    # Paddle's BN kernel path (a GPU's; on CPU float32 NCHW our kernels take the call, layers._bn_k_applies)
    monkeypatch.setattr(layers, '_bn_k_applies', lambda *a: False)
    monkeypatch.setattr(layers, '_KERNEL_STORES_UNBIASED', {})
    return layers._KERNEL_STORES_UNBIASED


def _bn_case(kind):
    rng = np.random.default_rng(2)
    if kind == '2d':
        return layers.BatchNorm2D(3), rng.standard_normal((4, 3, 3, 3)).astype('float32'), (0, 2, 3)
    return layers.BatchNorm1D(5), rng.standard_normal((6, 5)).astype('float32'), (0,)


def _torch_rule(x, axes, steps=1):
    var = np.ones(x.shape[1])
    for _ in range(steps):
        var = 0.9 * var + 0.1 * x.astype(np.float64).var(axis=axes, ddof=1)
    return var


@pytest.mark.parametrize('kind', ['2d', '1d'])
def test_probe_on_paddles_cpu_kernel_says_biased(fresh_probe, kind):
    bn, x, axes = _bn_case(kind)
    bn.train()
    bn(paddle.to_tensor(x))
    bn(paddle.to_tensor(x))
    assert list(fresh_probe.values()) == [False]  # one probe per key, not per call
    np.testing.assert_allclose(bn._variance.numpy(), _torch_rule(x, axes, 2), rtol=2e-6)


@pytest.mark.parametrize('kind', ['2d', '1d'])
def test_unbiased_storing_kernel_is_not_corrected_again(monkeypatch, fresh_probe, kind):
    monkeypatch.setattr(layers, '_bn_kernel', _unbiased_storing_kernel)
    bn, x, axes = _bn_case(kind)
    bn.train()
    y = bn(paddle.to_tensor(x)).numpy()
    assert list(fresh_probe.values()) == [True]
    np.testing.assert_allclose(bn._variance.numpy(), _torch_rule(x, axes), rtol=2e-6)
    mean = x.mean(axis=axes, keepdims=True)
    np.testing.assert_allclose(y, (x - mean) / np.sqrt(x.var(axis=axes, keepdims=True) + 1e-5), atol=2e-5)


def test_old_assumption_on_an_unbiased_kernel_is_caught(monkeypatch, fresh_probe):
    """What the code did before the probe (always multiply by n/(n-1)) is wrong on such a kernel: the
    running variance's update is then off by that factor, which the check above would see."""
    monkeypatch.setattr(layers, '_bn_kernel', _unbiased_storing_kernel)
    monkeypatch.setattr(layers, 'kernel_stores_unbiased', lambda *a, **k: False)
    bn, x, axes = _bn_case('2d')
    bn.train()
    bn(paddle.to_tensor(x))
    n = x.size // x.shape[1]
    got_update = (bn._variance.numpy() - 0.9) / 0.1
    want_update = x.astype(np.float64).var(axis=axes, ddof=1)
    np.testing.assert_allclose(got_update, want_update * n / (n - 1), rtol=1e-4)
    assert not np.allclose(bn._variance.numpy(), _torch_rule(x, axes), rtol=2e-6)


def test_probe_refuses_a_kernel_it_does_not_understand(monkeypatch, fresh_probe):
    def odd_kernel(x, rm, rv, *a):
        y = layers.F.batch_norm(x, rm, rv, training=True, momentum=a[2], epsilon=a[3], data_format=a[4])
        rv.set_value(rv * 3.0)
        return y
    monkeypatch.setattr(layers, '_bn_kernel', odd_kernel)
    bn, x, _ = _bn_case('2d')
    bn.train()
    with pytest.raises(RuntimeError, match='BatchNorm probe'):
        bn(paddle.to_tensor(x))


def test_probe_key_is_per_shape_dtype_and_place(fresh_probe):
    x32 = paddle.ones([4, 3, 2, 2], dtype='float32')
    layers.kernel_stores_unbiased(x32, paddle.float32, 'NCHW')
    layers.kernel_stores_unbiased(paddle.ones([8, 3, 2, 2], dtype='float32'), paddle.float32, 'NCHW')
    layers.kernel_stores_unbiased(x32.astype('float64'), paddle.float64, 'NCHW')
    keys = list(fresh_probe)
    assert len(keys) == 3 and all(k[0] == 'Place(cpu)' for k in keys)
    assert {k[1] for k in keys} == {'paddle.float32', 'paddle.float64'}
    assert not any(fresh_probe.values())


# ------------------------------------------------------------------- SyncBN on GPU: Paddle's sync kernel

def _fake_sync_kernel(store_unbiased):
    """Paddle's sync_batch_norm kernel as its source reads (KeSyncAndMovingStats), for a mocked world of two
    processes holding identical batches: statistics of the global batch, running variance updated with the
    global BIASED variance (or, store_unbiased, with the unbiased one), momentum the weight of the old value."""
    def kernel(x, rm, rv, weight, bias, momentum, epsilon, data_format):
        a = x.numpy().astype(np.float64)
        v = np.moveaxis(a, 1, 0).reshape(a.shape[1], -1)
        v = np.concatenate([v, v], axis=1)  # the two ranks
        mean, var = v.mean(1), v.var(1, ddof=1 if store_unbiased else 0)
        m = float(np.float32(momentum))
        rm.set_value((m * rm.numpy() + (1 - m) * mean).astype(rm.numpy().dtype))
        rv.set_value((m * rv.numpy() + (1 - m) * var).astype(rv.numpy().dtype))
        shape = [1, -1] + [1] * (a.ndim - 2)
        y = (a - v.mean(1).reshape(shape)) / np.sqrt(v.var(1).reshape(shape) + epsilon)
        y = y * weight.numpy().reshape(shape) + bias.numpy().reshape(shape)
        return paddle.to_tensor(y.astype(a.dtype if x.dtype == paddle.float64 else np.float32))
    return kernel


@pytest.mark.parametrize('store_unbiased', [False, True])
@pytest.mark.parametrize('kind', ['2d', '1d_no_affine'])
def test_sync_bn_on_the_gpu_kernel_restores_torch_rule(monkeypatch, fresh_probe, store_unbiased, kind):
    _two_rank_world(monkeypatch)
    monkeypatch.setattr(utils, 'use_sync_kernel', lambda x=None: True)
    calls = []
    fake = _fake_sync_kernel(store_unbiased)
    monkeypatch.setattr(utils, '_sync_bn_kernel', lambda *a: calls.append(1) or fake(*a))
    rng = np.random.default_rng(3)
    if kind == '2d':
        bn, x, axes = layers.BatchNorm2D(3), rng.standard_normal((4, 3, 3, 3)).astype('float32'), (0, 2, 3)
    else:
        bn, x, axes = layers.BatchNorm1D(5, affine=False), rng.standard_normal((6, 5)).astype('float32'), (0,)
    utils.convert_sync_batchnorm(bn, group=object())
    bn.train()
    c = NumelCounter(monkeypatch)
    y = bn(paddle.to_tensor(x)).numpy()
    assert c.calls == 0 and len(calls) == 2  # the probe, then the real call
    assert list(fresh_probe.values()) == [store_unbiased]
    g = np.concatenate([x, x], axis=0).astype(np.float64)  # the global batch
    np.testing.assert_allclose(bn._variance.numpy(), 0.9 + 0.1 * g.var(axis=axes, ddof=1), rtol=2e-6)
    np.testing.assert_allclose(bn._mean.numpy(), 0.1 * g.mean(axis=axes), rtol=2e-5, atol=1e-7)
    ref = (x - x.mean(axis=axes, keepdims=True)) / np.sqrt(x.var(axis=axes, keepdims=True) + 1e-5)
    np.testing.assert_allclose(y, ref, atol=2e-5)


def test_sync_bn_uses_ours_on_cpu_and_when_asked(monkeypatch):
    assert not utils.use_sync_kernel(paddle.ones([2, 3]))  # a CPU tensor: Paddle has no CPU sync kernel
    monkeypatch.setenv('MOCO_SYNC_BN', 'ours')
    assert not utils.use_sync_kernel()


# ------------------------------------------------------------------------------- TF32 and --device gpu

def test_tf32_off_sets_every_switch(monkeypatch):
    from parity import gpu_mode
    calls = []
    monkeypatch.setattr(paddle.base.core, 'set_cublas_switch', lambda on: calls.append(('cublas', on)),
                        raising=False)
    monkeypatch.setattr(paddle.base.core, 'set_cudnn_switch', lambda on: calls.append(('cudnn', on)),
                        raising=False)
    monkeypatch.delenv('NVIDIA_TF32_OVERRIDE', raising=False)
    done = gpu_mode.tf32_off()
    assert calls == [('cublas', False), ('cudnn', False)]
    assert __import__('os').environ['NVIDIA_TF32_OVERRIDE'] == '0'
    assert done[:3] == ['NVIDIA_TF32_OVERRIDE=0', 'paddle.base.core.set_cublas_switch(False)',
                        'paddle.base.core.set_cudnn_switch(False)']


def test_device_gpu_on_a_cpu_build_is_one_line(capsys):
    from parity import gpu_mode
    if paddle.device.is_compiled_with_cuda():
        pytest.skip('a CUDA build of Paddle: the refusal is for CPU builds')
    argv, rc = gpu_mode.setup(['--device', 'gpu', '--arch', 'vit_small'])
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert rc == 2 and len(err) == 1 and err[0].startswith('error: --device gpu: ') and 'CPU build' in err[0]


def test_paddle_ops_flag_is_taken_out_and_said(capsys):
    from parity import gpu_mode
    from paddle_impl import cpu_kernels, layers
    before = layers.set_fast_layers(None)
    kernels_state = dict(cpu_kernels._state)
    try:
        argv, rc = gpu_mode.setup(['--paddle-ops', '--arch', 'resnet50'])
        assert rc is None and argv == ['--arch', 'resnet50'] and not layers.fast_layers_enabled()
        assert 'MOCO_CPU_KERNELS=0 and MOCO_FAST_LAYERS=0' in capsys.readouterr().out
    finally:
        import os
        for k in gpu_mode.paddle_ops_env():
            os.environ.pop(k, None)
        layers.set_fast_layers(before)
        cpu_kernels._state.update(kernels_state)  # what setup() switched off for the rest of the process
