"""One fine-tuning step of the DeiT recipe (timm 0.4-era semantics) in torch: what paddle_impl/main_finetune.py
twins, for the K-step parity of parity/steps_eval.py.

- AdamW (betas 0.9/0.999, eps 1e-8) over two parameter groups, as timm's create_optimizer builds them:
  weight decay on every trainable parameter except 1-D ones, biases and the names the model lists in
  no_weight_decay() (pos_embed, cls_token), which get weight decay 0;
- label-smoothing cross-entropy (timm LabelSmoothingCrossEntropy): (1 - s) * NLL + s * mean(-log p);
- learning rate per epoch: timm CosineLRScheduler as DeiT configures it (warm-up from warmup_lr over
  warmup_epochs without a warm-up prefix, cosine from lr to min_lr over all epochs);
- per iteration: model.train(), forward, loss, zero_grad, backward, step.
"""
import math

import torch
import torch.nn.functional as F

NO_WEIGHT_DECAY = ('pos_embed', 'cls_token')


def param_groups_weight_decay(model, weight_decay, no_weight_decay_list=NO_WEIGHT_DECAY):
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if param.ndim <= 1 or name.endswith('.bias') or name in no_weight_decay_list:
            no_decay.append(param)
        else:
            decay.append(param)
    return [{'params': no_decay, 'weight_decay': 0.}, {'params': decay, 'weight_decay': weight_decay}]


def build_optimizer(model, lr, weight_decay, betas=(0.9, 0.999), eps=1e-8):
    return torch.optim.AdamW(param_groups_weight_decay(model, weight_decay), lr=lr, betas=betas, eps=eps)


def label_smoothing_cross_entropy(x, target, smoothing=0.1):
    logprobs = F.log_softmax(x, dim=-1)
    nll_loss = -logprobs.gather(dim=-1, index=target.unsqueeze(1)).squeeze(1)
    smooth_loss = -logprobs.mean(dim=-1)
    return ((1. - smoothing) * nll_loss + smoothing * smooth_loss).mean()


def deit_lr(epoch, lr, epochs, warmup_epochs=5, warmup_lr=1e-6, min_lr=1e-5):
    if epoch < warmup_epochs:
        return warmup_lr + epoch * (lr - warmup_lr) / warmup_epochs
    if epoch >= epochs:
        return min_lr
    return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * epoch / epochs))


def set_lr(optimizer, lr):
    for group in optimizer.param_groups:
        group['lr'] = lr


def train_step(model, samples, targets, optimizer, criterion):
    """One iteration of DeiT's train_one_epoch (no mixup, no AMP); returns the loss."""
    model.train()
    outputs = model(samples)
    loss = criterion(outputs, targets)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return loss.item()
