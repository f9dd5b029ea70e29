"""The run core shared by the trainers (main_moco, main_lincls, main_finetune).

It owns the product's training step: the very function main_moco runs for each iteration is the one the
parity harness (parity/steps.py) drives, so the proof covers the loop users run.
"""
import math
from typing import NamedTuple

import paddle

from paddle_impl import schedules, utils
from paddle_impl.layers import model_parameters
from paddle_impl.optimizer import build_optimizer


class StepResult(NamedTuple):
    loss: float     # the loss averaged over all processes (what main_moco logs)
    lr: float       # the learning rate this step used
    m: float        # the MoCo momentum this step used
    finite: bool    # False: the loss was NaN/inf; no backward and no update were made


def moco_training_setup(model, optimizer_name, base_lr, batch_size, weight_decay, momentum=0.9,
                        amp=False, amp_dtype='float16'):
    """The optimizer and GradScaler exactly as main_moco builds them. ``base_lr`` is the official --lr
    (for a total batch of 256); returns (optimizer, scaler, scaled peak lr)."""
    lr = schedules.scaled_lr(base_lr, batch_size)
    optimizer = build_optimizer(optimizer_name, model_parameters(model), lr, weight_decay, momentum)
    scaler = paddle.amp.GradScaler(enable=amp and amp_dtype == 'float16', init_loss_scaling=2. ** 16)
    return optimizer, scaler, lr


def moco_step(model, x1, x2, optimizer, scaler, *, e, lr, epochs, warmup_epochs, moco_m, moco_m_cos,
              amp=False, amp_dtype='float16', poison=False, before_update=None):
    """One MoCo v3 pre-training iteration as the official main_moco runs it.

    e: the fractional epoch (epoch + i / iters_per_epoch); lr: the peak (batch-scaled) learning rate.
    Sets the scheduled learning rate and MoCo momentum, runs the forward (momentum update inside) under
    autocast, all-reduces the loss for logging, then backward through the scaler and the optimizer step.
    poison: turn the loss into NaN (debug hook). before_update(optimizer): called after backward, before
    the optimizer step (the harness reads gradients and optimizer state there)."""
    cur_lr = schedules.adjust_learning_rate(optimizer, e, lr, warmup_epochs, epochs)
    m = schedules.adjust_moco_momentum(e, moco_m, epochs) if moco_m_cos else moco_m
    with paddle.amp.auto_cast(enable=amp, dtype=amp_dtype, level='O1'):
        loss = model(x1, x2, m)
    if poison:
        loss = loss * float('nan')
    loss_all = float(utils.all_reduce_mean(loss).item())
    if not math.isfinite(loss_all):
        return StepResult(loss_all, cur_lr, m, False)
    optimizer.clear_grad(set_to_zero=False)
    scaler.scale(loss).backward()
    if before_update is not None:
        before_update(optimizer)
    scaler.step(optimizer)
    scaler.update()
    return StepResult(loss_all, cur_lr, m, True)
