"""The ViT's memory-saving layers (paddle_impl/layers.py): attention_k recomputes, in the backward, the [B, H, N, N]
attention matrix that autograd would otherwise keep from the forward; the MLP's GELU keeps its slope instead of its
input (layers._GeluK), so fc2(GELU(h)) keeps as many [B, N, 4C] tensors as a plain composition (GELU's output and
slope) and evaluates no erf or exp again. Checked here: the same values and gradients as the plain Paddle
composition (float64 and float32, gradients only for the inputs that need one), that those activations are
really not kept (counted with Paddle's saved-tensor hooks, against the plain composition that does keep them),
and that the ViT falls back to its plain module calls where something observes them (hooks, a replaced
forward)."""
import numpy as np
import pytest

import paddle
import paddle.nn.functional as F

from paddle_impl import cpu_kernels, layers, vits
from test_cpu_kernels import _rel, _t

pytestmark = pytest.mark.skipif(not cpu_kernels.enabled_by_env() or cpu_kernels.get() is None,
                                reason='our CPU kernels are off or not built here (their fallback is tested elsewhere)')

TOL = {'float64': 1e-12, 'float32': 2e-5}


def _attention_plain(q, k, v, scale):
    return paddle.matmul(F.softmax(paddle.matmul(q, k, transpose_y=True) * scale, axis=-1), v)


@pytest.mark.parametrize('dtype', ['float64', 'float32'])
@pytest.mark.parametrize('needs', [(True, True, True), (False, True, True), (True, False, False)])
def test_attention_matches_plain(dtype, needs):
    rng = np.random.default_rng(1)
    arrays = [(rng.standard_normal((2, 3, 11, 8)) * 2).astype(dtype) for _ in range(3)]
    dout = rng.standard_normal((2, 3, 11, 8)).astype(dtype)
    scale = 8 ** -0.5
    ours = [_t(a, n) for a, n in zip(arrays, needs)]
    ref = [_t(a.astype('float64'), n) for a, n in zip(arrays, needs)]
    y = layers.attention_k(*ours, scale)
    yr = _attention_plain(*ref, scale)
    assert y.dtype == ours[0].dtype
    assert _rel(y.numpy(), yr.numpy()) < TOL[dtype]
    want = [t for t in ours if not t.stop_gradient]
    grads = paddle.grad(y, want, _t(dout, False))
    grads_ref = paddle.grad(yr, [t for t in ref if not t.stop_gradient], _t(dout.astype('float64'), False))
    assert len(grads) == sum(needs)
    for g, gr in zip(grads, grads_ref):
        assert _rel(g.numpy(), gr.numpy()) < TOL[dtype] * 10


def _gelu_linear(h, w, b):
    return layers.linear(layers.gelu(h), w, b)  # what vits.Mlp runs for fc2(act(.)) on the CPU


@pytest.mark.parametrize('dtype', ['float64', 'float32'])
def test_gelu_linear_matches_plain(dtype):
    rng = np.random.default_rng(2)
    h0 = (rng.standard_normal((2, 5, 12)) * 2).astype(dtype)
    w0 = rng.standard_normal((12, 7)).astype(dtype) * 0.3
    b0 = rng.standard_normal(7).astype(dtype)
    dy = rng.standard_normal((2, 5, 7)).astype(dtype)
    h, w, b = _t(h0), _t(w0), _t(b0)
    hr, wr, br = _t(h0.astype('float64')), _t(w0.astype('float64')), _t(b0.astype('float64'))
    y = _gelu_linear(h, w, b)
    yr = F.linear(F.gelu(hr, approximate=False), wr, br)
    assert _rel(y.numpy(), yr.numpy()) < TOL[dtype]
    grads = paddle.grad(y, [h, w, b], _t(dy, False))
    grads_ref = paddle.grad(yr, [hr, wr, br], _t(dy.astype('float64'), False))
    for g, gr in zip(grads, grads_ref):
        assert _rel(g.numpy(), gr.numpy()) < TOL[dtype] * 10
    # a frozen weight and bias: only dh, the same as with everything trained
    w.stop_gradient = b.stop_gradient = True
    (dh,) = paddle.grad(_gelu_linear(h, w, b), [h], _t(dy, False))
    assert _rel(dh.numpy(), grads_ref[0].numpy()) < TOL[dtype] * 10
    # a frozen input (no slope kept): dW and db, the same as with everything trained
    w.stop_gradient = b.stop_gradient = False
    h.stop_gradient = True
    dw, db = paddle.grad(_gelu_linear(h, w, b), [w, b], _t(dy, False))
    assert _rel(dw.numpy(), grads_ref[1].numpy()) < TOL[dtype] * 10
    assert _rel(db.numpy(), grads_ref[2].numpy()) < TOL[dtype] * 10


def _saved_shapes(fn):
    """Shapes of the distinct tensors autograd keeps for the backward while fn() runs."""
    seen = {}

    def pack(t):
        seen.setdefault(t.data_ptr(), tuple(t.shape))
        return t

    with paddle.autograd.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, list(seen.values())


def _small_vit():
    paddle.seed(0)
    return vits.vit_small(img_size=32, patch_size=8, depth=2, embed_dim=32, num_heads=4, num_classes=0)


def test_vit_keeps_no_attention_matrix_and_no_more_mlp_activations():
    model = _small_vit()
    x = paddle.to_tensor(np.random.default_rng(3).standard_normal((3, 3, 32, 32)).astype('float32'))
    n = 1 + (32 // 8) ** 2
    attn_shape, hidden_shape = (3, 4, n, n), (3, n, 128)
    out, shapes = _saved_shapes(lambda: model(x))
    assert attn_shape not in shapes
    assert shapes.count(hidden_shape) == 4  # per block GELU's output (fc2's input) and slope; not fc1's output
    out.sum().backward()
    assert all(p.grad is not None for p in model.parameters() if not p.stop_gradient)
    # the measurement can fail: the plain composition of the same block keeps both
    blk = model.blocks[0]
    tok = paddle.to_tensor(np.random.default_rng(4).standard_normal((3, n, 32)).astype('float32'))
    tok.stop_gradient = False
    _, plain = _saved_shapes(lambda: _attention_plain(tok.reshape([3, n, 4, 8]).transpose([0, 2, 1, 3]),
                                                      tok.reshape([3, n, 4, 8]).transpose([0, 2, 1, 3]),
                                                      tok.reshape([3, n, 4, 8]).transpose([0, 2, 1, 3]), 0.3))
    assert attn_shape in plain
    _, plain_mlp = _saved_shapes(lambda: blk.mlp.fc2(blk.mlp.act(blk.mlp.fc1(tok))))
    assert plain_mlp.count(hidden_shape) == 2  # GELU's output and slope, as in the ViT above


def test_vit_same_numbers_with_plain_module_calls():
    """A hook on the MLP's activation (what parity.trace registers) is called in every block, and outputs and
    gradients agree with the run without hooks."""
    x = paddle.to_tensor(np.random.default_rng(5).standard_normal((2, 3, 32, 32)).astype('float64'))
    paddle.set_default_dtype('float64')
    try:
        model = _small_vit()
    finally:
        paddle.set_default_dtype('float32')
    calls = []
    out = model(x)
    out.sum().backward()
    fused = [p.grad.numpy().copy() for p in model.parameters() if not p.stop_gradient]
    model.clear_gradients()
    handles = [b.mlp.act.register_forward_post_hook(lambda layer, inp, o: calls.append(1)) for b in model.blocks]
    out2 = model(x)
    out2.sum().backward()
    for h in handles:
        h.remove()
    assert len(calls) == len(model.blocks)  # the hooked module was really called
    assert _rel(out2.numpy(), out.numpy()) < 1e-13
    plain = [p.grad.numpy() for p in model.parameters() if not p.stop_gradient]
    for a, b in zip(fused, plain):
        assert _rel(a, b) < 1e-12



class _Im2colRecorder:
    """cpu_kernels.get() stand-in that records the byte size of every column matrix our convolution builds."""

    def __init__(self, module):
        self.module = module
        self.sizes = []

    def moco_im2col(self, x, *args):
        cols = self.module.moco_im2col(x, *args)
        self.sizes.append(int(cols.size) * cols.element_size())
        return cols

    def __getattr__(self, name):
        return getattr(self.module, name)


@pytest.mark.parametrize('images_per_group', [1, 3])
def test_conv_columns_split_by_batch(monkeypatch, images_per_group):
    """With the column matrix capped at `images_per_group` images, the convolution builds only columns under
    the cap (forward and backward) and gives the same output and gradients as F.conv2d in float64."""
    rng = np.random.default_rng(6)
    x0 = rng.standard_normal((7, 3, 13, 11))
    w0 = rng.standard_normal((5, 3, 3, 3))
    dy0 = rng.standard_normal((7, 5, 7, 6))
    per_image = 3 * 3 * 3 * 7 * 6 * 8
    monkeypatch.setattr(layers, 'COLS_CAP_BYTES', per_image * images_per_group)
    rec = _Im2colRecorder(cpu_kernels.get())
    monkeypatch.setattr(cpu_kernels, 'get', lambda: rec)
    x, w = _t(x0), _t(w0)
    y = layers.conv2d_k(x, w, [2, 2], [1, 1])
    dx, dw = paddle.grad(y, [x, w], _t(dy0, False))
    groups = -(-7 // images_per_group)
    assert len(rec.sizes) == 2 * groups  # forward and the weight gradient, per group
    assert max(rec.sizes) <= per_image * images_per_group
    xr, wr = _t(x0), _t(w0)
    yr = F.conv2d(xr, wr, stride=2, padding=1)
    dxr, dwr = paddle.grad(yr, [xr, wr], _t(dy0, False))
    assert _rel(y.numpy(), yr.numpy()) < 1e-13
    assert _rel(dx.numpy(), dxr.numpy()) < 1e-13
    assert _rel(dw.numpy(), dwr.numpy()) < 1e-13
