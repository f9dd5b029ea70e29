"""K complete MoCo v3 pre-training iterations on both sides, compared tensor by tensor.

From identical weights (torch_ref builds them seeded, convert/ moves them) and identical random batches,
each iteration does what the official main_moco does per iteration:
    e  = epoch + i / iters_per_epoch                (fractional epoch)
    lr = adjust_learning_rate(optimizer, e, ...)    (warm-up then cosine)
    m  = adjust_moco_momentum(e, ...)               (cosine from moco_m to 1)
    loss = model(x1, x2, m)                         (momentum update inside forward)
    zero grads; loss.backward(); optimizer.step()
Compared: the loss at every step, all trainable parameters after every step, and at the end every
parameter (base encoder, momentum encoder, predictor), every optimizer state tensor (LARS momentum
buffers; AdamW moments and bias-correction powers) and the BN running statistics.

The Paddle side is not a re-implementation of that loop: it is ``paddle_impl.engine.moco_step``, the
function main_moco calls for every iteration, with the optimizer and GradScaler from
``paddle_impl.engine.moco_training_setup`` (what main_moco builds). Only the torch side is written here.

Checks that need no twin, run on each side:
- the frozen parameters (momentum encoder, pos_embed, the patch embedding under stop-grad-conv1) never
  get a gradient; those outside the momentum encoder are bitwise unchanged after K steps (no weight
  decay reached them), and the optimizer step leaves the momentum encoder bitwise unchanged;
- one optimizer step (the last) against a numpy oracle of the official formulas, computed in float64
  from the pre-step parameters, gradients and state: for LARS, 1-D parameters (biases, norms) separately
  from the others, which shows they got no weight decay and no trust-ratio scaling.
"""
import contextlib
import math
import time

import numpy as np
import paddle
import torch

from convert.keymap import torch_to_paddle
from paddle_impl import engine
from torch_ref import models as tm
from torch_ref import optimizer as toptim
from torch_ref import schedules as tsched

from .compare import ATOL, TOL, compare, flag
from .scenarios import build_pair

OPTIMIZERS = ('lars', 'adamw')

# per optimizer: (peak lr as set after batch scaling, weight decay); the official recipes' values
# (R-50 LARS lr .6 wd 1e-6, ViT AdamW lr 1.5e-4 wd .1), lr not scaled down to the tiny test batch so that
# the weights move visibly in a few steps.
DEFAULTS = {'lars': (0.6, 1e-6), 'adamw': (1.5e-4 * 4096 / 256, 0.1)}

# Paddle accumulator name -> torch state key (the bias-correction powers are compared separately)
PADDLE_STATE_TO_TORCH = {'mu': 'mu', 'moment1': 'exp_avg', 'moment2': 'exp_avg_sq'}
ADAM_BETAS = (0.9, 0.999)
ADAM_EPS = 1e-8
BN_STATS = ('_mean', '_variance')
FINAL_NORM_BIASES = ('base_encoder.norm.bias', 'momentum_encoder.norm.bias')
# Parameters whose exact gradient is zero ("null directions") hold only rounding noise; AdamW, which
# divides by sqrt(v) + eps, turns noise gradients into updates of up to ~lr*1e-9 per step, on each side
# independently, so their relative error is meaningless (measured: rel ~1.4, abs 3e-11 after 10 steps,
# torch against itself with 1 vs 2 threads alike). They are compared by absolute error instead.
NULL_ATOL = {'float64': 1e-9, 'float32': None}


# ------------------------------------------------------------------------------------------ helpers
def _is_stat(name):
    return name.rsplit('.', 1)[-1] in BN_STATS


def split_null(d):
    """(main, null) views of a name -> array dict of parameter-shaped tensors. Null directions, whose
    exact gradient is zero: the ViT's final-norm bias (the projector's first BatchNorm removes any
    constant shift of its input) and the key part of every qkv bias (softmax ignores a constant added to
    a query's logits). A qkv bias is split into its 'q,v' part (main) and its 'k' part (null)."""
    main, null = {}, {}
    for k, v in d.items():
        if k in FINAL_NORM_BIASES:
            null[k] = v
        elif k.endswith('.attn.qkv.bias') and np.ndim(v) == 1 and v.shape[0] % 3 == 0:
            n = v.shape[0] // 3
            main[k + '[q,v]'] = np.concatenate([v[:n], v[2 * n:]])
            null[k + '[k]'] = v[n:2 * n]
        else:
            main[k] = v
    return main, null


def torch_params(tmod):
    """Trainable-or-not parameters of the torch model, numpy, Paddle names and layouts."""
    return torch_to_paddle({k: p.detach().cpu().numpy().copy() for k, p in tmod.named_parameters()})[0]


def paddle_params(pmod):
    """Parameters of the Paddle model, without the BN running statistics (buffers in torch)."""
    return {k: np.asarray(p.numpy()) for k, p in pmod.named_parameters() if not _is_stat(k)}


def torch_buffers(tmod):
    return torch_to_paddle({k: b.detach().cpu().numpy().copy() for k, b in tmod.named_buffers()})[0]


def paddle_buffers(pmod):
    return {k: np.asarray(p.numpy()) for k, p in pmod.named_parameters() if _is_stat(k)}


def torch_optimizer_state(opt, tmod):
    """{kind: {param name (Paddle name/layout): array}}; AdamW's ``step`` becomes the bias-correction
    powers beta^(step+1) that Paddle keeps (``beta1_pow_acc``/``beta2_pow_acc`` after ``step`` updates)."""
    out = {}
    for name, p in tmod.named_parameters():
        st = opt.state.get(p, {})
        for key, val in st.items():
            if key == 'step':
                t = float(val)
                out.setdefault('beta1_pow_acc', {})[name] = np.array([ADAM_BETAS[0] ** (t + 1)])
                out.setdefault('beta2_pow_acc', {})[name] = np.array([ADAM_BETAS[1] ** (t + 1)])
            else:
                out.setdefault(key, {})[name] = val.detach().cpu().numpy().copy()
    return {kind: torch_to_paddle(d)[0] for kind, d in out.items()}


def paddle_optimizer_state(opt, pmod):
    """{kind (torch's state key): {param name: array}} from the Paddle optimizer's accumulators."""
    by_uid = {p.name: k for k, p in pmod.named_parameters()}
    out = {}
    for acc, per_param in opt._accumulators.items():
        kind = PADDLE_STATE_TO_TORCH.get(acc, acc)
        for uid, var in per_param.items():
            out.setdefault(kind, {})[by_uid[uid]] = np.asarray(var.numpy())
    return out


def _frozen_torch(tmod):
    return sorted(torch_to_paddle({k: np.zeros(1) for k, p in tmod.named_parameters() if not p.requires_grad})[0])


def _frozen_paddle(pmod):
    return sorted(k for k, p in pmod.named_parameters() if p.stop_gradient and not _is_stat(k))


def _rel(a, b, i):
    k = f'step {i:02d}'
    return abs(float(a[k]) - float(b[k])) / max(abs(float(b[k])), 1e-300)


def _norm(arrays):
    return math.sqrt(sum(float(np.sum(np.square(a, dtype=np.float64))) for a in arrays))


def _amax(arrays):
    return max((float(np.max(np.abs(a))) for a in arrays if np.size(a)), default=0.0)


def batches(steps, batch, img_size, dtype, seed):
    """Identical per-step random views for both sides."""
    rng = np.random.default_rng(seed + 2000)
    for _ in range(steps):
        yield (rng.standard_normal((batch, 3, img_size, img_size)).astype(dtype),
               rng.standard_normal((batch, 3, img_size, img_size)).astype(dtype))


# ------------------------------------------------------------------------------------------ oracle
def oracle_select(named_numpy_grads, max_numel=300_000):
    """Parameters the oracle checks: every one up to ``max_numel`` elements (all 1-D ones and many more)."""
    return sorted(k for k, g in named_numpy_grads.items() if g.size <= max_numel)


def oracle_step(kind, pre, lr, wd, momentum=0.9, tc=0.001):
    """The official update of one parameter in float64 numpy. ``pre``: dict p, g and the state before
    the step (LARS: mu; AdamW: exp_avg, exp_avg_sq, b1pow, b2pow = beta^t of this step). Returns the
    expected p (and state) after it."""
    p = pre['p'].astype(np.float64)
    g = pre['g'].astype(np.float64)
    if kind == 'lars':
        if p.ndim > 1:
            g = g + wd * p
            pn, gn = np.linalg.norm(p), np.linalg.norm(g)
            g = g * (tc * pn / gn if pn > 0 and gn > 0 else 1.0)
        mu = momentum * pre['mu'] + g
        return {'p': p - lr * mu, 'mu': mu}
    b1, b2 = ADAM_BETAS
    p = p * (1 - lr * wd)
    m = b1 * pre['exp_avg'] + (1 - b1) * g
    v = b2 * pre['exp_avg_sq'] + (1 - b2) * g * g
    mhat = m / (1 - pre['b1pow'])
    vhat = v / (1 - pre['b2pow'])
    return {'p': p - lr * mhat / (np.sqrt(vhat) + ADAM_EPS), 'exp_avg': m, 'exp_avg_sq': v}


def _oracle_rows(side, kind, pre, post, lr, wd, momentum, tol):
    """Rows comparing ``post`` (name -> {p, state...}) with the oracle applied to ``pre``."""
    exp1, got1, exp2, got2 = {}, {}, {}, {}
    for name, d in pre.items():
        want = oracle_step(kind, d, lr, wd, momentum)
        exp, got = (exp1, got1) if d['p'].ndim <= 1 else (exp2, got2)
        for key, val in want.items():
            exp[f'{name}:{key}'] = val
            got[f'{name}:{key}'] = post[name][key]
    if kind == 'lars':
        return [compare(f'oracle {side}: LARS step, 1-D params (no decay, no scaling)', got1, exp1, tol),
                compare(f'oracle {side}: LARS step, >1-D params (decay + trust ratio)', got2, exp2, tol)]
    got1.update(got2)
    exp1.update(exp2)
    return [compare(f'oracle {side}: AdamW step (decay on every param with a grad)', got1, exp1, tol)]


def _torch_pre(opt, tmod, kind, names):
    out = {}
    for tname, p in tmod.named_parameters():
        if tname not in names:  # parameter names are equal on both sides (the key map renames buffers only)
            continue
        st = opt.state.get(p, {})
        d = {'p': _t2p(tname, p.detach().numpy()), 'g': _t2p(tname, p.grad.detach().numpy())}
        if kind == 'lars':
            d['mu'] = _t2p(tname, st['mu'].numpy()) if 'mu' in st else np.zeros_like(d['p'])
        else:
            t = float(st['step']) + 1 if 'step' in st else 1.0
            d['exp_avg'] = _t2p(tname, st['exp_avg'].numpy()) if st else np.zeros_like(d['p'])
            d['exp_avg_sq'] = _t2p(tname, st['exp_avg_sq'].numpy()) if st else np.zeros_like(d['p'])
            d['b1pow'], d['b2pow'] = ADAM_BETAS[0] ** t, ADAM_BETAS[1] ** t
        out[tname] = {k: np.array(v, dtype=np.float64, copy=True) for k, v in d.items()}
    return out


def _t2p(tname, arr):
    return torch_to_paddle({tname: arr})[0][tname]


def _torch_post(opt, tmod, kind, names):
    out = {}
    for tname, p in tmod.named_parameters():
        if tname not in names:
            continue
        st = opt.state[p]
        d = {'p': _t2p(tname, p.detach().numpy())}
        for key in (('mu',) if kind == 'lars' else ('exp_avg', 'exp_avg_sq')):
            d[key] = _t2p(tname, st[key].numpy())
        out[tname] = d
    return out


def _paddle_accs(opt, p, kind):
    accs = opt._accumulators
    if kind == 'lars':
        return {'mu': accs['mu'].get(p.name)}
    return {'exp_avg': accs['moment1'].get(p.name), 'exp_avg_sq': accs['moment2'].get(p.name),
            'b1pow': accs['beta1_pow_acc'].get(p.name), 'b2pow': accs['beta2_pow_acc'].get(p.name)}


def _paddle_pre(opt, pmod, kind, names):
    out = {}
    for name, p in pmod.named_parameters():
        if name not in names:
            continue
        d = {'p': np.asarray(p.numpy()), 'g': np.asarray(p.grad.numpy())}
        for key, var in _paddle_accs(opt, p, kind).items():
            if var is not None:
                d[key] = np.asarray(var.numpy())
            elif key in ('b1pow', 'b2pow'):  # first step: Paddle starts the powers at beta
                d[key] = ADAM_BETAS[0 if key == 'b1pow' else 1]
            else:
                d[key] = np.zeros_like(d['p'])
        if kind == 'adamw':
            d['b1pow'], d['b2pow'] = float(np.ravel(d['b1pow'])[0]), float(np.ravel(d['b2pow'])[0])
        out[name] = {k: np.array(v, dtype=np.float64, copy=True) for k, v in d.items()}
    return out


def _paddle_post(opt, pmod, kind, names):
    out = {}
    for name, p in pmod.named_parameters():
        if name not in names:
            continue
        d = {'p': np.asarray(p.numpy())}
        for key, var in _paddle_accs(opt, p, kind).items():
            if key in ('b1pow', 'b2pow'):
                continue
            d[key] = np.asarray(var.numpy())
        out[name] = d
    return out


# ------------------------------------------------------------------------------------------ scenario
@contextlib.contextmanager
def _planted_paddle_optimizer(factory):
    """Make the product's own setup (engine.moco_training_setup) build ``factory``'s optimizer instead
    (a planted difference); the step itself still runs through engine.moco_step."""
    if factory is None:
        yield
        return
    old = engine.build_optimizer
    engine.build_optimizer = factory
    try:
        yield
    finally:
        engine.build_optimizer = old


def run_steps(arch, optimizer, steps=10, dtype='float64', img_size=32, batch=8, dim=32, mlp_dim=64, seed=0,
              stop_grad_conv1=None, lr=None, wd=None, epochs=4, warmup_epochs=1, iters_per_epoch=4,
              momentum=0.9, moco_m=0.99, T=1.0, start_iter=0, per_step=True, atol=None,
              paddle_optimizer=None, torch_optimizer=None, info=None, pair=None, **vit_kwargs):
    """``steps`` MoCo v3 training iterations of ``arch`` with ``optimizer`` ('lars' | 'adamw') on both
    sides in ``dtype``; returns the parity rows (see the module docstring).

    The Paddle side is the product's own training step: ``paddle_impl.engine.moco_training_setup`` builds
    the optimizer (over ``model_parameters``, as main_moco does) and the GradScaler, and every iteration is
    one call of ``paddle_impl.engine.moco_step`` (schedules, autocast, momentum update inside forward,
    backward through the scaler, optimizer step); its ``before_update`` hook is where the harness reads the
    gradients and the optimizer state before the update. Only the torch side is written here.

    lr: the peak learning rate as main_moco holds it after ``scaled_lr`` (default: DEFAULTS), given to both
    sides as the official --lr for the total batch (lr * 256 / batch) and scaled back by each side's own
    ``scaled_lr``; wd: weight decay. The schedule runs over iterations start_iter .. start_iter+steps-1
    with the fractional epoch i / iters_per_epoch (warm-up ``warmup_epochs``, cosine to ``epochs``;
    iteration 0 has lr 0). stop_grad_conv1: default True for the patch-embedding ViTs.
    ``paddle_optimizer`` / ``torch_optimizer``: optional factories ``f(name, parameters, lr, weight_decay,
    momentum)`` replacing build_optimizer (a planted difference). ``info``: a dict that receives timings,
    losses and how far the weights moved. ``pair``: a prebuilt (torch, paddle) model pair (e.g. the
    official code's model, see parity/official.py). ``vit_kwargs`` (e.g. depth=2) go to the ViT factory."""
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer '{optimizer}'; known: {', '.join(OPTIMIZERS)}")
    if stop_grad_conv1 is None:
        stop_grad_conv1 = arch in tm.VIT_ARCHS and 'conv' not in arch
    dlr, dwd = DEFAULTS[optimizer]
    lr = dlr if lr is None else lr
    wd = dwd if wd is None else wd
    base_lr = lr * 256 / batch  # the official --lr that main_moco scales by the total batch
    tol = TOL[dtype]['steps']
    if atol is None:  # judged rows: near-zero tensors pass by abs error; reported rows show the raw error
        atol = ATOL[dtype] if tol is not None else None
    oracle_tol = 1e-12 if dtype == 'float64' else None
    info = {} if info is None else info

    tmod, pmod = pair or build_pair(arch, dtype=dtype, img_size=img_size, dim=dim, mlp_dim=mlp_dim, T=T, seed=seed,
                                    stop_grad_conv1=stop_grad_conv1, **vit_kwargs)
    tmod.train()
    pmod.train()
    lr_torch = tsched.scaled_lr(base_lr, batch)
    topt = (torch_optimizer or toptim.build_optimizer)(optimizer, tmod.parameters(), lr_torch, wd, momentum)
    with _planted_paddle_optimizer(paddle_optimizer):
        popt, scaler, lr_paddle = engine.moco_training_setup(pmod, optimizer, base_lr, batch, wd, momentum)

    init = torch_params(tmod)
    frozen_t, frozen_p = _frozen_torch(tmod), _frozen_paddle(pmod)
    frozen_out = [k for k in frozen_t if not k.startswith('momentum_encoder.')]
    frozen_init_t = {k: init[k].copy() for k in frozen_out}
    frozen_init_p = {k: v.copy() for k, v in paddle_params(pmod).items() if k in frozen_out}
    trainable = [k for k in init if k not in frozen_t]

    rows, loss_t, loss_p, lrs, moms = [], {}, {}, [], []
    sched_diff = [] if lr_torch == lr_paddle else [f'scaled peak lr {lr_torch} vs {lr_paddle}']
    no_grad_ok = frozen_t == frozen_p and len(frozen_t) > 0
    mom_untouched = {'torch': True, 'paddle': True}
    time_t = time_p = 0.0
    for i, (x1, x2) in enumerate(batches(steps, batch, img_size, dtype, seed)):
        it = start_iter + i
        e = it / iters_per_epoch
        last = i == steps - 1

        t0 = time.perf_counter()
        lr_t = tsched.adjust_learning_rate(topt, e, lr_torch, warmup_epochs, epochs)
        m_t = tsched.adjust_moco_momentum(e, moco_m, epochs)
        lt = tmod(torch.from_numpy(x1), torch.from_numpy(x2), m_t)
        topt.zero_grad()
        lt.backward()
        time_t += time.perf_counter() - t0
        no_grad_ok &= all(p.grad is None for p in tmod.parameters() if not p.requires_grad)
        if last:
            gt = {k: p.grad.detach().numpy() for k, p in tmod.named_parameters() if p.grad is not None}
            names = oracle_select(torch_to_paddle(gt)[0])
            pre_t = _torch_pre(topt, tmod, optimizer, names)
            mom_t = {k: p.detach().numpy().copy() for k, p in tmod.momentum_encoder.named_parameters()}
        t0 = time.perf_counter()
        topt.step()
        time_t += time.perf_counter() - t0
        if last:
            post_t = _torch_post(topt, tmod, optimizer, names)
            mom_untouched['torch'] = all(np.array_equal(v, p.detach().numpy())
                                         for (k, v), p in zip(mom_t.items(), tmod.momentum_encoder.parameters()))
            del mom_t

        seen = {}

        def before_update(opt, last=last):
            """Inside the product's step, after backward and before the optimizer step."""
            seen['no_grad'] = all(p.grad is None for k, p in pmod.named_parameters() if p.stop_gradient)
            seen['lr'] = opt.get_lr()
            if last:
                seen['pre'] = _paddle_pre(opt, pmod, optimizer, names)
                seen['mom'] = [np.asarray(p.numpy()).copy() for k, p in pmod.momentum_encoder.named_parameters()
                               if not _is_stat(k)]
        t0 = time.perf_counter()
        res = engine.moco_step(pmod, paddle.to_tensor(x1), paddle.to_tensor(x2), popt, scaler, e=e, lr=lr_paddle,
                               epochs=epochs, warmup_epochs=warmup_epochs, moco_m=moco_m, moco_m_cos=True,
                               before_update=before_update)
        time_p += time.perf_counter() - t0
        no_grad_ok &= seen.get('no_grad', False)
        if last and 'pre' in seen:
            pre_p = seen['pre']
            post_p = _paddle_post(popt, pmod, optimizer, names)
            mom_untouched['paddle'] = all(
                np.array_equal(v, np.asarray(p.numpy()))
                for v, p in zip(seen['mom'], [p for k, p in pmod.momentum_encoder.named_parameters() if not _is_stat(k)]))
        elif last:  # the product skipped the update (non-finite loss): the oracle has nothing to check
            pre_p = post_p = {}

        lrs.append(lr_t)
        moms.append(m_t)
        loss_t[f'step {i:02d}'] = np.array(float(lt.detach()))
        loss_p[f'step {i:02d}'] = np.array(res.loss)
        if lr_t != res.lr or m_t != res.m or seen.get('lr', lr_t) != lr_t:
            sched_diff.append(f'step {i}: lr {lr_t} vs {res.lr} (optimizer {seen.get("lr")}), m {m_t} vs {res.m}')
        if per_step:
            tp, _ = split_null({k: v for k, v in torch_params(tmod).items() if k in trainable})
            pp, _ = split_null({k: v for k, v in paddle_params(pmod).items() if k in trainable})
            rows.append(compare(f'after step {i:2d}: trainable params', pp, tp, tol, atol=atol,
                                note=f'lr {lr_t:.3g} m {m_t:.5f}; loss rel {_rel(loss_p, loss_t, i):.1e}'))

    rows.insert(0, compare(f'loss at each of {steps} steps', loss_p, loss_t, tol,
                           note=f'torch {time_t:.1f}s paddle {time_p:.1f}s'))

    # final state
    tp, pp = torch_params(tmod), paddle_params(pmod)
    null_t, null_p = {}, {}
    for part in ('base_encoder.', 'momentum_encoder.', 'predictor.'):
        keys = [k for k in tp if k.startswith(part)]
        moved = _norm(tp[k] - init[k] for k in keys) / max(_norm(init[k] for k in keys), 1e-300)
        mt, nt = split_null({k: tp[k] for k in keys})
        mp, np_ = split_null({k: pp[k] for k in keys if k in pp})
        null_t.update(nt)
        null_p.update(np_)
        rows.append(compare(f'final params: {part[:-1]}', mp, mt, tol, atol=atol, note=f'moved {moved:.1e} from init'))
    dp, _ = split_null({k: pp[k] - init[k] for k in trainable})
    dt, _ = split_null({k: tp[k] - init[k] for k in trainable})
    rows.append(compare('final change from init (trainable), report', dp, dt, None,
                        note='rel error of the update itself'))
    bt, bp = torch_buffers(tmod), paddle_buffers(pmod)
    if bt or bp:
        rows.append(compare('final BN running mean/var', bp, bt, tol, atol=atol))
    st_t, st_p = torch_optimizer_state(topt, tmod), paddle_optimizer_state(popt, pmod)
    if set(st_t) != set(st_p):
        rows.append(flag('optimizer state kinds match', False, note=f'torch {sorted(st_t)} paddle {sorted(st_p)}'))
    for kind in sorted(set(st_t) & set(st_p)):
        if kind.endswith('_pow_acc'):  # one scalar per parameter, no direction
            rows.append(compare(f'final optimizer state: {kind}', st_p[kind], st_t[kind], tol, atol=atol))
            continue
        mt, nt = split_null(st_t[kind])
        mp, np_ = split_null(st_p[kind])
        null_t.update({f'{k}:{kind}': v for k, v in nt.items()})
        null_p.update({f'{k}:{kind}': v for k, v in np_.items()})
        rows.append(compare(f'final optimizer state: {kind}', mp, mt, tol, atol=atol))
    if null_t or null_p:
        natol = NULL_ATOL[dtype]
        rows.append(compare('null directions (exact grad 0): abs error', null_p, null_t,
                            None if natol is None else 0.0, atol=natol,
                            note=f'final-norm bias, qkv bias [k]; max |value| {_amax(null_t.values()):.1e}'))

    # checks on each side
    rows.append(flag('schedules: lr and moco m equal on both sides', not sched_diff,
                     note='; '.join(sched_diff[:2]) or f'lr {lrs[0]:.3g} .. {lrs[-1]:.3g}, m {moms[0]:.4f} .. {moms[-1]:.4f}'))
    rows.append(flag('frozen params never get a grad (both sides)', no_grad_ok,
                     note=f'{len(frozen_t)} frozen: momentum enc' + (' + ' + ', '.join(frozen_out) if frozen_out else '')))
    if frozen_out:
        same = (all(np.array_equal(frozen_init_t[k], tp[k]) for k in frozen_out)
                and all(np.array_equal(frozen_init_p[k], pp[k]) for k in frozen_out))
        rows.append(flag('frozen params outside momentum enc bitwise unchanged', same,
                         note='no weight decay reached them'))
    rows.append(flag('optimizer step leaves momentum encoder untouched', all(mom_untouched.values()),
                     note=str(mom_untouched)))
    rows += _oracle_rows('torch', optimizer, pre_t, post_t, lrs[-1], wd, momentum, oracle_tol)
    rows += _oracle_rows('paddle', optimizer, pre_p, post_p, lrs[-1], wd, momentum, oracle_tol)
    info.update(time_torch=time_t, time_paddle=time_p, lrs=lrs, moco_m=moms,
                loss_torch=[float(v) for v in loss_t.values()], loss_paddle=[float(v) for v in loss_p.values()])
    return rows
