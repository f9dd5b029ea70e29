"""The oneDNN direct convolution (paddle_impl/csrc/cpu_kernels.cc, layers.conv2d_onednn) in float32: forward,
backward data and backward weights against the float64 definition, our im2col + GEMM path and Paddle's own
F.conv2d; the dispatch of layers.conv2d_k (float64 never goes to oneDNN; MOCO_ONEDNN_CONV=0 and an
unloadable library fall back to im2col with the same results).

Tolerance: a float32 result that sums n products (n = C*KH*KW for y, Co*KH*KW for dx, N*HO*WO for dw) is
within n * 2^-24 * sum|a*b| of the exact sum, for any order of summation (the standard bound on recursive
summation, plus one rounding of the inputs to float32: the inputs are exact here, drawn in float32). Each
result is checked element-wise against that bound around the float64 result; `sum|a*b|` is the same
convolution of |x| and |w| (or |dy|) in float64. A weight changed by 0.5 in one element moves outputs by
~0.5 * |x| and must fail the check (test_planted_wrong_weight_fails).
"""
import os
import subprocess
import sys

import numpy as np
import pytest

from paddle_impl import cpu_kernels

import paddle  # noqa: E402
import paddle.nn.functional as F  # noqa: E402

from paddle_impl import layers  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
U32 = 2.0 ** -24

# (N, C, H, W, Co, KH, KW, stride, padding, x takes a gradient)
CASES = {
    '3x3_s1_p1': (2, 4, 9, 9, 6, 3, 3, (1, 1), (1, 1), True),
    '3x3_s2_p1': (2, 8, 10, 10, 5, 3, 3, (2, 2), (1, 1), True),
    'stem_7x7_s2_p3': (2, 3, 22, 22, 8, 7, 7, (2, 2), (3, 3), False),
    'nonsquare': (3, 5, 11, 7, 4, 3, 5, (1, 2), (2, 1), True),
    '3x3_s1_p0': (2, 6, 8, 9, 7, 3, 3, (1, 1), (0, 0), True),
}


@pytest.fixture(scope='module', autouse=True)
def onednn_on():
    """oneDNN must load here (Paddle's wheel ships it): the ResNet-50 speed claims rest on it."""
    old = os.environ.get('MOCO_ONEDNN_CONV')
    os.environ['MOCO_ONEDNN_CONV'] = '1'
    assert cpu_kernels.get() is not None, cpu_kernels._state['error']
    assert cpu_kernels.onednn(), f'oneDNN not loaded from {cpu_kernels.onednn_library()}'
    yield
    if old is None:
        del os.environ['MOCO_ONEDNN_CONV']
    else:
        os.environ['MOCO_ONEDNN_CONV'] = old


def _data(case, seed=0):
    n, c, h, w, co, kh, kw, stride, pad, _ = case
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, c, h, w)).astype('float32')
    wt = rng.standard_normal((co, c, kh, kw)).astype('float32')
    ho, wo = (h + 2 * pad[0] - kh) // stride[0] + 1, (w + 2 * pad[1] - kw) // stride[1] + 1
    dy = rng.standard_normal((n, co, ho, wo)).astype('float32')
    return x, wt, dy


def _run(fn, case, x, wt, dy):
    """y, dx (None where x takes no gradient), dw of fn(x, w) with the output gradient dy, as numpy."""
    px, pw = paddle.to_tensor(x), paddle.to_tensor(wt)
    px.stop_gradient = not case[-1]
    pw.stop_gradient = False
    y = fn(px, pw, case)
    ins = [px, pw] if case[-1] else [pw]
    grads = paddle.grad(y, ins, paddle.to_tensor(dy))
    dx = grads[0].numpy() if case[-1] else None
    return y.numpy(), dx, grads[-1].numpy()


def _onednn(x, w, case):
    return layers.conv2d_onednn(x, w, [case[5], case[6], *case[7], *case[8]])


def _im2col(x, w, case):
    geom = [case[5], case[6], *case[7], *case[8]]
    h, w_ = x.shape[2:]
    out_hw = [(h + 2 * case[8][0] - case[5]) // case[7][0] + 1, (w_ + 2 * case[8][1] - case[6]) // case[7][1] + 1]
    return layers._Conv2dK.apply(x, w, geom, out_hw)


def _paddle(x, w, case):
    return F.conv2d(x, w, stride=list(case[7]), padding=list(case[8]))


def _reference(case, x, wt, dy):
    """float64 results and the element-wise error bounds of a float32 computation of them."""
    def run(a, b, g):
        return _run(lambda px, pw, c: F.conv2d(px, pw, stride=list(c[7]), padding=list(c[8])), case, a, b, g)

    x64, w64, dy64 = (a.astype('float64') for a in (x, wt, dy))
    ref = run(x64, w64, dy64)
    mag = run(np.abs(x64), np.abs(w64), np.abs(dy64))
    n, c, _, _, co, kh, kw = case[:7]
    terms = (c * kh * kw, co * kh * kw, n * dy.shape[2] * dy.shape[3])
    bounds = [None if m is None else t * U32 * m + 1e-30 for m, t in zip(mag, terms)]
    return ref, bounds


def _within(got, ref, bounds):
    return all(g is None or bool(np.all(np.abs(g.astype('float64') - r) <= b)) for g, r, b in zip(got, ref, bounds))


@pytest.mark.parametrize('name', list(CASES))
def test_onednn_matches_definition_im2col_and_paddle(name):
    case = CASES[name]
    x, wt, dy = _data(case)
    ref, bounds = _reference(case, x, wt, dy)
    got = {'onednn': _run(_onednn, case, x, wt, dy), 'im2col': _run(_im2col, case, x, wt, dy),
           'paddle': _run(_paddle, case, x, wt, dy)}
    for k, v in got.items():
        assert _within(v, ref, bounds), f'{k}: float32 results outside the rounding bound of the float64 ones'
    # oneDNN and im2col agree with each other within the sum of their two bounds
    assert _within(got['onednn'], [None if a is None else a.astype('float64') for a in got['im2col']],
                   [None if b is None else 2 * b for b in bounds])
    assert got['onednn'][0].shape == ref[0].shape and got['onednn'][2].shape == wt.shape


def test_planted_wrong_weight_fails():
    """The check above can fail: oneDNN run on a weight with one element off by 0.5 is outside the bounds."""
    case = CASES['3x3_s2_p1']
    x, wt, dy = _data(case)
    ref, bounds = _reference(case, x, wt, dy)
    bad = wt.copy()
    bad[1, 2, 0, 1] += 0.5
    y, dx, dw = _run(_onednn, case, x, bad, dy)
    assert not _within([y, None, None], ref, bounds)
    assert not _within([None, dx, None], ref, bounds)
    assert _within(_run(_onednn, case, x, wt, dy), ref, bounds)


def test_conv2d_k_dispatch_and_float64(monkeypatch):
    """conv2d_k sends float32 to oneDNN when MOCO_ONEDNN_CONV=1 and never float64 (nor with =0)."""
    calls = []
    real = layers.conv2d_onednn
    monkeypatch.setattr(layers, 'conv2d_onednn', lambda *a: calls.append(a[0].dtype) or real(*a))
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, 4, 8, 8))
    w = rng.standard_normal((3, 4, 3, 3))
    y32 = layers.conv2d_k(paddle.to_tensor(x, 'float32'), paddle.to_tensor(w, 'float32'), [1, 1], [1, 1])
    assert calls == [paddle.float32]
    y64 = layers.conv2d_k(paddle.to_tensor(x, 'float64'), paddle.to_tensor(w, 'float64'), [1, 1], [1, 1])
    assert calls == [paddle.float32] and y64.dtype == paddle.float64
    ref = F.conv2d(paddle.to_tensor(x), paddle.to_tensor(w), padding=1).numpy()
    assert np.array_equal(y64.numpy(), layers._conv_forward(paddle.to_tensor(x), paddle.to_tensor(w),
                                                              [3, 3, 1, 1, 1, 1], [8, 8]).numpy())
    assert np.allclose(y64.numpy(), ref, rtol=0, atol=1e-12) and np.allclose(y32.numpy(), ref, atol=1e-4)
    monkeypatch.setenv('MOCO_ONEDNN_CONV', '0')
    layers.conv2d_k(paddle.to_tensor(x, 'float32'), paddle.to_tensor(w, 'float32'), [1, 1], [1, 1])
    assert calls == [paddle.float32]


def test_env_off_is_im2col(monkeypatch):
    """MOCO_ONEDNN_CONV=0: conv2d_k's forward and backward are exactly the im2col path's."""
    monkeypatch.setenv('MOCO_ONEDNN_CONV', '0')
    case = CASES['3x3_s2_p1']
    x, wt, dy = _data(case, seed=3)
    via_k = _run(lambda px, pw, c: layers.conv2d_k(px, pw, list(c[7]), list(c[8])), case, x, wt, dy)
    for a, b in zip(via_k, _run(_im2col, case, x, wt, dy)):
        assert np.array_equal(a, b)


def test_negative_right_padding_stays_on_im2col():
    """A shape whose last input rows are never read (oneDNN's right padding < 0) is left to im2col."""
    x = paddle.zeros([1, 2, 6, 6])
    w = paddle.zeros([2, 2, 3, 3])
    assert not layers.onednn_conv_applies(x, w, [3, 3, 2, 2, 0, 0], [2, 2])
    assert layers.onednn_conv_applies(x, w, [3, 3, 2, 2, 1, 1], [3, 3])


_FALLBACK = '''
import numpy as np, paddle
from paddle_impl import cpu_kernels, layers
rng = np.random.default_rng(0)
x = paddle.to_tensor(rng.standard_normal((2, 4, 9, 9)).astype('float32')); x.stop_gradient = False
w = paddle.to_tensor(rng.standard_normal((5, 4, 3, 3)).astype('float32')); w.stop_gradient = False
y = layers.conv2d_k(x, w, [2, 2], [1, 1])
y2 = layers._Conv2dK.apply(x, w, [3, 3, 2, 2, 1, 1], [5, 5])
g = paddle.ones_like(y)
same = all(np.array_equal(a.numpy(), b.numpy()) for a, b in
           zip([y, *paddle.grad(y, [x, w], g)], [y2, *paddle.grad(y2, [x, w], g)]))
print('onednn', cpu_kernels.onednn(), 'same', same)
'''


@pytest.mark.parametrize('lib', ['/nonexistent/libdnnl.so.3', 'libm'])
def test_unloadable_library_falls_back(lib):
    """oneDNN missing, or a library that is not oneDNN: one warning line, conv2d_k = the im2col path."""
    if lib == 'libm':
        import ctypes.util
        lib = ctypes.util.find_library('m')
        lib = next(os.path.join(d, lib) for d in ('/lib/x86_64-linux-gnu', '/usr/lib/x86_64-linux-gnu', '/lib64',
                                                  '/usr/lib64') if os.path.isfile(os.path.join(d, lib)))
    r = subprocess.run([sys.executable, '-c', _FALLBACK], capture_output=True, text=True, timeout=300, cwd=ROOT,
                       env=dict(os.environ, PYTHONPATH=ROOT, MOCO_ONEDNN_CONV='1', MOCO_ONEDNN_LIB=lib))
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.split() == ['onednn', 'False', 'same', 'True']
    warnings = [line for line in r.stderr.splitlines() if 'oneDNN not usable' in line]
    assert len(warnings) == 1 and lib in warnings[0]


def test_default_policy_shapes(monkeypatch):
    """Unset MOCO_ONEDNN_CONV: oneDNN for the ResNet-50 shapes where it measured faster (the 7x7 stem, 3x3 with
    >= 14x14 outputs; on Intel also the last stage's stride-1 3x3), im2col for the last stage's 7x7 outputs and
    for kernels not measured (a ViT patch embedding)."""
    monkeypatch.delenv('MOCO_ONEDNN_CONV', raising=False)

    def goes(c, h, co, k, s):
        x, w = paddle.zeros([1, c, h, h]), paddle.zeros([co, c, k, k])
        ho = (h + 2 * (k // 2 if k < 16 else 0) - k) // s + 1
        return layers.onednn_conv_applies(x, w, [k, k, s, s] + [k // 2 if k < 16 else 0] * 2, [ho, ho])

    assert goes(3, 224, 64, 7, 2) and goes(64, 56, 64, 3, 1) and goes(128, 56, 128, 3, 2)
    assert goes(256, 28, 256, 3, 2) and goes(256, 14, 256, 3, 1)
    monkeypatch.setitem(layers._CPU, 'vendor', 'amd')
    assert not goes(512, 14, 512, 3, 2) and not goes(512, 7, 512, 3, 1)
    monkeypatch.setitem(layers._CPU, 'vendor', 'intel')  # measured there: the stride-1 one faster in oneDNN
    assert not goes(512, 14, 512, 3, 2) and goes(512, 7, 512, 3, 1)
    assert not goes(3, 224, 8, 16, 16)
    x = paddle.zeros([1, 4, 8, 8], dtype='float64')
    assert not layers.onednn_conv_applies(x, paddle.zeros([4, 4, 3, 3], dtype='float64'), [3, 3, 1, 1, 1, 1], [8, 8])


def test_setting_values(monkeypatch, capsys):
    """MOCO_ONEDNN_CONV: 0/1/auto and their spellings; anything else is auto with one warning line."""
    for v, want in (('0', '0'), ('off', '0'), ('1', '1'), ('YES', '1'), ('auto', 'auto'), ('', 'auto')):
        monkeypatch.setenv('MOCO_ONEDNN_CONV', v)
        assert cpu_kernels.onednn_setting() == want
    assert capsys.readouterr().err == ''
    monkeypatch.setitem(cpu_kernels._state, 'warned_onednn_setting', False)
    monkeypatch.setenv('MOCO_ONEDNN_CONV', 'fast')
    assert cpu_kernels.onednn_setting() == 'auto' and cpu_kernels.onednn_setting() == 'auto'
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["moco-v3 paddle: MOCO_ONEDNN_CONV='fast' is not one of 0, 1, auto; using auto"]
