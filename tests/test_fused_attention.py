"""The fused ViT attention (csrc/kernels_impl.h attention_fwd_k / attention_bwd_k, layers.fused_attention):
softmax(scale q k^T) v of every head read straight from the qkv projection's output [B, N, 3C] and written
into [B, N, C], the backward recomputing the attention matrix.

Checked against the definition composed of Paddle's own ops (reshape, transpose, matmul, softmax) and its
autograd in float64, in every compiled instruction-set variant this CPU runs, float64 to rounding and float32
to float32 rounding; the ViT's Attention layer takes it and equals the unfused path; bad shapes are refused;
without a usable BLAS (or with MOCO_CPU_ATTENTION=0) the unfused path runs with one warning at most; results
do not depend on the thread count.
"""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

import paddle
import paddle.nn.functional as F

from paddle_impl import cpu_kernels, layers, vits
from test_cpu_kernels import _rel, _t, isa  # noqa: F401 - isa: the fixture (every ISA variant)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))



def test_fused_attention_is_usable_here():
    """The ViT speed of the README rests on it: on this machine our kernels and Paddle's MKL must load."""
    assert cpu_kernels.attention(paddle.zeros([1])), cpu_kernels.blas_library()


def _definition(qkv, heads, scale):
    """The official Attention.forward after its qkv linear layer (timm's): reshape, permute, attention, back."""
    B, N, C3 = qkv.shape
    D = C3 // (3 * heads)
    t = qkv.reshape([B, N, 3, heads, D]).transpose([2, 0, 3, 1, 4])
    q, k, v = t[0], t[1], t[2]
    attn = F.softmax(paddle.matmul(q, k, transpose_y=True) * scale, axis=-1)
    return paddle.matmul(attn, v).transpose([0, 2, 1, 3]).reshape([B, N, heads * D])


SHAPES = [(2, 17, 3, 8), (1, 1, 2, 4), (3, 5, 1, 3), (1, 50, 6, 64)]  # (B, N, heads, head dim)


@pytest.mark.parametrize('shape', SHAPES, ids=lambda s: 'x'.join(map(str, s)))
@pytest.mark.parametrize('dtype', ['float64', 'float32'])
def test_attention_forward_backward(dtype, shape, isa):
    B, N, H, D = shape
    rng = np.random.default_rng(B * 100 + N)
    qkv0 = (rng.standard_normal((B, N, 3 * H * D)) * 2).astype(dtype)
    dout0 = rng.standard_normal((B, N, H * D)).astype(dtype)
    scale = D ** -0.5
    qkv = _t(qkv0)
    out = layers.fused_attention(qkv, H, scale)
    (dqkv,) = paddle.grad(out, qkv, _t(dout0, False))
    ref_in = _t(qkv0.astype('float64'))
    ref = _definition(ref_in, H, scale)
    (dref,) = paddle.grad(ref, ref_in, _t(dout0.astype('float64'), False))
    tol = {'float64': 1e-13, 'float32': 2e-6}[dtype]
    assert out.shape == [B, N, H * D] and dqkv.shape == [B, N, 3 * H * D]
    assert _rel(out.numpy(), ref.numpy()) < tol
    assert _rel(dqkv.numpy(), dref.numpy()) < tol * 10


def test_no_gradient_needed_runs_the_forward_only():
    rng = np.random.default_rng(0)
    qkv = _t(rng.standard_normal((2, 7, 24)), grad=False)
    out = layers.fused_attention(qkv, 2, 0.5)
    assert out.stop_gradient and _rel(out.numpy(), _definition(qkv, 2, 0.5).numpy()) < 1e-13


@pytest.mark.parametrize('bad', [
    ('qkv not [B, N, 3 C]', lambda m: m.moco_attention(paddle.zeros([2, 5, 10]), 2, 0.5)),
    ('a 2-D input', lambda m: m.moco_attention(paddle.zeros([5, 12]), 2, 0.5)),
    ('scale <= 0', lambda m: m.moco_attention(paddle.zeros([1, 5, 12]), 2, 0.0)),
    ('dout of the wrong shape', lambda m: m.moco_attention_grad(paddle.zeros([1, 5, 12]), paddle.zeros([1, 5, 12]),
                                                                2, 0.5)),
], ids=lambda b: b[0] if isinstance(b, tuple) else b)
def test_bad_shapes_are_refused(bad):
    with pytest.raises(Exception, match='moco_attention'):
        bad[1](cpu_kernels.get())


def test_called_where_it_cannot_run_it_says_so(monkeypatch):
    monkeypatch.setenv('MOCO_CPU_ATTENTION', '0')
    with pytest.raises(RuntimeError, match='fused_attention: not usable here'):
        layers.fused_attention(paddle.zeros([1, 5, 12]), 2, 0.5)


def test_vit_attention_takes_the_fused_kernel_and_equals_the_unfused_path(monkeypatch):
    """paddle_impl's ViT Attention layer (float64, training): the fused path is taken, and its output and
    every gradient equal those of the unfused path (MOCO_CPU_ATTENTION=0) to rounding."""
    calls = []
    real = vits.fused_attention
    monkeypatch.setattr(vits, 'fused_attention', lambda *a: calls.append(a[1:]) or real(*a))
    old = paddle.get_default_dtype()
    paddle.set_default_dtype('float64')
    try:
        paddle.seed(3)
        attn = vits.Attention(64, num_heads=4)
    finally:
        paddle.set_default_dtype(old)
    x0 = np.random.default_rng(5).standard_normal((2, 9, 64))
    results = {}
    for setting in ('1', '0'):
        monkeypatch.setenv('MOCO_CPU_ATTENTION', setting)
        attn.clear_gradients()
        x = _t(x0)
        y = attn(x)
        (y * y).sum().backward()
        results[setting] = [y.numpy(), x.grad.numpy()] + [p.grad.numpy() for p in attn.parameters()]
    assert calls == [(4, 0.25)]  # once, with the heads and the scale of head dim 16, and not when turned off
    for a, b in zip(results['1'], results['0']):
        assert _rel(a, b) < 1e-13


_CODE = r'''
import json, numpy as np, paddle
from paddle_impl import cpu_kernels, layers
rng = np.random.default_rng(7)
qkv = paddle.to_tensor(rng.standard_normal((4, 33, 3 * 6 * 16)).astype('float32')); qkv.stop_gradient = False
out = layers.fused_attention(qkv, 6, 0.25) if cpu_kernels.attention(qkv) else None
if out is None:
    print(json.dumps({'fused': False})); raise SystemExit
(g,) = paddle.grad(out, qkv, paddle.to_tensor(rng.standard_normal(out.shape).astype('float32')))
print(json.dumps({'fused': True, 'out': out.numpy().tobytes().hex(), 'grad': g.numpy().tobytes().hex()}))
'''


def _run(**env):
    r = subprocess.run([sys.executable, '-c', _CODE], env=dict(os.environ, PYTHONPATH=ROOT, **env),
                       capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-2000:]
    return json.loads(r.stdout.strip().splitlines()[-1]), r.stderr


def test_results_do_not_depend_on_the_thread_count():
    """Each (image, head) is one thread's work in a fixed order, MKL's products on that thread: 1 and 2 threads
    give the same bits, and so does MKL told not to adjust its threads inside parallel regions."""
    one, _ = _run(OMP_NUM_THREADS='1')
    two, _ = _run(OMP_NUM_THREADS='2')
    fixed, _ = _run(OMP_NUM_THREADS='2', MKL_DYNAMIC='FALSE')
    assert one['fused'] and two['fused'] and fixed['fused']
    assert one['out'] == two['out'] == fixed['out'] and one['grad'] == two['grad'] == fixed['grad']


def test_without_blas_the_unfused_path_runs_with_one_warning(tmp_path):
    res, err = _run(MOCO_BLAS_LIB=str(tmp_path / 'missing.so'))
    assert res == {'fused': False}
    assert err.count('BLAS not usable from') == 1 and 'missing.so (no such file)' in err
    not_blas = tmp_path / 'not_blas.so'
    not_blas.write_bytes(b'not a library')
    res, err = _run(MOCO_BLAS_LIB=str(not_blas))
    assert res == {'fused': False} and err.count('BLAS not usable from') == 1
    res, err = _run(MOCO_CPU_ATTENTION='0')
    assert res == {'fused': False} and 'BLAS' not in err
