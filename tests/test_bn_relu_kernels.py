"""ResNet's CPU fast paths: BatchNorm (training mode, float32 NCHW) and ReLU's backward in our kernels, and the
per-CPU convolution routes (1x1 stride 2 through im2col, 3x3 stride 1 on 7x7 outputs through oneDNN, Intel only).

The kernels are checked against their definitions in float64 (numpy) for every ISA variant this CPU runs; the
layers against Paddle's own kernels (fast layers off) in float32, and torch's running-statistics rule."""
import numpy as np
import pytest

from paddle_impl import cpu_kernels

if cpu_kernels.get() is None:  # pragma: no cover - the suite builds them (test_cpu_kernels checks that)
    pytest.skip('our CPU kernels are not built here', allow_module_level=True)

import paddle  # noqa: E402
import paddle.nn.functional as F  # noqa: E402

from paddle_impl import layers, resnet  # noqa: E402
from test_cpu_kernels import TOL, _rel, _t, isa  # noqa: E402,F401  (isa: the fixture)


def _bn_ref(x, w, b, eps):
    axes = (0, 2, 3)
    m = x.mean(axis=axes, keepdims=True)
    v = x.var(axis=axes, keepdims=True)
    xh = (x - m) / np.sqrt(v + eps)
    return xh * w.reshape(1, -1, 1, 1) + b.reshape(1, -1, 1, 1), xh, v


def _bn_grad_ref(x, w, dy, eps):
    _, xh, v = _bn_ref(x, w, np.zeros_like(w), eps)
    n = x.size / x.shape[1]
    db = dy.sum(axis=(0, 2, 3))
    dw = (dy * xh).sum(axis=(0, 2, 3))
    dx = w.reshape(1, -1, 1, 1) / np.sqrt(v + eps) * (dy - db.reshape(1, -1, 1, 1) / n - xh * dw.reshape(1, -1, 1, 1) / n)
    return dx, dw, db


SHAPES = [(4, 5, 6, 7), (2, 3, 1, 1), (3, 17, 16, 33), (8, 40, 7, 7)]  # odd sizes: vector tails, HW = 1, blocks


@pytest.mark.parametrize('dtype', ['float64', 'float32'])
@pytest.mark.parametrize('shape', SHAPES)
def test_batch_norm_forward_kernel(dtype, shape, isa):
    """y from the batch statistics, and torch's running update (momentum = weight of the batch, unbiased
    variance), on data with a large mean (the shifted sums must not lose it to cancellation)."""
    rng = np.random.default_rng(1)
    x = rng.standard_normal(shape) * 3 + 50
    w, b = rng.standard_normal(shape[1]), rng.standard_normal(shape[1])
    rm, rv = rng.standard_normal(shape[1]), rng.random(shape[1]) + 0.5
    xd = x.astype(dtype).astype(np.float64)  # the values the kernel sees
    tensors = [paddle.to_tensor(a.astype(dtype)) for a in (x, w, b, rm, rv)]
    y, mean, rstd = cpu_kernels.get().moco_batch_norm_(*tensors, 1e-5, 0.1)[:3]
    want, _, v = _bn_ref(xd, w.astype(dtype), b.astype(dtype), 1e-5)
    n = x.size / shape[1]
    tol = TOL[dtype] * 10 if dtype == 'float64' else 2e-5  # float32: |x| ~ 50, std 3
    assert _rel(y.numpy(), want) < tol
    assert _rel(mean.numpy(), xd.mean(axis=(0, 2, 3))) < TOL[dtype]
    assert _rel(rstd.numpy(), 1 / np.sqrt(v.ravel() + 1e-5)) < TOL[dtype] * 10
    assert _rel(tensors[3].numpy(), 0.9 * rm.astype(dtype) + 0.1 * xd.mean(axis=(0, 2, 3))) < TOL[dtype] * 10
    assert _rel(tensors[4].numpy(), 0.9 * rv.astype(dtype) + 0.1 * v.ravel() * n / (n - 1)) < TOL[dtype] * 10


@pytest.mark.parametrize('dtype', ['float64', 'float32'])
@pytest.mark.parametrize('shape', SHAPES)
def test_batch_norm_backward_kernel(dtype, shape, isa):
    rng = np.random.default_rng(2)
    x = (rng.standard_normal(shape) * 3 + 50).astype(dtype)
    w, dy = rng.standard_normal(shape[1]).astype(dtype), rng.standard_normal(shape).astype(dtype)
    xd = x.astype(np.float64)
    mean = xd.mean(axis=(0, 2, 3)).astype(dtype)
    rstd = (1 / np.sqrt(xd.var(axis=(0, 2, 3)) + 1e-5)).astype(dtype)
    dx, dw, db = cpu_kernels.get().moco_batch_norm_backward(*(paddle.to_tensor(a) for a in (x, w, mean, rstd, dy)))
    want = _bn_grad_ref(*(a.astype(np.float64) for a in (x, w, dy)), 1e-5)
    tol = TOL[dtype] * 100 if dtype == 'float64' else 5e-5
    # dx relative to the size of its terms, w * rstd * dy (with two values per channel dx itself is ~0)
    scale = np.abs(w).max() / np.sqrt(x.astype(np.float64).var(axis=(0, 2, 3)).min() + 1e-5) * np.abs(dy).max()
    assert np.abs(dx.numpy() - want[0]).max() / scale < tol
    for got, ref in zip((dw, db), want[1:]):
        assert _rel(got.numpy(), ref) < tol


def test_batch_norm_kernels_refuse_bad_input():
    k = cpu_kernels.get()
    x, c = paddle.randn([2, 3, 4, 4]), paddle.ones([3])
    with pytest.raises(Exception, match='per-channel'):
        k.moco_batch_norm_(x, paddle.ones([4]), c, c.clone(), c.clone(), 1e-5, 0.1)
    with pytest.raises(Exception, match='more than one value'):
        k.moco_batch_norm_(paddle.randn([1, 3, 1, 1]), c, c, c.clone(), c.clone(), 1e-5, 0.1)
    with pytest.raises(Exception, match='NCHW'):
        k.moco_batch_norm_backward(paddle.randn([2, 3]), c, c, c, paddle.randn([2, 3]))
    with pytest.raises(Exception, match='per-channel'):
        k.moco_batch_norm_backward(x, c, paddle.ones([4]), c, paddle.randn([2, 3, 4, 4]))


def _bn_run(fast, x, gy, w, b, train=True):
    old = layers.set_fast_layers(fast)
    try:
        bn = layers.BatchNorm2D(x.shape[1])
        bn.weight.set_value(w)
        bn.bias.set_value(b)
        bn.train() if train else bn.eval()
        xt = _t(x)
        y = bn(xt)
        (y * paddle.to_tensor(gy)).sum().backward()
        y2 = bn(_t(x * 0.5 + 1.0, grad=False))  # no gradient: the forward kernel alone (a momentum encoder)
        return [a.numpy() for a in (y, xt.grad, bn.weight.grad, bn.bias.grad, y2, bn._mean, bn._variance)]
    finally:
        layers.set_fast_layers(old)


def test_batch_norm_layer_equals_paddles_kernel_and_torch_rule():
    """BatchNorm2D in float32 with our kernels against the same layer on Paddle's kernel (fast layers off):
    output, all three gradients, the no-gradient call and torch's running statistics after two updates."""
    rng = np.random.default_rng(3)
    x = (rng.standard_normal((8, 16, 9, 9)) * 2 + 1).astype('float32')
    gy = rng.standard_normal(x.shape).astype('float32')
    w, b = rng.standard_normal(16).astype('float32'), rng.standard_normal(16).astype('float32')
    calls = []
    real = cpu_kernels.get().moco_batch_norm_backward

    class Spy:
        def __getattr__(self, name):
            return getattr(mod, name)

        def moco_batch_norm_backward(self, *a):
            calls.append(1)
            return real(*a)
    mod = cpu_kernels.get()
    state = cpu_kernels._state['module']
    cpu_kernels._state['module'] = Spy()
    try:
        ours = _bn_run(True, x, gy, w, b)
    finally:
        cpu_kernels._state['module'] = state
    assert calls == [1]
    ref = _bn_run(False, x, gy, w, b)
    for name, got, want in zip(('y', 'dx', 'dw', 'db', 'y2', 'mean', 'var'), ours, ref):
        assert _rel(got, want) < 2e-6, name
    x2 = x.astype(np.float64) * 0.5 + 1.0
    n = x.size / 16
    mean = 0.9 * (0.1 * x.mean(axis=(0, 2, 3))) + 0.1 * x2.mean(axis=(0, 2, 3))
    var = 0.9 * (0.9 + 0.1 * x.astype(np.float64).var(axis=(0, 2, 3)) * n / (n - 1))
    var += 0.1 * x2.var(axis=(0, 2, 3)) * n / (n - 1)
    assert _rel(ours[5], mean) < 2e-6 and _rel(ours[6], var) < 2e-6


def test_batch_norm_layer_other_cases_keep_their_paths():
    """Eval mode, float64 (the parity proof's definitions) and fast layers off never reach our kernels; a
    training batch of one value per channel is refused as torch refuses it."""
    assert not layers._bn_k_applies(layers.BatchNorm2D(3), paddle.zeros([2, 3, 4, 4], dtype='float64'))
    old = layers.set_fast_layers(False)
    try:
        assert not layers._bn_k_applies(layers.BatchNorm2D(3), paddle.zeros([2, 3, 4, 4]))
    finally:
        layers.set_fast_layers(old)
    assert layers._bn_k_applies(layers.BatchNorm2D(3), paddle.zeros([2, 3, 4, 4]))
    rng = np.random.default_rng(4)
    x, gy = rng.standard_normal((4, 3, 5, 5)).astype('float32'), rng.standard_normal((4, 3, 5, 5)).astype('float32')
    w, b = np.ones(3, 'float32'), np.zeros(3, 'float32')
    for got, want in zip(_bn_run(True, x, gy, w, b, train=False), _bn_run(False, x, gy, w, b, train=False)):
        np.testing.assert_array_equal(got, want)
    bn = layers.BatchNorm2D(3)
    bn.train()
    with pytest.raises(ValueError, match='more than one value per channel'):
        bn(paddle.zeros([1, 3, 1, 1]))


@pytest.mark.parametrize('dtype', ['float64', 'float32'])
def test_relu_backward_kernel(dtype, isa):
    rng = np.random.default_rng(5)
    y = np.maximum(rng.standard_normal(1037), 0).astype(dtype)
    y[:5] = [0.0, np.nan, np.inf, -0.0, 1e-30]
    dy = rng.standard_normal(1037).astype(dtype)
    got = cpu_kernels.get().moco_relu_backward(paddle.to_tensor(y), paddle.to_tensor(dy)).numpy()
    want = np.where(y > 0, dy, 0).astype(dtype)
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize('dtype', ['float64', 'float32'])
def test_relu_layer_equals_paddles(dtype):
    """layers.relu_ (resnet.ReLU): in place, and the same output and gradient bits as Paddle's relu_."""
    rng = np.random.default_rng(6)
    a, g = rng.standard_normal((4, 8, 5, 5)).astype(dtype), rng.standard_normal((4, 8, 5, 5)).astype(dtype)
    outs = []
    for f in (F.relu_, resnet.ReLU()):
        x = _t(a)
        h = x * 1.5
        y = f(h)
        assert y.data_ptr() == h.data_ptr()  # in place
        (y * paddle.to_tensor(g)).sum().backward()
        outs.append((y.numpy(), x.grad.numpy()))
    np.testing.assert_array_equal(outs[0][0], outs[1][0])
    np.testing.assert_array_equal(outs[0][1], outs[1][1])
    with paddle.no_grad():
        np.testing.assert_array_equal(layers.relu_(paddle.to_tensor(a)).numpy(), np.maximum(a, 0))


def test_conv_routes_by_cpu(monkeypatch):
    """Intel: 1x1 stride-2 convolutions through im2col (same numbers as Paddle's), 3x3 stride 1 on 7x7 outputs
    through oneDNN; elsewhere (AMD, other) Paddle's 1x1 and im2col for those 3x3."""
    x = paddle.randn([2, 8, 14, 14])
    conv = layers.Conv2D(8, 16, 1, stride=2, bias_attr=False)
    x7, w3 = paddle.zeros([1, 512, 7, 7]), paddle.zeros([512, 512, 3, 3])
    monkeypatch.setitem(layers._CPU, 'vendor', 'amd')
    assert not layers.conv_k_applies(conv, x)
    assert not layers.onednn_conv_wins(x7, w3, [3, 3, 1, 1, 1, 1], [7, 7])
    monkeypatch.setitem(layers._CPU, 'vendor', 'intel')
    assert layers.conv_k_applies(conv, x)
    assert not layers.conv_k_applies(layers.Conv2D(8, 16, 1, bias_attr=False), x)  # stride 1: Paddle's
    assert not layers.conv_k_applies(conv, x.astype('float64'))
    assert layers.onednn_conv_wins(x7, w3, [3, 3, 1, 1, 1, 1], [7, 7])
    assert not layers.onednn_conv_wins(x7, w3, [3, 3, 2, 2, 1, 1], [4, 4])
    ref = paddle.nn.Conv2D(8, 16, 1, stride=2, bias_attr=False)
    ref.set_state_dict(conv.state_dict())
    xs, xr = _t(x.numpy()), _t(x.numpy())
    gy = paddle.randn([2, 16, 7, 7])
    ys, yr = conv(xs), ref(xr)
    (ys * gy).sum().backward()
    (yr * gy).sum().backward()
    assert _rel(ys.numpy(), yr.numpy()) < 2e-6
    assert _rel(xs.grad.numpy(), xr.grad.numpy()) < 2e-6
    assert _rel(conv.weight.grad.numpy(), ref.weight.grad.numpy()) < 2e-6
    assert layers.cpu_vendor() == 'intel'
