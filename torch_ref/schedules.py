"""Per-iteration schedules of the official main_moco (learning rate and MoCo momentum), torch side.

The caller passes a fractional epoch ``epoch + i / iters_per_epoch`` and an ``lr`` already scaled by the
total batch size (official: ``args.lr = args.lr * args.batch_size / 256``, see ``scaled_lr``).
"""
import math


def scaled_lr(lr, batch_size):
    """Linear scaling rule of main_moco: base lr for a total batch of 256."""
    return lr * batch_size / 256


def lr_at(epoch, base_lr, warmup_epochs, epochs):
    """Linear warm-up from 0 to ``base_lr`` over ``warmup_epochs``, then a half-cycle cosine to 0 at ``epochs``."""
    if epoch < warmup_epochs:
        return base_lr * epoch / warmup_epochs
    return base_lr * 0.5 * (1. + math.cos(math.pi * (epoch - warmup_epochs) / (epochs - warmup_epochs)))


def adjust_learning_rate(optimizer, epoch, lr, warmup_epochs, epochs):
    """Sets the learning rate of every parameter group to ``lr_at(epoch, ...)`` and returns it."""
    lr = lr_at(epoch, lr, warmup_epochs, epochs)
    for param_group in optimizer.param_groups:
        param_group['lr'] = lr
    return lr


def adjust_moco_momentum(epoch, moco_m, epochs):
    """Cosine schedule of the MoCo momentum from ``moco_m`` at epoch 0 to 1 at ``epochs``."""
    return 1. - 0.5 * (1. + math.cos(math.pi * epoch / epochs)) * (1. - moco_m)
