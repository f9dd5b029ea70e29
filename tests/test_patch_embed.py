"""The ViT's patch projection as one GEMM (layers.patch_embed_k, used by vits.PatchEmbed on CPU): the same values
and gradients as Paddle's conv2d + flatten + transpose (float64 and float32, gradients only where needed, a
frozen projection as stop-grad-conv1 makes it), and PatchEmbed falls back to the module call where the conv is
not a plain patch projection or something observes it (hooks, a replaced forward, the fast layers off)."""
import numpy as np
import pytest

import paddle
import paddle.nn.functional as F

from paddle_impl import layers, vits
from test_cpu_kernels import TOL, _rel, _t


def _plain(x, w, b, p):
    return paddle.transpose(F.conv2d(x, w, b, stride=p).flatten(2), [0, 2, 1])


@pytest.mark.parametrize('dtype', ['float64', 'float32'])
@pytest.mark.parametrize('shape', [(2, 3, 32, 48, 16, 5), (3, 1, 24, 24, 8, 7), (1, 2, 4, 4, 4, 3)])
@pytest.mark.parametrize('needs', [(True, True, True), (False, False, True), (False, True, False), (True, False, False)])
def test_matches_conv(dtype, shape, needs):
    n, c, h, w, p, e = shape
    rng = np.random.default_rng(2)
    xs = rng.standard_normal((n, c, h, w)).astype(dtype)
    ws = (rng.standard_normal((e, c, p, p)) / p).astype(dtype)
    bs = rng.standard_normal(e).astype(dtype)
    dy = rng.standard_normal((n, (h // p) * (w // p), e)).astype(dtype)
    outs = []
    for fn in (layers.patch_embed_k, lambda x, w_, b: _plain(x, w_, b, p)):
        x, wt, b = (_t(a, g) for a, g in zip((xs, ws, bs), needs))
        y = fn(x, wt, b)
        wanted = [t for t, g in zip((x, wt, b), needs) if g]
        grads = paddle.grad([y], wanted, [paddle.to_tensor(dy)]) if wanted else []
        outs.append([y.numpy()] + [g.numpy() for g in grads])
    assert outs[0][0].shape == (n, (h // p) * (w // p), e)
    assert len(outs[0]) == len(outs[1]) == 1 + sum(needs)
    for a, b in zip(*outs):
        assert _rel(a, b) <= TOL[dtype]


def test_without_bias_and_without_grad():
    rng = np.random.default_rng(3)
    x = paddle.to_tensor(rng.standard_normal((2, 3, 16, 16)))
    w = paddle.to_tensor(rng.standard_normal((4, 3, 8, 8)))
    with paddle.no_grad():
        y = layers.patch_embed_k(x, w)
    assert y.stop_gradient
    assert _rel(y.numpy(), _plain(x, w, None, 8).numpy()) <= 1e-13


def _count_calls(monkeypatch):
    calls = []
    real = layers.patch_embed_k

    def spy(*a):
        calls.append(1)
        return real(*a)

    monkeypatch.setattr(vits, 'patch_embed_k', spy)
    return calls


@pytest.mark.parametrize('stop_grad_conv1', [True, False])
def test_vit_takes_it_with_the_same_numbers(monkeypatch, stop_grad_conv1):
    """A float64 ViT's output and parameter gradients equal the module path's (fast layers off) to rounding;
    with stop-grad-conv1 the frozen projection gets no gradient."""
    calls = _count_calls(monkeypatch)
    paddle.set_default_dtype('float64')
    try:
        paddle.seed(0)
        model = vits.vit_small(img_size=32, patch_size=16, depth=1, num_classes=5, stop_grad_conv1=stop_grad_conv1)
        x = paddle.to_tensor(np.random.default_rng(4).standard_normal((2, 3, 32, 32)))
        results = []
        for fast in (True, False):
            old = layers.set_fast_layers(fast)
            try:
                y = model(x)
                (y ** 2).sum().backward()
            finally:
                layers.set_fast_layers(old)
            grads = {n: (None if p.grad is None else p.grad.numpy().copy()) for n, p in model.named_parameters()}
            model.clear_gradients(set_to_zero=False)
            results.append((y.numpy(), grads))
            if fast:
                assert len(calls) == 1
        assert len(calls) == 1  # not taken with the fast layers off
    finally:
        paddle.set_default_dtype('float32')
    (y1, g1), (y2, g2) = results
    assert _rel(y1, y2) <= 1e-12
    assert set(g1) == set(g2)
    for n in g1:
        assert (g1[n] is None) == (g2[n] is None), n
        if g1[n] is not None:
            assert _rel(g1[n], g2[n]) <= 1e-11, n
    frozen = g1['patch_embed.proj.weight'] is None and g1['patch_embed.proj.bias'] is None
    assert frozen == stop_grad_conv1


def test_patch_embed_falls_back_where_it_must(monkeypatch):
    calls = _count_calls(monkeypatch)
    x = paddle.randn([2, 3, 32, 32])
    pe = vits.PatchEmbed(32, 16, 3, 8)
    ref = _plain(x, pe.proj.weight, pe.proj.bias, 16).numpy()
    assert _rel(pe(x).numpy(), ref) <= 2e-6 and len(calls) == 1
    seen = []
    h = pe.proj.register_forward_post_hook(lambda layer, inp, out: seen.append(out.shape))
    assert _rel(pe(x).numpy(), ref) <= 2e-6
    assert len(calls) == 1 and seen == [[2, 8, 2, 2]]  # the hook saw the conv's own output
    h.remove()
    pe.proj.forward = lambda t: F.conv2d(t, pe.proj.weight, pe.proj.bias, stride=16)  # a user patch
    pe(x)
    assert len(calls) == 1
    del pe.proj.forward
    pe(x)
    assert len(calls) == 2
    # convolutions that are not a patch projection
    for conv in (paddle.nn.Conv2D(3, 8, 16, stride=8), paddle.nn.Conv2D(3, 8, 16, stride=16, padding=1),
                 paddle.nn.Conv2D(3, 8, 16, stride=16, groups=1, dilation=2), paddle.nn.Conv2D(3, 8, 5, stride=5),
                 paddle.nn.Conv2D(3, 8, 16, stride=16, data_format='NHWC')):
        assert not layers.patch_conv_applies(conv, x), conv
    assert layers.patch_conv_applies(paddle.nn.Conv2D(3, 8, 16, stride=16), x)
    assert layers.patch_conv_applies(paddle.nn.Conv2D(3, 8, [16, 8], stride=[16, 8]), x)
    assert not layers.patch_conv_applies(paddle.nn.Conv2D(3, 8, 16, stride=16), x.astype('float64'))  # dtypes differ
