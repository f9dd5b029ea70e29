"""Linear classification of the official moco-v3 main_lincls.py, as importable functions (torch).

The reference that paddle_impl/main_lincls.py is compared against (tests/test_lincls.py). What the official
script does, piece by piece:
- the classifier is ``head`` (ViT) or ``fc`` (ResNet); every other parameter is frozen (requires_grad
  False) and the classifier is re-initialised: weight normal(0, 0.01), bias 0;
- the backbone comes from the pre-training checkpoint: keys ``module.base_encoder.*`` minus the projector
  (``module.base_encoder.<head|fc>.*``), loaded non-strictly; only the classifier may be missing;
- SGD(momentum, weight decay) over the 2 classifier parameters, lr = lr * batch / 256, set per epoch to
  lr * 0.5 * (1 + cos(pi * epoch / epochs));
- training keeps the model in eval mode (BatchNorm statistics frozen), cross-entropy, top-1 / top-5;
- after the first epoch, every backbone entry of the state dict must still equal the pre-trained one.
"""
import math

import torch
import torch.nn as nn

HEAD_KEYWORD = {'resnet50': 'fc'}


def linear_keyword(arch):
    """Name of the classifier layer: 'fc' for ResNet, 'head' for the ViTs."""
    return HEAD_KEYWORD.get(arch, 'head')


def prepare_linear_classifier(model, arch):
    """Freeze all but the classifier and initialise the classifier (official main_lincls)."""
    kw = linear_keyword(arch)
    for name, param in model.named_parameters():
        if name not in ['%s.weight' % kw, '%s.bias' % kw]:
            param.requires_grad = False
    getattr(model, kw).weight.data.normal_(mean=0.0, std=0.01)
    getattr(model, kw).bias.data.zero_()
    return model


def backbone_from_pretrain(state_dict, arch):
    """The base encoder without its projector, from a pre-training state dict (``module.`` prefix or not)."""
    kw = linear_keyword(arch)
    out = {}
    for k, v in state_dict.items():
        k2 = k[len('module.'):] if k.startswith('module.') else k
        if k2.startswith('base_encoder') and not k2.startswith('base_encoder.%s' % kw):
            out[k2[len('base_encoder.'):]] = v
    return out


def load_pretrained(model, state_dict, arch):
    """Non-strict load of the backbone; asserts that only the classifier is missing."""
    kw = linear_keyword(arch)
    msg = model.load_state_dict(backbone_from_pretrain(state_dict, arch), strict=False)
    assert set(msg.missing_keys) == {'%s.weight' % kw, '%s.bias' % kw}, msg.missing_keys
    return msg


def build_optimizer(model, lr, batch_size, momentum=0.9, weight_decay=0.):
    """(SGD over the classifier, init_lr): ``init_lr = lr * batch_size / 256``."""
    init_lr = lr * batch_size / 256
    parameters = list(filter(lambda p: p.requires_grad, model.parameters()))
    assert len(parameters) == 2  # weight, bias
    optimizer = torch.optim.SGD(parameters, init_lr, momentum=momentum, weight_decay=weight_decay)
    return optimizer, init_lr


def adjust_learning_rate(optimizer, init_lr, epoch, epochs):
    """Decay the learning rate with a half-cycle cosine, once per epoch."""
    cur_lr = init_lr * 0.5 * (1. + math.cos(math.pi * epoch / epochs))
    for param_group in optimizer.param_groups:
        param_group['lr'] = cur_lr
    return cur_lr


def accuracy(output, target, topk=(1,)):
    """Precision@k for each k (in percent)."""
    with torch.no_grad():
        maxk = max(topk)
        batch_size = target.size(0)
        _, pred = output.topk(maxk, 1, True, True)
        pred = pred.t()
        correct = pred.eq(target.view(1, -1).expand_as(pred))
        res = []
        for k in topk:
            correct_k = correct[:k].reshape(-1).float().sum(0, keepdim=True)
            res.append(correct_k.mul_(100.0 / batch_size))
        return res


def _capped(topk, output):
    # the official code needs at least 5 classes for top-5; smaller test sets get top-min(k, classes)
    return tuple(min(k, output.size(1)) for k in topk)


def train(train_loader, model, criterion, optimizer, topk=(1, 5)):
    """One epoch as the official train(): model.eval() (BN frozen), forward, CE, SGD step.
    Returns the per-iteration (loss, acc1, acc5) values."""
    model.eval()
    records = []
    for images, target in train_loader:
        output = model(images)
        loss = criterion(output, target)
        acc1, acc5 = accuracy(output, target, topk=_capped(topk, output))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        records.append((loss.item(), acc1.item(), acc5.item()))
    return records


def validate(val_loader, model, criterion, topk=(1, 5)):
    """(mean loss, top-1, top-5) over the loader, weighted by batch size."""
    model.eval()
    n, loss_sum, c1, c5 = 0, 0., 0., 0.
    with torch.no_grad():
        for images, target in val_loader:
            output = model(images)
            loss = criterion(output, target)
            acc1, acc5 = accuracy(output, target, topk=_capped(topk, output))
            b = images.size(0)
            n += b
            loss_sum += loss.item() * b
            c1 += acc1.item() * b
            c5 += acc5.item() * b
    return loss_sum / n, c1 / n, c5 / n


def sanity_check(state_dict, pretrained_state_dict, arch):
    """Every backbone entry of the linear classifier equals the pre-trained base encoder's."""
    kw = linear_keyword(arch)
    for k in list(state_dict.keys()):
        if '%s.weight' % kw in k or '%s.bias' % kw in k:
            continue
        k_pre = 'module.base_encoder.' + k[len('module.'):] if k.startswith('module.') \
            else 'module.base_encoder.' + k
        ref = pretrained_state_dict.get(k_pre, pretrained_state_dict.get(k_pre[len('module.'):]))
        assert (state_dict[k].cpu() == ref).all(), '{} is changed in linear classifier training.'.format(k)


def run_epochs(model, arch, batches, epochs, lr, batch_size, momentum=0.9, weight_decay=0.):
    """``epochs`` epochs over the fixed list ``batches`` with the official optimizer and schedule.
    Returns the per-iteration losses and the lr of each epoch."""
    criterion = nn.CrossEntropyLoss()
    optimizer, init_lr = build_optimizer(model, lr, batch_size, momentum, weight_decay)
    losses, lrs = [], []
    for epoch in range(epochs):
        lrs.append(adjust_learning_rate(optimizer, init_lr, epoch, epochs))
        losses += [r[0] for r in train(batches, model, criterion, optimizer)]
    return losses, lrs, optimizer
