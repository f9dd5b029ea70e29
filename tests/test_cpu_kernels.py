"""Our CPU kernels (paddle_impl/csrc/cpu_kernels.cc) against their definitions, forward and backward.

float64: the kernels use the C library's exp/erf, so they must equal the definitions to rounding (1e-13).
float32: the polynomial exp/erf must stay within a few float32 ulps of the float64 definition.
The gradients are checked against Paddle's autograd of the definition (composed of Paddle's own ops).
Every compiled instruction-set variant this CPU can run (AVX-512, AVX2/FMA, baseline) is checked (the `isa`
fixture), and the in-place momentum-encoder (EMA), LARS and AdamW kernels are checked against their
definitions in numpy. And the fallback (MOCO_CPU_KERNELS=0, Paddle's own ops) gives the same ViT numbers as the kernels.
"""
import math
import os
import subprocess
import sys

import numpy as np
import pytest

from paddle_impl import cpu_kernels

import paddle  # noqa: E402
import paddle.nn.functional as F  # noqa: E402

from paddle_impl import layers, machine  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(params=cpu_kernels.ISAS)
def isa(request):
    """Runs the test with our kernels' variant for one instruction set, then back to the widest."""
    if request.param not in cpu_kernels.supported_isas():
        pytest.skip(f'this CPU cannot run the {request.param} variant (supported: {cpu_kernels.supported_isas()})')
    assert cpu_kernels.set_isa(request.param) == request.param
    yield request.param
    cpu_kernels.set_isa(None)


def test_isa_variants_match_this_cpu():
    """The C++ side's CPU check agrees with /proc/cpuinfo, and the widest variant is the default."""
    expected = ['generic'] + [i for i in ('avx2', 'avx512') if i in machine.cpu_facts()['isa']]
    assert cpu_kernels.supported_isas() == expected
    assert cpu_kernels.active_isa() == expected[-1]
    assert not any(f.startswith('-m') for f in cpu_kernels.compile_flags())  # the library itself: baseline x86-64


def _python(code, **env):
    """``python -c code`` from the repository root with ``env`` added; asserts it exits 0."""
    r = subprocess.run([sys.executable, '-c', code], env=dict(os.environ, PYTHONPATH=ROOT, **env),
                       capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-2000:]
    return r


def test_isa_forced_by_env():
    code = ('from paddle_impl import cpu_kernels; cpu_kernels.get(); '
            'print(cpu_kernels.active_isa(), cpu_kernels.supported_isas()[-1])')
    out = {}
    for want in ('generic', 'nonsense'):
        r = _python(code, MOCO_CPU_ISA=want)
        out[want] = (r.stdout.split(), r.stderr)
    assert out['generic'][0][0] == 'generic'
    active, widest = out['nonsense'][0]
    assert active == widest and "MOCO_CPU_ISA='nonsense' is not one of" in out['nonsense'][1]


def test_kernels_build_here():
    """The speed claims of the README rest on these kernels: on this machine they must build."""
    assert cpu_kernels.enabled_by_env()
    mod = cpu_kernels.get()
    assert mod is not None, cpu_kernels._state['error']
    assert cpu_kernels.usable(paddle.zeros([2], dtype='float32'))


def test_one_openmp_runtime():
    """Our kernels' OpenMP loops run on the runtime Paddle's own kernels, MKL and oneDNN run on (the wheel's
    libiomp5), not on a second pool of GCC's libgomp: the dynamic linker's record of where the library's
    GOMP_parallel calls were bound, in a process that ran one of its parallel loops."""
    import tempfile
    if not os.path.isfile(os.path.join(os.path.dirname(paddle.__file__), 'libs', 'libiomp5.so')):
        pytest.skip('this Paddle wheel has no libiomp5 (the kernels link libgomp then)')
    assert cpu_kernels.openmp_runtime() == 'libiomp5'
    code = ('import paddle; from paddle_impl import layers, cpu_kernels; assert cpu_kernels.get() is not None; '
            'layers.softmax_scaled(paddle.rand([4, 6, 197, 197]), 0.125)')
    with tempfile.TemporaryDirectory() as tmp:
        _python(code, LD_DEBUG='bindings', LD_DEBUG_OUTPUT=os.path.join(tmp, 'ld'))  # asserts exit 0
        lines = []
        for name in os.listdir(tmp):
            with open(os.path.join(tmp, name)) as f:
                lines += [ln for ln in f if 'moco_cpu_kernels' in ln.split(' to ')[0] and '`GOMP_parallel' in ln]
    assert lines, 'no binding of GOMP_parallel from our kernel library was recorded'
    assert all('/libiomp5.so' in ln.split(' to ')[1] for ln in lines), lines


def _t(a, grad=True):
    t = paddle.to_tensor(a)
    t.stop_gradient = not grad
    return t


def _rel(a, b):
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-300))


TOL = {'float64': 1e-13, 'float32': 2e-6}


def _softmax_ref(x, scale):
    return F.softmax(x * scale, axis=-1)


def _gelu_ref(x):
    return 0.5 * x * (1.0 + paddle.erf(x * (1.0 / math.sqrt(2.0))))


def _ln_ref(x, w, b, eps):
    mean = x.mean(axis=-1, keepdim=True)
    xc = x - mean
    var = (xc * xc).mean(axis=-1, keepdim=True)
    return xc / paddle.sqrt(var + eps) * w + b


@pytest.mark.parametrize('dtype', ['float64', 'float32'])
def test_softmax_forward_backward(dtype, isa):
    rng = np.random.default_rng(0)
    x0 = (rng.standard_normal((2, 3, 17, 33)) * 4).astype(dtype)
    dy0 = rng.standard_normal(x0.shape).astype(dtype)
    scale = 32 ** -0.5
    x = _t(x0)
    y = layers.softmax_scaled(x, scale)
    (dx,) = paddle.grad(y, x, _t(dy0, False))
    # reference in float64 whatever the dtype
    xr = _t(x0.astype('float64'))
    yr = _softmax_ref(xr, scale)
    (dxr,) = paddle.grad(yr, xr, _t(dy0.astype('float64'), False))
    assert y.dtype == x.dtype
    assert _rel(y.numpy(), yr.numpy()) < TOL[dtype]
    assert _rel(dx.numpy(), dxr.numpy()) < TOL[dtype] * 10
    np.testing.assert_allclose(y.numpy().sum(-1), 1.0, rtol=TOL[dtype] * 10)


def test_softmax_extremes(isa):
    """Large and very negative scores: no overflow, no NaN; underflowed entries are (near) 0."""
    x = _t(np.array([[1000.0, 0.0, -1000.0, 999.0], [-1e4, -1e4, -1e4, -1e4]], dtype='float32'), False)
    y = layers.softmax_scaled(x, 1.0).numpy()
    assert np.isfinite(y).all()
    ref = np.exp(np.array([0.0, -1000, -2000, -1.0]) - np.log1p(np.exp(-1.0)))
    np.testing.assert_allclose(y[0], ref, atol=1e-7)
    np.testing.assert_allclose(y[1], 0.25, rtol=1e-6)


@pytest.mark.parametrize('dtype', ['float64', 'float32'])
def test_gelu_forward_backward(dtype, isa):
    rng = np.random.default_rng(1)
    x0 = np.concatenate([rng.standard_normal(5000) * 3, np.linspace(-12, 12, 2000), [0.0, -0.0, 1e-30, 5.0]])
    x0 = x0.astype(dtype).reshape(-1, 4)
    dy0 = rng.standard_normal(x0.shape).astype(dtype)
    x = _t(x0)
    y = layers.gelu_k(x)
    (dx,) = paddle.grad(y, x, _t(dy0, False))
    xr = _t(x0.astype('float64'))
    yr = _gelu_ref(xr)
    (dxr,) = paddle.grad(yr, xr, _t(dy0.astype('float64'), False))
    tol = {'float64': 1e-14, 'float32': 3e-7}[dtype]  # A&S erf: |error| < 1.5e-7 (absolute, scaled by |x|)
    assert np.abs(y.numpy() - yr.numpy()).max() / 12 < tol
    assert np.abs(dx.numpy() - dxr.numpy()).max() / np.abs(dy0).max() < tol * 10
    # and it is Paddle's exact GELU
    np.testing.assert_allclose(y.numpy(), F.gelu(_t(x0, False)).numpy(), atol=1e-6 if dtype == 'float32' else 1e-14)


@pytest.mark.parametrize('dtype', ['float64', 'float32'])
def test_layer_norm_forward_backward(dtype, isa):
    rng = np.random.default_rng(2)
    x0 = (rng.standard_normal((3, 11, 40)) * 2 + 1).astype(dtype)
    x0[0, 0] = 1e-7 * rng.standard_normal(40)  # variance ~1e-14: epsilon dominates (the ViT's cls token)
    w0 = rng.standard_normal(40).astype(dtype)
    b0 = rng.standard_normal(40).astype(dtype)
    dy0 = rng.standard_normal(x0.shape).astype(dtype)
    eps = 1e-6
    x, w, b = _t(x0), _t(w0), _t(b0)
    y = layers.layer_norm_k(x, w, b, eps)
    grads = paddle.grad(y, [x, w, b], _t(dy0, False))
    xr, wr, br = (_t(a.astype('float64')) for a in (x0, w0, b0))
    yr = _ln_ref(xr, wr, br, eps)
    grads_r = paddle.grad(yr, [xr, wr, br], _t(dy0.astype('float64'), False))
    tol = TOL[dtype] * (10 if dtype == 'float32' else 1)
    assert _rel(y.numpy(), yr.numpy()) < tol
    for g, gr in zip(grads, grads_r):
        assert _rel(g.numpy(), gr.numpy()) < tol * 10


def test_layer_norm_grad_only_where_needed():
    rng = np.random.default_rng(3)
    x = _t(rng.standard_normal((4, 8)))
    w, b = _t(np.ones(8), False), _t(np.zeros(8))
    y = layers.layer_norm_k(x, w, b, 1e-5)
    y.sum().backward()
    assert x.grad is not None and b.grad is not None and w.grad is None


def test_non_contiguous_input():
    """A transposed view (Paddle's stride kernels) is read as its values, not its memory."""
    rng = np.random.default_rng(4)
    base = _t(rng.standard_normal((5, 6)).astype('float32'), False)
    view = paddle.transpose(base, [1, 0])
    np.testing.assert_allclose(layers.softmax_scaled(view, 1.0).numpy(),
                               F.softmax(paddle.to_tensor(base.numpy().T), -1).numpy(), rtol=2e-6)
    np.testing.assert_allclose(layers.gelu_k(view).numpy(), F.gelu(paddle.to_tensor(base.numpy().T)).numpy(),
                               atol=1e-6)


def test_fallback_equals_kernels():
    """MOCO_CPU_KERNELS=0 (Paddle's own ops) and the kernels give the same ViT loss and gradients (float64)."""
    code = r'''
import json, sys
import numpy as np
import paddle
from paddle_impl import cpu_kernels
from paddle_impl.models import build_moco
from paddle_impl.layers import model_parameters
paddle.set_default_dtype('float64')
paddle.seed(0)
m = build_moco('vit_small', 16, 32, 0.2, 32, True, patch_size=8, embed_dim=48, depth=2, num_heads=3)
m.train()
rng = np.random.default_rng(0)
x1, x2 = (paddle.to_tensor(rng.standard_normal((4, 3, 32, 32))) for _ in range(2))
loss = m(x1, x2, 0.99)
loss.backward()
g = np.concatenate([p.grad.numpy().ravel() for p in model_parameters(m.base_encoder) if p.grad is not None])
print(json.dumps({'on': cpu_kernels.get() is not None, 'loss': float(loss), 'g': g.tolist()}))
'''
    out = {}
    for flag in ('1', '0'):
        r = _python(code, MOCO_CPU_KERNELS=flag)
        import json
        out[flag] = json.loads(r.stdout.strip().splitlines()[-1])
    assert out['1']['on'] and not out['0']['on']
    assert abs(out['1']['loss'] - out['0']['loss']) <= 1e-13 * abs(out['0']['loss'])
    assert _rel(out['1']['g'], out['0']['g']) < 1e-12


def test_build_failure_falls_back(tmp_path):
    """No compiler: one warning line, and Paddle's own ops run (same numbers)."""
    code = r'''
import numpy as np, paddle
from paddle_impl import cpu_kernels, layers
assert cpu_kernels.get() is None
x = paddle.to_tensor(np.linspace(-3, 3, 12).reshape(3, 4))
print(float(layers.gelu(x).sum()))
'''
    env = dict(os.environ, PYTHONPATH=ROOT, MOCO_KERNEL_CACHE=str(tmp_path), CXX='/nonexistent/c++',
               CC='/nonexistent/cc', PATH='/nonexistent')
    r = subprocess.run([sys.executable, '-c', code], env=env, capture_output=True, text=True, timeout=300,
                       cwd=ROOT)
    assert r.returncode == 0, r.stderr[-2000:]
    warn = [line for line in r.stderr.splitlines() if 'CPU kernels not built' in line]
    assert len(warn) == 1, r.stderr[-2000:]
    x = np.linspace(-3, 3, 12)
    ref = (0.5 * x * (1 + np.vectorize(math.erf)(x / math.sqrt(2)))).sum()
    assert abs(float(r.stdout.strip().splitlines()[-1]) - ref) < 1e-12


CONV_CASES = [  # (N, C, H, W, Co, KH, KW, stride, padding)
    (2, 3, 17, 19, 4, 3, 3, (1, 1), (1, 1)),
    (2, 5, 16, 16, 3, 3, 3, (2, 2), (1, 1)),
    (1, 3, 23, 23, 6, 7, 7, (2, 2), (3, 3)),   # the ResNet stem
    (2, 4, 9, 12, 5, 3, 5, (1, 2), (0, 2)),    # rectangular kernel, per-axis stride and padding
    (1, 2, 5, 5, 2, 5, 5, (1, 1), (0, 0)),     # a single output position
    (2, 3, 16, 16, 4, 8, 8, (8, 8), (0, 0)),   # a patch embedding
]


@pytest.mark.parametrize('case', CONV_CASES)
@pytest.mark.parametrize('dtype', ['float64', 'float32'])
def test_conv2d_against_paddle(case, dtype, isa):
    n, c, h, w, co, kh, kw, stride, padding = case
    rng = np.random.default_rng(5)
    x0 = rng.standard_normal((n, c, h, w)).astype(dtype)
    w0 = rng.standard_normal((co, c, kh, kw)).astype(dtype)
    x, wt = _t(x0), _t(w0)
    y = layers.conv2d_k(x, wt, stride, padding)
    dy0 = rng.standard_normal(y.shape).astype(dtype)
    dx, dw = paddle.grad(y, [x, wt], _t(dy0, False))
    xr, wr = _t(x0.astype('float64')), _t(w0.astype('float64'))
    yr = F.conv2d(xr, wr, stride=list(stride), padding=list(padding))
    dxr, dwr = paddle.grad(yr, [xr, wr], _t(dy0.astype('float64'), False))
    assert y.shape == yr.shape
    tol = 1e-14 if dtype == 'float64' else 2e-6
    for a, b in [(y, yr), (dx, dxr), (dw, dwr)]:
        assert _rel(a.numpy(), b.numpy()) < tol


def test_conv_layer_routing():
    """Conv2D uses the kernels only where they compute the same thing; elsewhere Paddle's convolution."""
    paddle.seed(0)
    x = paddle.randn([1, 4, 8, 8])
    plain = layers.Conv2D(4, 4, 3, padding=1, bias_attr=False)
    assert layers.conv_k_applies(plain, x)
    for kw in (dict(bias_attr=None), dict(groups=2, bias_attr=False), dict(dilation=2, bias_attr=False),
               dict(padding='SAME', bias_attr=False)):
        other = layers.Conv2D(4, 4, 3, **kw)
        assert not layers.conv_k_applies(other, x), kw
        ref = paddle.nn.Conv2D(4, 4, 3, **kw)
        ref.set_state_dict(other.state_dict())
        np.testing.assert_allclose(other(x).numpy(), ref(x).numpy(), rtol=1e-6)
    assert not layers.conv_k_applies(layers.Conv2D(4, 4, 1, bias_attr=False), x)  # 1x1: already a GEMM
    ref = paddle.nn.Conv2D(4, 4, 3, padding=1, bias_attr=False)
    ref.set_state_dict(plain.state_dict())
    np.testing.assert_allclose(plain(x).numpy(), ref(x).numpy(), rtol=2e-6, atol=1e-6)


# ---------------------------------------------------------------------------------------------------------
# the in-place optimizer-side kernels against their definitions (numpy, float64)

def _inplace(op, *arrays_and_attrs, dtype):
    tensors = [paddle.to_tensor(a.astype(dtype)) for a in arrays_and_attrs if isinstance(a, np.ndarray)]
    attrs = [a for a in arrays_and_attrs if not isinstance(a, np.ndarray)]
    tensors[0].stop_gradient = False  # a parameter: run_inplace must lift it for the call and restore it
    cpu_kernels.run_inplace(op, *tensors, *attrs)
    assert not tensors[0].stop_gradient
    return [t.numpy() for t in tensors]


@pytest.mark.parametrize('dtype', ['float64', 'float32'])
def test_ema_kernel(dtype, isa):
    """moco_ema_: p_m <- p_m * m + p_b * (1 - m) (the official update), p_b untouched; odd size (vector tails)."""
    rng = np.random.default_rng(6)
    pm0, pb0 = rng.standard_normal(1037), rng.standard_normal(1037) * 3
    pm0, pb0 = pm0.astype(dtype).astype('float64'), pb0.astype(dtype).astype('float64')
    for m in (0.99, 0.0, 1.0, 0.9961):
        pm, pb = _inplace(cpu_kernels.get().moco_ema_, pm0, pb0, m, dtype=dtype)
        ref = pm0 * m + pb0 * (1 - m)
        tol = 1e-15 if dtype == 'float64' else 2e-7
        assert np.abs(pm - ref).max() <= tol * np.abs(ref).max(), m
        np.testing.assert_array_equal(pb, pb0.astype(dtype))
    # m = 1 keeps p_m, m = 0 copies p_b exactly
    assert np.array_equal(_inplace(cpu_kernels.get().moco_ema_, pm0, pb0, 1.0, dtype=dtype)[0], pm0.astype(dtype))
    assert np.array_equal(_inplace(cpu_kernels.get().moco_ema_, pm0, pb0, 0.0, dtype=dtype)[0], pb0.astype(dtype))


def _lars_ref(p, g, mu, lr, wd, momentum, tc, adapt):
    """The official LARS step (FACTS.md), float64."""
    if adapt:
        d = g + wd * p
        pn, dn = np.linalg.norm(p), np.linalg.norm(d)
        q = tc * pn / dn if pn > 0 and dn > 0 else 1.0
        d = d * q
    else:
        d = g
    mu = momentum * mu + d
    return p - lr * mu, mu


@pytest.mark.parametrize('dtype', ['float64', 'float32'])
def test_lars_kernel(dtype, isa):
    """moco_lars_ on a weight (ndim > 1: weight decay and trust ratio) and on a bias (neither), two steps,
    and the zero-norm cases where the ratio is 1."""
    rng = np.random.default_rng(7)
    lr, wd, momentum, tc = 0.3, 1e-2, 0.9, 0.001
    cases = {
        'weight': (rng.standard_normal(2051), True),
        'bias': (rng.standard_normal(515), False),
        'zero weight': (np.zeros(300), True),  # ||p|| = 0: q = 1
    }
    tol = 1e-14 if dtype == 'float64' else 3e-6
    for name, (p0, adapt) in cases.items():
        p0 = p0.astype(dtype).astype('float64')
        p, mu = p0, np.zeros_like(p0)
        rp, rmu = p0, np.zeros_like(p0)
        for step in range(2):
            g = rng.standard_normal(p0.shape).astype(dtype).astype('float64')
            p, _, mu = _inplace(cpu_kernels.get().moco_lars_, p, g, mu, lr, wd, momentum, tc, adapt, dtype=dtype)
            p, mu = p.astype('float64'), mu.astype('float64')
            rp, rmu = _lars_ref(rp, g, rmu, lr, wd, momentum, tc, adapt)
            assert np.abs(p - rp).max() <= tol * max(np.abs(rp).max(), 1e-300), (name, step)
            assert np.abs(mu - rmu).max() <= tol * max(np.abs(rmu).max(), 1e-300), (name, step)
    # g + wd * p = 0 exactly: the ratio is 1 and the update is 0
    p0 = np.full(64, 2.0)
    p, _, mu = _inplace(cpu_kernels.get().moco_lars_, p0, -wd * p0, np.zeros(64), lr, wd, momentum, tc, True,
                        dtype=dtype)
    assert np.array_equal(p, p0.astype(dtype)) and not mu.any()


def _adamw_ref(p, g, m, v, step, lr, beta1, beta2, eps, wd):
    """torch.optim.AdamW's single-tensor step, written out in float64 (step counts from 1)."""
    p = p * (1 - lr * wd)
    m = beta1 * m + (1 - beta1) * g
    v = beta2 * v + (1 - beta2) * g * g
    bc1, bc2 = 1 - beta1 ** step, 1 - beta2 ** step
    return p - lr / bc1 * m / (np.sqrt(v) / math.sqrt(bc2) + eps), m, v


@pytest.mark.parametrize('dtype', ['float64', 'float32'])
def test_adamw_kernel(dtype, isa):
    """moco_adamw_: three steps against torch's AdamW formula with and without weight decay (odd size: vector
    tails; a zero gradient; gradients of very different scales); the beta powers advance one step each call."""
    rng = np.random.default_rng(8)
    lr, beta1, beta2, eps = 0.01, 0.9, 0.999, 1e-8
    tol = 1e-14 if dtype == 'float64' else 3e-6
    for wd in (0.1, 0.0):
        p0 = rng.standard_normal(1037).astype(dtype).astype('float64')
        p, m, v = p0, np.zeros_like(p0), np.zeros_like(p0)
        rp, rm, rv = p0, np.zeros_like(p0), np.zeros_like(p0)
        b1, b2 = np.array([beta1]), np.array([beta2])
        for step in (1, 2, 3):
            g = (rng.standard_normal(p0.shape) * np.logspace(-6, 2, p0.size)).astype(dtype).astype('float64')
            if step == 2:
                g[:10] = 0.0
            out = _inplace(cpu_kernels.get().moco_adamw_, p, g, m, v, b1, b2, lr, beta1, beta2, eps, wd, dtype=dtype)
            p, _, m, v, b1, b2 = (a.astype('float64') for a in out)
            rp, rm, rv = _adamw_ref(rp, g, rm, rv, step, lr, beta1, beta2, eps, wd)
            for got, want in ((p, rp), (m, rm), (v, rv)):
                assert np.abs(got - want).max() <= tol * np.abs(want).max(), (wd, step)
            np.testing.assert_allclose([b1[0], b2[0]], [beta1 ** (step + 1), beta2 ** (step + 1)],
                                       rtol=1e-15 if dtype == 'float64' else 1e-6)
        assert np.abs(p - p0).max() > 1e-3  # it moved
    with pytest.raises(Exception, match='beta powers'):
        _inplace(cpu_kernels.get().moco_adamw_, p0, p0, p0, p0, np.ones(2), np.ones(1), lr, beta1, beta2, eps, 0.1,
                 dtype=dtype)


def test_paddle_grad_wrt_the_input_with_paddles_own_ops(monkeypatch):
    """The documented way around the fast layers' limit (docs/training.md "Known limit"): with our kernels and
    the fast layers off, paddle.grad of a ViT's output with respect to the image alone works and equals the
    image's gradient from loss.backward() through the fast layers (float64)."""
    from paddle_impl import vits
    paddle.set_default_dtype('float64')
    try:
        paddle.seed(0)
        model = vits.vit_small(img_size=32, patch_size=8, depth=1, embed_dim=32, num_heads=4, num_classes=0)
    finally:
        paddle.set_default_dtype('float32')
    x = paddle.to_tensor(np.random.default_rng(9).standard_normal((2, 3, 32, 32)), stop_gradient=False)
    model(x).square().sum().backward()  # the fast layers (and our kernels, where built)
    want = x.grad.numpy().copy()
    monkeypatch.setitem(cpu_kernels._state, 'tried', True)
    monkeypatch.setitem(cpu_kernels._state, 'module', None)
    old = layers.set_fast_layers(False)
    try:
        (got,) = paddle.grad(model(x).square().sum(), [x])
    finally:
        layers.set_fast_layers(old)
    assert np.abs(want).max() > 0
    # two different float64 op sequences; the class token's variance ~1e-12 at init (LayerNorm, see
    # layers.LayerNorm) amplifies their rounding to ~1e-10
    assert _rel(got.numpy(), want) < 1e-9
