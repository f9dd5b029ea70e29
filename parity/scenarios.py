"""Parity scenarios: one MoCo v3 training forward/backward on both sides, compared tensor by tensor.

Weights are built by torch_ref (seeded) and moved into paddle_impl through convert/ (the key map).
Deterministic parts (sin-cos position embedding) are built independently on both sides; random parts
(initialisation) are compared by distribution against the formulas of the official code.
"""
import contextlib
import math

import numpy as np
import paddle
import torch

from convert import bridge
from convert.keymap import torch_to_paddle
from paddle_impl import models as pm
from paddle_impl import vits as pvits
from torch_ref import models as tm
from torch_ref import vits as tvits

from .compare import ATOL, TOL, Row, compare, flag, nonfinite

ARCHS = tm.ARCHS


@contextlib.contextmanager
def paddle_dtype(dtype):
    old = paddle.get_default_dtype()
    paddle.set_default_dtype(dtype)
    try:
        yield
    finally:
        paddle.set_default_dtype(old)


@contextlib.contextmanager
def torch_dtype(dtype):
    """torch's default dtype for building a model: float64 builds what the original builds under a float64
    default (every tensor float64 except those it creates with an explicit dtype: the ViT's float32 pos_embed)."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(getattr(torch, dtype))
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def build_pair(arch, dtype='float64', img_size=32, dim=256, mlp_dim=1024, T=0.2, seed=0, stop_grad_conv1=False,
               **vit_kwargs):
    """torch_ref MoCo (seeded) and a paddle_impl twin holding the same weights, both in ``dtype``.
    Built under that default dtype, with no cast afterwards: each tensor keeps the dtype the official code
    gives it (float64 mode: the ViT's pos_embed is float32 on both sides, as in the original)."""
    torch.manual_seed(seed)
    paddle.seed(seed)
    with torch_dtype(dtype):
        tmod = tm.build_moco(arch, dim, mlp_dim, T, img_size=img_size, stop_grad_conv1=stop_grad_conv1, **vit_kwargs)
    with paddle_dtype(dtype):
        pmod = pm.build_moco(arch, dim, mlp_dim, T, img_size=img_size, stop_grad_conv1=stop_grad_conv1, **vit_kwargs)
    bridge.torch_to_paddle_model(tmod, pmod)
    return tmod, pmod


def torch_features(encoder, x):
    """tm.backbone_features, also for the original code's ViT: on timm 0.4.9 its forward_features already
    returns the class token ([B, D]), on timm 1.0 every token ([B, N, D])."""
    if hasattr(encoder, 'forward_features'):
        f = encoder.forward_features(x)
        return f[:, 0] if f.ndim == 3 else f
    return tm.backbone_features(encoder, x)


def _np(t):
    return t.detach().cpu().numpy() if isinstance(t, torch.Tensor) else np.asarray(t.numpy())


def _torch_param_grads(module, prefix=''):
    grads = {prefix + k: p.grad.detach().cpu().numpy() for k, p in module.named_parameters() if p.grad is not None}
    return torch_to_paddle(grads)[0]


def _paddle_param_grads(layer, prefix=''):
    return {prefix + k: np.asarray(p.grad.numpy()) for k, p in layer.named_parameters() if p.grad is not None}


def _paddle_state(layer):
    return bridge.paddle_state_numpy(layer)


def _torch_state(module):
    return torch_to_paddle(bridge.torch_state_numpy(module))[0]


def _frozen_names_torch(tmod):
    return sorted(torch_to_paddle({k: np.zeros(1) for k, p in tmod.named_parameters() if not p.requires_grad})[0])


def _frozen_names_paddle(pmod):
    return sorted(k for k, p in pmod.named_parameters() if p.stop_gradient and not _is_buf(k))


def inputs(dtype, batch, img_size, seed):
    rng = np.random.default_rng(seed + 1000)
    x1 = rng.standard_normal((batch, 3, img_size, img_size)).astype(dtype)
    x2 = rng.standard_normal((batch, 3, img_size, img_size)).astype(dtype)
    return x1, x2


def run_forward_backward(arch, dtype='float64', img_size=32, batch=8, dim=256, mlp_dim=1024, T=0.2, m=0.99,
                         seed=0, stop_grad_conv1=None, pair=None, **vit_kwargs):
    """Rows for: backbone features, projector and predictor outputs, the MoCo loss, every gradient,
    the frozen sets, the momentum encoder after the update inside forward, BN running statistics."""
    if stop_grad_conv1 is None:
        stop_grad_conv1 = arch in tm.VIT_ARCHS and 'conv' not in arch
    tol = TOL[dtype]
    tmod, pmod = pair or build_pair(arch, dtype, img_size, dim, mlp_dim, T, seed, stop_grad_conv1, **vit_kwargs)
    # a no-grad forward in train mode changes nothing but BN running statistics: keep them to restore
    t_bufs = {k: v.clone() for k, v in tmod.named_buffers()}
    p_bufs = {k: v.clone() for k, v in pmod.named_parameters() if _is_buf(k)}
    x1, x2 = inputs(dtype, batch, img_size, seed)
    tx1, tx2, px1, px2 = torch.from_numpy(x1), torch.from_numpy(x2), paddle.to_tensor(x1), paddle.to_tensor(x2)
    rows = []

    # 1. features, projector, predictor (train mode: batch statistics), then restore the weights
    tmod.train()
    pmod.train()
    with torch.no_grad():
        tf = torch_features(tmod.base_encoder, tx1)
        tp = tmod.base_encoder(tx1)
        tq = tmod.predictor(tp)
    with paddle.no_grad():
        pf = pm.backbone_features(pmod.base_encoder, px1)
        pp = pmod.base_encoder(px1)
        pq = pmod.predictor(pp)
    rows.append(compare('forward: backbone features', {'features': _np(pf)}, {'features': _np(tf)}, tol['output']))
    rows.append(compare('forward: projector output', {'proj': _np(pp)}, {'proj': _np(tp)}, tol['output']))
    rows.append(compare('forward: predictor output', {'pred': _np(pq)}, {'pred': _np(tq)}, tol['output']))
    with torch.no_grad():
        for k, v in tmod.named_buffers():
            v.copy_(t_bufs[k])
    for k, v in pmod.named_parameters():
        if k in p_bufs:
            v.set_value(p_bufs[k])

    # 2. one MoCo training forward + backward
    lt = tmod(tx1, tx2, m)
    lt.backward()
    lp = pmod(px1, px2, m)
    lp.backward()
    rows.append(compare('loss: MoCo contrastive (q1,k2)+(q2,k1)', {'loss': _np(lp)}, {'loss': _np(lt)},
                        tol['output']))
    gt = _torch_param_grads(tmod)
    gp = _paddle_param_grads(pmod)
    rows.append(compare('grad: every trainable parameter', gp, gt, tol['grad'], atol=ATOL[dtype]))

    ft, fp = _frozen_names_torch(tmod), _frozen_names_paddle(pmod)
    expect = {k for k in ft if k.startswith('momentum_encoder.')}
    expect_frozen_ok = (ft == fp and len(expect) == sum(1 for _ in tmod.momentum_encoder.parameters())
                        and not any(k in gt for k in ft) and not any(k in gp for k in fp))
    extra = []
    if arch in tm.VIT_ARCHS:
        extra.append('base_encoder.pos_embed')
        if stop_grad_conv1 and 'conv' not in arch:
            extra += ['base_encoder.patch_embed.proj.weight', 'base_encoder.patch_embed.proj.bias']
    expect_frozen_ok = expect_frozen_ok and all(k in ft for k in extra)
    rows.append(flag('frozen: no grad for momentum enc / pos_embed' + (' / conv1' if len(extra) > 1 else ''),
                     expect_frozen_ok, note=f'{len(ft)} frozen tensors on each side'))

    rows.append(compare('momentum encoder after update in forward',
                        {k: v for k, v in _paddle_state(pmod.momentum_encoder).items() if not _is_buf(k)},
                        {k: v for k, v in _torch_state(tmod.momentum_encoder).items() if not _is_buf(k)},
                        tol['state']))
    bt = {k: v for k, v in _torch_state(tmod).items() if _is_buf(k)}
    bp = {k: v for k, v in _paddle_state(pmod).items() if _is_buf(k)}
    if bt:
        rows.append(compare('BN running mean/var after the step', bp, bt, tol['state'], atol=ATOL[dtype]))
    return rows


def _is_buf(k):
    return k.endswith('._mean') or k.endswith('._variance')


def pos_embed_rows(arch, grids=(2, 4, 7, 14)):
    """The sin-cos table built independently by each side, vs a float64 numpy evaluation of the formula."""
    dim = tvits.ARCH_CONFIGS[arch][1]
    a, b, ref = {}, {}, {}
    for g in grids:
        for gh, gw in ((g, g), (g, g + 1)):
            name = f'{gh}x{gw}'
            b[name] = tvits.build_2d_sincos_position_embedding(gh, gw, dim).numpy()
            a[name] = pvits.build_2d_sincos_position_embedding(gh, gw, dim).numpy()
            ref[name] = sincos_reference(gh, gw, dim)
    # computed in float32 on each side, as the official code does: float32 tolerance
    return [compare(f'pos_embed: paddle vs torch built independently', a, b, 1e-6, note=f'dim {dim}'),
            compare(f'pos_embed: torch vs float64 formula', b, ref, 1e-6)]


def sincos_reference(gh, gw, dim, temperature=10000.):
    w, h = np.meshgrid(np.arange(gw, dtype=np.float64), np.arange(gh, dtype=np.float64), indexing='ij')
    omega = 1. / temperature ** (np.arange(dim // 4, dtype=np.float64) / (dim // 4))
    ow, oh = np.outer(w.ravel(), omega), np.outer(h.ravel(), omega)
    pe = np.concatenate([np.sin(ow), np.cos(ow), np.sin(oh), np.cos(oh)], axis=1)
    return np.concatenate([np.zeros((1, dim)), pe])[None]


# ---------------------------------------------------------------- initialisation by distribution
def _uniform_std(bound):
    return bound / math.sqrt(3.)


def init_expectations(arch, named, linear_layout):
    """(family, name, expected kind, parameter) for each parameter whose init the official code fixes.
    ``linear_layout``: 'torch' ([out, in]) or 'paddle' ([in, out])."""
    out = []
    named_shapes = {n: tuple(w.shape) for n, w in named}
    for name, w in named:
        shape = tuple(w.shape)
        if name.startswith('momentum_encoder.'):
            continue
        if len(shape) == 2:
            fin, fout = (shape[1], shape[0]) if linear_layout == 'torch' else shape
            if '.head.' in name or '.fc.' in name or name.startswith('predictor.'):
                out.append(('mlp Linear: U(±1/sqrt(in))', name, ('uniform', 1 / math.sqrt(fin)), w))
            elif 'qkv' in name:
                out.append(('vit qkv: U(±sqrt(6/(out/3+in)))', name, ('uniform', math.sqrt(6 / (fout // 3 + fin))), w))
            else:
                out.append(('vit Linear: xavier uniform', name, ('uniform', math.sqrt(6 / (fin + fout))), w))
        elif name.endswith('cls_token'):
            out.append(('cls_token: N(0, 1e-6)', name, ('normal', 1e-6), w))
        elif len(shape) == 4 and arch in tm.VIT_ARCHS:
            o, i, kh, kw = shape
            if 'conv' in arch:
                out.append(('conv stem: U(±1/sqrt(fan_in))', name, ('uniform', 1 / math.sqrt(i * kh * kw)), w))
            else:
                out.append(('patch embed: U(±sqrt(6/(3p²+dim)))', name, ('uniform', math.sqrt(6 / (i * kh * kw + o))), w))
        elif len(shape) == 4:
            o, i, kh, kw = shape
            out.append(('resnet conv: kaiming normal fan_out', name, ('normal', math.sqrt(2 / (o * kh * kw))), w))
        elif (len(shape) == 1 and name.endswith('bias') and 'patch_embed' in name and 'conv' in arch
              and len(named_shapes.get(name[:-4] + 'weight', ())) == 4):
            fin = int(np.prod(named_shapes[name.replace('bias', 'weight')][1:]))
            out.append(('conv stem: U(±1/sqrt(fan_in))', name, ('uniform', 1 / math.sqrt(fin)), w))
        elif name.endswith('bias') and 'fc.bias' not in name:
            out.append(('biases: 0', name, ('const', 0.0), w))
        elif name.endswith('bn3.weight'):
            out.append(('resnet last BN gamma: 0 (zero_init_residual)', name, ('const', 0.0), w))
        elif name.endswith('weight') and len(shape) == 1:
            out.append(('norm weights: 1', name, ('const', 1.0), w))
    return out


def init_rows(arch, img_size=32, dim=256, mlp_dim=1024, seed=0, **vit_kwargs):
    """Per family, on each side: the largest |measured std / expected std - 1| over its tensors, in units
    of max(5 sampling sigmas, 2%) (so <= 1 passes), plus any value outside a uniform bound; constants exactly.
    Tensors under 1000 elements are pooled by expected value."""
    torch.manual_seed(seed)
    paddle.seed(seed)
    tmod = tm.build_moco(arch, dim, mlp_dim, 0.2, img_size=img_size, **vit_kwargs)
    pmod = pm.build_moco(arch, dim, mlp_dim, 0.2, img_size=img_size, **vit_kwargs)
    rows = []
    for side, named, layout in (('torch', [(k, p.detach().double().numpy()) for k, p in tmod.named_parameters()], 'torch'),
                                ('paddle', [(k, np.asarray(p.numpy(), dtype=np.float64)) for k, p in pmod.named_parameters()], 'paddle')):
        fams = {}
        for fam, name, (kind, val), w in init_expectations(arch, named, layout):
            fams.setdefault(fam, []).append((name, kind, val, w))
        for fam, items in sorted(fams.items()):
            kind, val = items[0][1], items[0][2]
            worst, bad = 0.0, ''
            nf = [f'{name} ({nonfinite(w)})' for name, _, _, w in items if nonfinite(w)]
            if nf:  # a NaN/inf weight fails the family, whatever its statistics say
                rows.append(Row(f'init {side}: {fam}', len(items), math.nan, math.nan, 0.0 if kind == 'const' else 1.0,
                                False, worst='NON-FINITE: ' + ', '.join(nf[:3])))
                continue
            if kind == 'const':
                for name, _, _, w in items:
                    err = float(np.max(np.abs(w - val)))
                    if err > worst:
                        worst, bad = err, name
                rows.append(Row(f'init {side}: {fam}', len(items), worst, worst, 0.0, worst == 0.0, worst=bad))
                continue
            big = [(n, v, w) for n, _, v, w in items if w.size >= 1000]
            small = [(n, v, w) for n, _, v, w in items if w.size < 1000]
            groups = [(n, v, w) for n, v, w in big]
            if small:  # pool small tensors that share the same expected value
                by_val = {}
                for n, v, w in small:
                    by_val.setdefault(round(v, 12), []).append((n, w))
                for v, lst in by_val.items():
                    groups.append((lst[0][0] + (f' (+{len(lst) - 1} pooled)' if len(lst) > 1 else ''), v,
                                   np.concatenate([w.ravel() for _, w in lst])))
            viol = False
            for n, v, w in groups:
                exp_std = _uniform_std(v) if kind == 'uniform' else v
                if kind == 'uniform' and np.max(np.abs(w)) > v * (1 + 1e-6):
                    viol = True
                    bad = n + ' exceeds bound'
                # std of a sample of size n has relative sd ~ 1/sqrt(2n); allow 5 sigma + tol floor below
                err = abs(float(np.std(w)) / exp_std - 1)
                lim = max(5 / math.sqrt(2 * w.size), 0.02)
                score = err / lim
                if score > worst:
                    worst, bad = score, bad or n
            rows.append(Row(f'init {side}: {fam}', len(items), worst, 0.0, 1.0, worst <= 1.0 and not viol, worst=bad,
                            note='|std/expected-1| in units of max(5 sigma, 2%)'))
    return rows
