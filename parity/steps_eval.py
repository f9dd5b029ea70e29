"""K training steps of the evaluation trainers, product against reference, in float64.

Linear classification: the product's step is ``paddle_impl.engine.lincls_step`` (what main_lincls'
train_one_epoch calls per batch) with main_lincls' own pieces around it: ``freeze_all_but_head``, its ``SGD``
(torch's SGD with momentum written out), ``adjust_learning_rate`` once per epoch; the reference is the
official loop in torch_ref/lincls.py (``train`` per epoch over the same batches).

Fine-tuning: the product's step is ``paddle_impl.engine.finetune_step`` (what main_finetune's train_one_epoch
calls), with main_finetune's ``build_optimizer`` (AdamW with DeiT's weight-decay groups), ``build_criterion``
(label smoothing 0.1, mixup/cutmix off: their draws are random) and ``deit_lr`` per epoch; the reference is
torch_ref/finetune.py (timm's parameter groups, LabelSmoothingCrossEntropy, CosineLRScheduler values).

Both start from identical weights (torch_ref builds them seeded, convert/bridge moves them) and take identical
batches. Compared (parity.compare.compare, relative L2): the loss of every step, every parameter after the
last step (Paddle names and layouts), the optimizer state (SGD momentum buffers; AdamW moments), and for
linear classification that the frozen backbone is bitwise unchanged on both sides. The key part of every qkv
bias has an exactly zero gradient (softmax ignores a constant added to all of a query's logits); AdamW turns
its rounding-noise gradient into updates at the 1e-11 scale on each side independently, so that part is
judged on absolute error (NULL_ATOL), as parity/steps.py does for MoCo.
"""
import argparse

import numpy as np
import paddle
import torch

from convert.bridge import torch_to_paddle_model
from convert.keymap import torch_to_paddle
from paddle_impl import engine
from paddle_impl import main_finetune as pft
from paddle_impl import main_lincls as plc
from paddle_impl import models as pm
from torch_ref import finetune as tft
from torch_ref import lincls as tlc
from torch_ref import models as tm

from .compare import compare as _compare
from .scenarios import paddle_dtype
from .steps import split_null  # the MoCo names it also knows never occur in a classifier

TOL = 1e-9        # float64, relative L2
NULL_ATOL = 1e-9  # float64, absolute, for the null directions (qkv key bias)
TINY_VIT = {'patch_size': 8, 'embed_dim': 32, 'depth': 2, 'num_heads': 2}


def compare(check, a, b, tol, note=''):
    """parity.compare.compare, and a non-finite value on either side fails the row, naming the tensor."""
    row = _compare(check, a, b, tol, note=note)
    bad = [k for k in sorted(b) if not (np.isfinite(np.asarray(a.get(k, np.nan))).all()
                                        and np.isfinite(np.asarray(b[k])).all())]
    if bad:
        row.passed, row.worst = False, f'non-finite: {bad[0]}'
    return row


def build_pair(arch, num_classes, img_size, vit_kwargs, seed=0, paddle_kwargs=None):
    """A torch_ref classifier (seeded, float64) and a paddle_impl twin holding the same weights."""
    torch.manual_seed(seed)
    tmodel = tm.encoder_factory(arch, img_size=img_size, **vit_kwargs)(num_classes=num_classes).double()
    with paddle_dtype('float64'):
        pmodel = pm.encoder_factory(arch, img_size=img_size, **vit_kwargs, **(paddle_kwargs or {}))(
            num_classes=num_classes)
    torch_to_paddle_model(tmodel, pmodel)
    return tmodel, pmodel


def batches(steps, batch, img_size, num_classes, seed=1):
    rng = np.random.default_rng(seed)
    return [(rng.standard_normal((batch, 3, img_size, img_size)), rng.integers(0, num_classes, batch))
            for _ in range(steps)]


def _torch_named(tmodel, trainable=True):
    return torch_to_paddle({k: p.detach().numpy().copy() for k, p in tmodel.named_parameters()
                            if p.requires_grad == trainable})[0]


def _paddle_named(pmodel, trainable=True):
    return {k: np.asarray(p.numpy()) for k, p in pmodel.named_parameters()
            if (not p.stop_gradient) == trainable and not k.endswith(('_mean', '_variance'))}


def _param_rows(what, p, t):
    main_p, null_p = split_null(p)
    main_t, null_t = split_null(t)
    rows = [compare(f'{what}: parameters after the last step', main_p, main_t, TOL)]
    if null_t:
        row = compare(f'{what}: qkv key biases (null direction, judged on abs error)', null_p, null_t, None,
                      note=f'judged: max abs <= {NULL_ATOL:.0e} (rel L2 is noise here)')
        row.tol, row.passed = NULL_ATOL, row.passed and bool(row.max_abs <= NULL_ATOL)  # NaN fails
        rows.append(row)
    return rows


# ------------------------------------------------------------------------------------------ lincls

def run_lincls_steps(arch='vit_small', steps=6, steps_per_epoch=2, batch=4, img_size=32, num_classes=5, lr=3.0,
                     weight_decay=1e-3, vit_kwargs=None, seed=0):
    """K steps of linear classification on both sides; returns the compare rows."""
    vit_kwargs = dict(TINY_VIT if vit_kwargs is None and arch in pm.VIT_ARCHS else (vit_kwargs or {}))
    tmodel, pmodel = build_pair(arch, num_classes, img_size, vit_kwargs, seed)
    tlc.prepare_linear_classifier(tmodel, arch)  # the head is re-initialised on the torch side ...
    torch_to_paddle_model(tmodel, pmodel)        # ... and copied over
    plc.freeze_all_but_head(pmodel, arch)
    frozen_t0, frozen_p0 = _torch_named(tmodel, False), _paddle_named(pmodel, False)
    data = batches(steps, batch, img_size, num_classes, seed + 1)
    epochs = -(-steps // steps_per_epoch)

    t_opt, init_lr = tlc.build_optimizer(tmodel, lr, batch, 0.9, weight_decay)
    t_losses = []
    for epoch in range(epochs):
        tlc.adjust_learning_rate(t_opt, init_lr, epoch, epochs)
        part = data[epoch * steps_per_epoch:(epoch + 1) * steps_per_epoch]
        t_losses += [r[0] for r in tlc.train([(torch.from_numpy(x), torch.from_numpy(y)) for x, y in part], tmodel,
                                             torch.nn.CrossEntropyLoss(), t_opt)]

    head = [(n, p) for n, p in pmodel.named_parameters() if not p.stop_gradient]
    p_opt = plc.SGD(head, lr * batch / 256, momentum=0.9, weight_decay=weight_decay)
    criterion, p_losses = paddle.nn.CrossEntropyLoss(), []
    pmodel.eval()  # main_lincls trains in eval mode (BN statistics frozen), as the official code
    for i, (x, y) in enumerate(data):
        if i % steps_per_epoch == 0:
            plc.adjust_learning_rate(p_opt, lr * batch / 256, i // steps_per_epoch, epochs)
        res = engine.lincls_step(pmodel, paddle.to_tensor(x), paddle.to_tensor(y), p_opt, criterion)
        p_losses.append(res.loss)

    kw = plc.linear_keyword(arch)
    t_buf = {f'{kw}.{n}': t_opt.state[getattr(getattr(tmodel, kw), n)]['momentum_buffer'].numpy()
             for n in ('weight', 'bias')}
    rows = [compare(f'lincls {arch}: loss of each of {steps} steps', {'loss': np.array(p_losses)},
                    {'loss': np.array(t_losses)}, TOL)]
    rows += _param_rows(f'lincls {arch}', _paddle_named(pmodel), _torch_named(tmodel))
    rows.append(compare(f'lincls {arch}: SGD momentum buffers', {k: v.numpy() for k, v in p_opt.buffers.items()},
                        torch_to_paddle(t_buf)[0], TOL))
    rows.append(compare(f'lincls {arch}: frozen backbone unchanged (paddle, bitwise)', _paddle_named(pmodel, False),
                        frozen_p0, 0.0))
    rows.append(compare(f'lincls {arch}: frozen backbone unchanged (torch, bitwise)', _torch_named(tmodel, False),
                        frozen_t0, 0.0))
    return rows


# ---------------------------------------------------------------------------------------- finetune

def run_finetune_steps(arch='vit_small', steps=6, steps_per_epoch=2, batch=4, img_size=32, num_classes=5,
                       lr=5e-4 * 1024 / 512, weight_decay=0.05, smoothing=0.1, warmup_epochs=1, vit_kwargs=None,
                       seed=0):
    """K steps of DeiT fine-tuning on both sides (pos_embed trained, as DeiT); returns the compare rows."""
    vit_kwargs = dict(TINY_VIT if vit_kwargs is None and arch in pm.VIT_ARCHS else (vit_kwargs or {}))
    tmodel, pmodel = build_pair(arch, num_classes, img_size, vit_kwargs, seed,
                                {'pos_embed_dtype': None} if arch in pm.VIT_ARCHS else None)
    if arch in pm.VIT_ARCHS:  # DeiT trains the position embedding (main_finetune's default)
        tmodel.pos_embed.requires_grad = True
        pmodel.pos_embed.stop_gradient = False
    data = batches(steps, batch, img_size, num_classes, seed + 1)
    epochs = -(-steps // steps_per_epoch)
    sched = dict(epochs=epochs, warmup_epochs=warmup_epochs, warmup_lr=1e-6, min_lr=1e-5)

    t_opt = tft.build_optimizer(tmodel, lr, weight_decay)
    t_losses = []
    for i, (x, y) in enumerate(data):
        if i % steps_per_epoch == 0:
            tft.set_lr(t_opt, tft.deit_lr(i // steps_per_epoch, lr, **sched))
        t_losses.append(tft.train_step(tmodel, torch.from_numpy(x), torch.from_numpy(y), t_opt,
                                       lambda o, t: tft.label_smoothing_cross_entropy(o, t, smoothing)))

    with paddle_dtype('float64'):  # the optimizer's own tensors (lr, beta powers) in the parameters' dtype
        p_opt = pft.build_optimizer(pmodel, lr, weight_decay)
        ns = argparse.Namespace(mixup=0., cutmix=0., smoothing=smoothing)
        _, criterion = pft.build_criterion(ns, num_classes, batch, seed)
        p_losses = []
        pmodel.train()
        for i, (x, y) in enumerate(data):
            if i % steps_per_epoch == 0:
                p_opt.set_lr(pft.deit_lr(i // steps_per_epoch, lr, **sched))
            res = engine.finetune_step(pmodel, paddle.to_tensor(x), paddle.to_tensor(y), p_opt, criterion)
            p_losses.append(res.loss)

    rows = [compare(f'finetune {arch}: loss of each of {steps} steps', {'loss': np.array(p_losses)},
                    {'loss': np.array(t_losses)}, TOL)]
    rows += _param_rows(f'finetune {arch}', _paddle_named(pmodel), _torch_named(tmodel))
    by_uid = {p.name: k for k, p in pmodel.named_parameters()}
    for acc, key in (('moment1', 'exp_avg'), ('moment2', 'exp_avg_sq')):
        p_state = {by_uid[u]: np.asarray(v.numpy()) for u, v in p_opt._accumulators[acc].items()}
        t_state = torch_to_paddle({n: t_opt.state[p][key].numpy() for n, p in tmodel.named_parameters()
                                   if p in t_opt.state})[0]
        rows += _param_rows(f'finetune {arch}: AdamW {key}', p_state, t_state)
    return rows


def all_rows(steps=6):
    return run_lincls_steps(steps=steps) + run_finetune_steps(steps=steps)
