"""Linear classification on a frozen MoCo v3 backbone (PaddlePaddle): the twin of the official main_lincls.py.

One process (CPU or one GPU):
    python -m paddle_impl.main_lincls DATA --pretrained PRETRAIN [options]
Several processes (paddle.distributed.launch takes a script path, not -m):
    python -m paddle.distributed.launch --nproc_per_node N paddle_impl/main_lincls.py DATA --pretrained ...

DATA holds train/<class>/<images> and val/<class>/<images> (the same class folders). The official flags keep
their names and defaults: -a resnet50, -j 32, --epochs 90, -b 1024 (the TOTAL batch of all processes),
--lr 0.1 (scaled by b / 256), --momentum 0.9, --wd 0, -p 10, --resume, -e/--evaluate, --seed, --pretrained.
The official ViT recipe is --lr 3.

Protocol (official): every parameter but the classifier (``head`` of a ViT, ``fc`` of a ResNet) is frozen;
the classifier is initialised weight N(0, 0.01), bias 0; the backbone comes from --pretrained, which may be
  - a pre-training checkpoint of paddle_impl.main_moco (its base encoder minus the projector), or
  - anything convert/ reads: an official PyTorch pre-training file (e.g. vit-b-300ep.pth.tar, converted
    on the fly, read without running code), a DeiT-format or bare backbone, in either framework;
and after loading only the classifier may be missing. The model stays in eval mode while training
(BatchNorm statistics frozen). SGD with momentum over the two classifier parameters, lr set per epoch to
lr * 0.5 * (1 + cos(pi * epoch / epochs)); cross-entropy; top-1 / top-5 on val after every epoch. After
the first epoch of a run, the backbone must still equal the pretrained weights (official sanity check).

Output (rank 0), in --output-dir: checkpoint.pdparams (every epoch) and model_best.pdparams (best top-1), both
written atomically and read without running code; log.txt; metrics.jsonl (one {"type": "epoch", ...} record per
epoch: lr, train_loss, acc1, acc5, val_loss) and the same scalars under vdl/ (VisualDL; --no-vdl). A checkpoint
holds {'format', 'kind': 'linear', 'epoch', 'arch', 'img_size', 'num_classes', 'vit_kwargs', 'state_dict' (the
whole classifier model, Paddle names), 'best_acc1', 'optimizer', 'pretrained', 'args'}; convert/ turns it into
the official linear-*.pth.tar layout. --resume also accepts an official linear-*.pth.tar (through convert/), e.g.
to evaluate it with -e.

Exit status: 0 done; 2 a usage or input error (one line 'error: ...' on stderr); 3 a non-finite loss.
"""
import os
import sys

if __package__ in (None, ''):  # run as a script (paddle.distributed.launch): make the repo root importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import paddle_impl  # noqa: E402,F401  (sets OMP/MKL defaults before paddle is imported)


paddle_impl.import_paddle_quietly()

import argparse  # noqa: E402
import math  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from types import SimpleNamespace  # noqa: E402

import numpy as np  # noqa: E402
import paddle  # noqa: E402
import paddle.distributed as dist  # noqa: E402
import paddle.nn as nn  # noqa: E402

from paddle_impl import data as data_mod  # noqa: E402
from paddle_impl import engine, models, utils  # noqa: E402
from paddle_impl import io as pio  # noqa: E402
from paddle_impl import loader as loader_mod  # noqa: E402
from paddle_impl.engine import (CHECKPOINT_FORMAT, EXIT_DIVERGED, EXIT_USAGE, VIT_FLAGS, Diverged,  # noqa: E402,F401
                                RunError, check_readable, prepare_output_dir, seed_everything, shared_int)
from paddle_impl.vits import build_2d_sincos_position_embedding  # noqa: E402

vit_kwargs_of = engine.vit_kwargs
_our_kind, _num = engine.our_kind, engine.num


def get_parser():
    p = argparse.ArgumentParser(description='MoCo v3 linear classification on a frozen backbone (PaddlePaddle)')
    engine.add_official_flags(p, 'path to the data set (DIR/train/<class>, DIR/val/<class>)', 'resnet50', 90, 1024,
                              0.1, 0., 'momentum', 'path to a linear-classification checkpoint to resume from (ours, '
                              'or an official linear-*.pth.tar)')
    p.add_argument('-e', '--evaluate', dest='evaluate', action='store_true',
                   help='evaluate the model on the validation set and stop')
    p.add_argument('--pretrained', default='', type=str, metavar='PATH', help='path to the pre-trained checkpoint')

    g = p.add_argument_group('Paddle port')
    g.add_argument('--img-size', default=None, type=int,
                   help="input resolution (default: the pre-trained ViT's, else 224)")
    g.add_argument('--num-classes', default=None, type=int,
                   help='classifier outputs (default: the number of class folders in DIR/train)')
    engine.add_port_flags(g)
    engine.add_vit_flags(g)
    return p


# ----------------------------------------------------------------------------------------- small helpers

def linear_keyword(arch):
    """Name of the classifier layer: 'fc' for ResNet, 'head' for the ViTs (official)."""
    return 'fc' if arch in models.RESNET_ARCHS else 'head'


def head_keys(arch):
    kw = linear_keyword(arch)
    return {f'{kw}.weight', f'{kw}.bias'}


# ------------------------------------------------------------------------------ pre-trained weights

@dataclass
class Pretrained:
    """A backbone read from a file: Paddle-layout state dict (no classifier), what it is and where from."""
    path: str
    state_dict: dict
    arch: str
    img_size: int = None          # ViT: the resolution its pos_embed was built for; None for a ResNet
    vit_kwargs: dict = field(default_factory=dict)  # --vit-* overrides main_moco was run with
    what: str = ''


def _vit_kwargs_from_moco_args(a):
    if not isinstance(a, dict):
        return {}
    return {key: int(a[flag]) for flag, key in VIT_FLAGS if a.get(flag) is not None}


def read_pretrained(path, flag='--pretrained'):
    """The backbone (base encoder minus its projector) of a pre-training file, as a Pretrained.

    Our main_moco checkpoints are read directly (they may hold ViTs with --vit-* overrides, which convert/
    does not name); everything else goes through convert.checkpoints.load_backbone (official PyTorch files
    converted on the fly, DeiT-format and bare backbones of either framework). A classifier file (linear
    or fine-tuned) is refused with one line: a backbone is expected here."""
    if not os.path.exists(path):
        raise RunError(f"{flag} '{path}' does not exist")
    if os.path.isdir(path):
        raise RunError(f"{flag} '{path}' is a folder, not a checkpoint file")
    try:
        fmt = pio.sniff_format(path)
        obj = pio.load_checkpoint(path) if fmt == 'pickle' else None
    except pio.CheckpointError as e:
        raise RunError(f'{flag}: {e}') from None
    kind = _our_kind(obj)
    if kind == 'pretrain':
        arch = obj.get('arch')
        sd = obj.get('state_dict')
        if arch not in models.ARCHS or not isinstance(sd, dict):
            raise RunError(f"{flag} '{path}': a main_moco checkpoint without a known arch and state_dict")
        kw = linear_keyword(arch)
        enc = {k[len('base_encoder.'):]: v for k, v in sd.items()
               if k.startswith('base_encoder.') and not k.startswith(f'base_encoder.{kw}.')}
        if not enc:
            raise RunError(f"{flag} '{path}': no base_encoder.* weights in its state_dict")
        a = obj.get('args') if isinstance(obj.get('args'), dict) else {}
        img = (obj.get('img_size') or a.get('img_size')) if arch in models.VIT_ARCHS else None
        return Pretrained(path, enc, arch, int(img) if img else None, _vit_kwargs_from_moco_args(a),
                          f"Paddle pre-training checkpoint ({arch}, epoch {_num(obj.get('epoch'))})")
    if kind in ('linear', 'finetune'):
        word = {'linear': 'linear-classification', 'finetune': 'fine-tuned classifier'}[kind]
        raise RunError(f"{flag} '{path}' is a {word} checkpoint of this port, not a pre-training one; pass the "
                       f"main_moco checkpoint (or a backbone) it started from")
    try:
        from convert import checkpoints as conv
    except ImportError as e:
        raise RunError(f"{flag} '{path}' is not a main_moco checkpoint, and convert/ (needed to read other "
                       f"formats) cannot be imported: {e}") from None
    try:
        ck = conv.read_checkpoint(path)
        if ck.kind == 'linear':
            raise pio.CheckpointError(f"'{path}' is a {conv.KIND_WORDS['linear']} checkpoint ({ck.arch}); a "
                                      f"backbone comes from a pre-training (or DeiT-format) checkpoint, e.g. "
                                      f"vit-b-300ep.pth.tar rather than linear-vit-b-300ep.pth.tar")
        what = ck.describe()
        bb = conv.backbone_of(ck) if ck.kind == 'pretrain' else ck
        sd, _ = conv.paddle_state_dict(bb)
    except pio.CheckpointError as e:
        raise RunError(f'{flag}: {e}') from None
    return Pretrained(path, dict(sd), ck.arch, ck.img_size, {}, what)


def check_pretrained_arch(pre, arch, flag='--pretrained'):
    if pre.arch != arch:
        raise RunError(f"{flag} '{pre.path}' holds a {pre.arch}, not a {arch} (-a {arch}); pass -a {pre.arch}")


def _is_sincos(value, grid, dim):
    ref = build_2d_sincos_position_embedding(grid, grid, dim).numpy()
    value = np.asarray(value, dtype=np.float64)
    return value.shape == ref.shape and np.allclose(value, ref, rtol=0, atol=1e-5)


def load_backbone_into(model, state, arch, path, flag='--pretrained', allow_missing=None):
    """Copy the backbone ``state`` (Paddle layout) into ``model``; exactly the classifier may be missing
    (official: ``assert set(msg.missing_keys) == {head.weight, head.bias}``).

    A ViT's pos_embed is the fixed 2-D sin-cos table, a function of the grid only; when the model's grid
    differs from the file's (another --img-size), the model keeps its own table, after checking that the
    file's one is the sin-cos table of its grid. Returns the set of keys that were loaded."""
    own = model.state_dict()
    allow_missing = head_keys(arch) if allow_missing is None else set(allow_missing)
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if set(missing) != allow_missing or unexpected:
        extra_missing = [k for k in missing if k not in allow_missing]
        raise RunError(f"{flag} '{path}' does not fit {arch}: missing {len(extra_missing)} backbone keys "
                       f"(e.g. {extra_missing[:3]}), {len(unexpected)} unexpected (e.g. {unexpected[:3]}); "
                       f"only {sorted(allow_missing)} may be missing; check -a and the --vit-* settings")
    loaded = set()
    for k, t in own.items():
        if k not in state:
            continue
        v = np.asarray(state[k])
        if tuple(v.shape) != tuple(t.shape):
            if k == 'pos_embed' and v.ndim == 3 and v.shape[-1] == t.shape[-1]:
                n = v.shape[1] - 1
                g = math.isqrt(n)
                if g * g == n and _is_sincos(v, g, v.shape[-1]):
                    continue  # keep the model's own fixed sin-cos table for its grid
            raise RunError(f"{flag} '{path}': {k} has shape {tuple(v.shape)} in the file, {tuple(t.shape)} in "
                           f"the model; use the --img-size / --vit-* settings it was trained with")
        t.set_value(paddle.to_tensor(v).astype(t.dtype))
        loaded.add(k)
    return loaded


# ------------------------------------------------------------------------------------------------ model

def freeze_all_but_head(model, arch):
    """stop_gradient on every parameter but the classifier's weight and bias (official: requires_grad)."""
    keep = head_keys(arch)
    for name, p in model.named_parameters():
        p.stop_gradient = name not in keep
    return [p for name, p in model.named_parameters() if name in keep]


def init_head(model, arch):
    """Classifier weight N(0, 0.01), bias 0 (official)."""
    layer = getattr(model, linear_keyword(arch))
    layer.weight.set_value(paddle.normal(0.0, 0.01, layer.weight.shape).astype(layer.weight.dtype))
    layer.bias.set_value(paddle.zeros(layer.bias.shape, dtype=layer.bias.dtype))


def build_classifier(arch, num_classes, img_size, vit_kwargs=None):
    """The encoder with a fresh ``num_classes``-way classifier, frozen but for it, classifier initialised."""
    try:
        model = models.encoder_factory(arch, img_size=img_size, **(vit_kwargs or {}))(num_classes=num_classes)
    except (ValueError, TypeError) as e:
        raise RunError(f'cannot build {arch}: {e}') from None
    freeze_all_but_head(model, arch)
    init_head(model, arch)
    return model


def sanity_check(model, pretrained_sd, arch, loaded_keys):
    """Every backbone entry of the model still equals the pre-trained one, bit for bit (official)."""
    kw = linear_keyword(arch)
    own = model.state_dict()
    for k in sorted(loaded_keys):
        if k in (f'{kw}.weight', f'{kw}.bias'):
            continue
        cur = own[k].numpy()
        ref = np.asarray(pretrained_sd[k]).astype(cur.dtype)
        if not np.array_equal(cur, ref):
            raise RunError(f'sanity check failed: {k} changed during linear classification (the backbone must '
                           f'stay frozen); this is a bug, please report it')


# -------------------------------------------------------------------------------------------- optimizer

class SGD:
    """torch.optim.SGD (dampening 0, no Nesterov) over named parameters, computed in each parameter's dtype:
        g = grad + weight_decay * p;  buf = g (first step) else momentum * buf + g;  p = p - lr * buf.
    Paddle's fused Momentum kernel takes the learning rate and momentum as float32 attributes (measured:
    ~1e-8 relative drift per step in float64), so the update is written out here."""

    def __init__(self, named_params, lr, momentum=0.9, weight_decay=0.):
        self.params = list(named_params)
        self.lr = float(lr)
        self.momentum = float(momentum)
        self.weight_decay = float(weight_decay)
        self.buffers = {}

    def get_lr(self):
        return self.lr

    def set_lr(self, lr):
        self.lr = float(lr)

    def clear_grad(self):
        for _, p in self.params:
            p.clear_gradient()

    @paddle.no_grad()
    def step(self):
        for name, p in self.params:
            if p.stop_gradient or p.grad is None:
                continue
            g = p.grad
            if self.weight_decay != 0:
                g = g + self.weight_decay * p
            buf = self.buffers.get(name)
            if self.momentum != 0:
                if buf is None:
                    buf = g.clone()
                else:
                    buf.scale_(self.momentum).add_(g)
                self.buffers[name] = buf
                g = buf
            p.subtract_(self.lr * g)

    def state_dict(self):
        """The Paddle trainers' optimizer form (paddle_impl.utils.optimizer_state; convert/ maps it to and from
        torch's SGD state): momentum buffers keyed by parameter name, in the Paddle layout."""
        return {'type': 'Momentum', 'lr': self.lr, 'momentum': self.momentum, 'weight_decay': self.weight_decay,
                'accumulators': {'velocity': {k: v.numpy() for k, v in self.buffers.items()}}}

    def set_state_dict(self, state):
        if not isinstance(state, dict) or state.get('type') != 'Momentum' or 'accumulators' not in state:
            raise ValueError('the optimizer state is not an SGD-with-momentum state')
        names = {n: p for n, p in self.params}
        for k, v in (state['accumulators'].get('velocity') or {}).items():
            if k not in names:
                raise ValueError(f"optimizer state names parameter '{k}', which is not the classifier's")
            v = np.asarray(v)
            if tuple(v.shape) != tuple(names[k].shape):
                raise ValueError(f"optimizer state of '{k}' has shape {v.shape}, the model needs "
                                 f"{tuple(names[k].shape)}")
            self.buffers[k] = paddle.to_tensor(v).astype(names[k].dtype)
        if 'lr' in state:
            self.lr = float(state['lr'])


def adjust_learning_rate(optimizer, init_lr, epoch, epochs):
    """Half-cycle cosine, once per epoch (official): init_lr * 0.5 * (1 + cos(pi * epoch / epochs))."""
    cur_lr = init_lr * 0.5 * (1. + math.cos(math.pi * epoch / epochs))
    optimizer.set_lr(cur_lr)
    return cur_lr


# -------------------------------------------------------------------------------------------- training

def accuracy(output, target, topk=(1,)):
    """Precision@k (percent) for each k; k is capped at the number of classes."""
    with paddle.no_grad():
        maxk = min(max(topk), output.shape[1])
        batch_size = target.shape[0]
        _, pred = paddle.topk(output, maxk, axis=1, largest=True, sorted=True)
        correct = (pred == target.reshape([-1, 1]).astype(pred.dtype)).astype('float32')
        return [float(correct[:, :min(k, maxk)].sum()) * 100.0 / batch_size for k in topk]


def train_one_epoch(loader, model, criterion, optimizer, epoch=0, print_freq=10, logger=None, topk=(1, 5)):
    """One epoch as the official train(): model.eval() (BN frozen), forward, cross-entropy, SGD step
    (engine.lincls_step, the step the parity harness drives).
    Returns {'loss', 'acc1', 'acc5' (means), 'losses' (per iteration, this process)}."""
    model.eval()
    batch_time = utils.AverageMeter('Time', ':6.3f')
    data_time = utils.AverageMeter('Data', ':6.3f')
    losses = utils.AverageMeter('Loss', ':.4e')
    top1 = utils.AverageMeter('Acc@1', ':6.2f')
    top5 = utils.AverageMeter('Acc@5', ':6.2f')
    n_iter = len(loader) if hasattr(loader, '__len__') else 0
    progress = utils.ProgressMeter(n_iter, [batch_time, data_time, losses, top1, top5], prefix=f'Epoch: [{epoch}]')
    per_iter = []
    end = time.time()
    for i, (images, target) in enumerate(loader):
        data_time.update(time.time() - end)
        value, output, finite = engine.lincls_step(model, images, target, optimizer, criterion)
        if not finite:
            raise Diverged(f'loss is {value} at epoch {epoch}, iteration {i + 1}; stopped')
        acc1, acc5 = accuracy(output, target, topk=topk)
        b = int(images.shape[0])
        losses.update(value, b)
        top1.update(acc1, b)
        top5.update(acc5, b)
        per_iter.append(value)

        batch_time.update(time.time() - end)
        end = time.time()
        if logger is not None and (i % print_freq == 0 or i + 1 == n_iter):
            logger.info(progress.line(i, [f'LR {optimizer.get_lr():.4e}']))
    return {'loss': losses.avg, 'acc1': top1.avg, 'acc5': top5.avg, 'losses': per_iter}


def evaluate(loader, model, criterion, topk=(1, 5)):
    """(mean loss, top-1, top-5, count) over the loader, summed over all processes (each holds a disjoint
    share of the validation set, see val_subset)."""
    model.eval()
    sums = np.zeros(4, dtype=np.float64)  # loss * n, correct@1, correct@5, n
    with paddle.no_grad():
        for images, target in loader:
            output = model(images)
            loss = criterion(output, target)
            acc1, acc5 = accuracy(output, target, topk=topk)
            b = int(images.shape[0])
            sums += [float(loss.item()) * b, acc1 * b / 100.0, acc5 * b / 100.0, b]
    if utils.world_size() > 1:
        t = paddle.to_tensor(sums, dtype='float64')
        dist.all_reduce(t)
        sums = t.numpy()
    n = max(float(sums[3]), 1.0)
    return {'loss': float(sums[0]) / n, 'acc1': 100.0 * float(sums[1]) / n, 'acc5': 100.0 * float(sums[2]) / n,
            'count': int(sums[3])}


def val_subset(dataset, rank, world):
    """This process's share of the validation set: indices rank, rank + world, ... (no padding, so the
    summed counts are exact)."""
    if world <= 1:
        return dataset
    return paddle.io.Subset(dataset, list(range(rank, len(dataset), world)))


# ---------------------------------------------------------------------------------------------- resume

def read_resume(path):
    """(Paddle-layout full state dict, meta dict) of a linear-classification checkpoint: ours, or an
    official linear-*.pth.tar read through convert/, whose SGD state becomes momentum buffers by parameter
    name (meta['optimizer']); when it cannot, meta['optimizer_note'] says why (run() tells the user)."""
    obj, _ = engine.read_checkpoint(path)
    kind = engine.our_kind(obj)
    if kind == 'linear':
        return obj['state_dict'], obj
    if kind == 'pretrain':
        raise RunError(f"--resume '{path}' is a MoCo pre-training checkpoint, not a linear-classification one; "
                       f"pass it as --pretrained")
    if kind == 'finetune':
        raise RunError(f"--resume '{path}' is a fine-tuning checkpoint (main_finetune), not a "
                       f"linear-classification one")
    try:
        from convert import checkpoints as conv
        ck = conv.read_checkpoint(path, kind='linear')
    except ImportError as e:
        raise RunError(f"--resume '{path}' is not our checkpoint and convert/ cannot be imported: {e}") from None
    except pio.CheckpointError as e:
        raise RunError(f'--resume: {e}') from None
    sd, _ = conv.paddle_state_dict(ck)
    opt, note = None, ck.optimizer_note or 'the file holds no optimizer state'
    if ck.optimizer is not None:  # the official SGD state (2 parameters) -> momentum buffers by name
        try:
            opt, note = conv.optimizer_to_paddle(ck), None
        except (KeyError, IndexError, TypeError, ValueError, pio.CheckpointError) as e:
            note = f'its optimizer state cannot be read ({type(e).__name__}: {e})'
    meta = {'epoch': ck.epoch, 'arch': ck.arch, 'img_size': ck.img_size, 'num_classes': ck.num_classes,
            'best_acc1': ck.best_acc1, 'optimizer': opt, 'optimizer_note': note, 'vit_kwargs': {},
            'foreign': ck.describe()}
    return sd, meta


def load_full_state(model, state, path):
    engine.load_state_exactly(model, state, f"--resume '{path}'", '-a / --vit-* / --num-classes')


def restore_sgd_state(optimizer, meta, path, logger):
    """The SGD momentum buffers of a --resume file, or one warning line saying why they start from zero."""
    opt_state = meta.get('optimizer')
    if isinstance(opt_state, dict) and opt_state.get('type') == 'Momentum':
        try:
            optimizer.set_state_dict(opt_state)
        except ValueError as e:
            raise RunError(f"--resume '{path}': {e}") from None
        return True
    why = meta.get('optimizer_note') or (f"its optimizer is {opt_state.get('type')}, not SGD with momentum"
                                         if isinstance(opt_state, dict) else 'no SGD state in it')
    logger.warning(f"--resume '{path}': the SGD state is not restored ({why}; {meta.get('foreign', 'ours')}); "
                   f'the momentum buffers start from zero')
    return False


# ------------------------------------------------------------------------------------------------- run

def check_args(args):
    engine.check_common_args(args, positive=('epochs', 'batch_size', 'print_freq'),
                             non_negative=('workers', 'start_epoch'), optional_positive=('img_size', 'num_classes'))
    if args.weight_decay < 0 or not 0 <= args.momentum < 1:
        raise RunError(f'--wd must be >= 0 and --momentum in [0, 1), got {args.weight_decay} and {args.momentum}')


def count_classes(args, run, meta, evaluate, flag='--resume'):
    """--num-classes, or the number of class folders; a resumed file must have as many."""
    classes, _ = data_mod.find_classes(run.valdir if evaluate else run.traindir)
    num_classes = args.num_classes or len(classes)
    if num_classes < len(classes):
        raise RunError(f'--num-classes {num_classes} is smaller than the {len(classes)} class folders of the data')
    if meta and meta.get('num_classes') not in (None, num_classes):
        raise RunError(f"{flag} '{args.resume}' has {meta['num_classes']} classes, the data {num_classes}; "
                       f"pass --num-classes {meta['num_classes']} or other data")
    return num_classes


def read_inputs(s, args, backbone_flag, backbone_path):
    """The --resume and backbone files, read and checked first, so a wrong one fails before anything heavy is
    built; then the ViT settings, image size and number of classes they and the flags give."""
    meta = s.meta or {}
    s.pre = read_pretrained(backbone_path, flag=backbone_flag) if backbone_path else None
    if s.pre is not None:
        check_pretrained_arch(s.pre, args.arch, flag=backbone_flag)
    if s.meta is not None and meta.get('arch') not in (None, args.arch):
        raise RunError(f"--resume '{args.resume}' is a {meta['arch']} model, this run is -a {args.arch}; "
                       f"pass -a {meta['arch']}")
    # --vit-* given on the command line win over what the checkpoint says
    s.vit_kwargs = {**(meta.get('vit_kwargs') or (s.pre.vit_kwargs if s.pre else {})), **vit_kwargs_of(args)}
    s.img_size = int(args.img_size or meta.get('img_size') or (s.pre.img_size if s.pre else None) or 224)
    s.num_classes = count_classes(args, s.run, meta, s.evaluate)


def setup(args):
    """Everything before the first epoch: checks, processes, files, model, optimizer, resume."""
    check_args(args)
    run = engine.start(args, train=not args.evaluate, val=True, writes=not args.evaluate, amp=False)
    s = SimpleNamespace(args=args, run=run, logger=run.logger, evaluate=args.evaluate, t_start=time.time())
    s.resume_sd, s.meta = read_resume(args.resume) if args.resume else (None, None)
    read_inputs(s, args, '--pretrained', args.pretrained)
    if args.seed is not None:
        seed_everything(args.seed)
    s.model = build_classifier(args.arch, s.num_classes, s.img_size, s.vit_kwargs)
    s.loaded_keys = set()
    if s.pre is not None:
        s.loaded_keys = load_backbone_into(s.model, s.pre.state_dict, args.arch, s.pre.path)
        s.logger.info(f"=> loaded pre-trained model '{s.pre.path}' ({s.pre.what}); missing only "
                      f"{sorted(head_keys(args.arch))}")
    elif not args.resume:
        s.logger.warning('no --pretrained: the backbone is randomly initialised (a baseline)')
    s.init_lr = args.lr * args.batch_size / 256
    head_params = [(n, p) for n, p in s.model.named_parameters() if not p.stop_gradient]
    assert len(head_params) == 2  # weight, bias
    s.optimizer = SGD(head_params, s.init_lr, momentum=args.momentum, weight_decay=args.weight_decay)
    s.start_epoch, s.best_acc1 = args.start_epoch, 0.
    if s.resume_sd is not None:
        load_full_state(s.model, s.resume_sd, args.resume)
        s.start_epoch = int(_num(s.meta.get('epoch')) or 0)
        s.best_acc1 = float(_num(s.meta.get('best_acc1')) or 0.)
        if not args.evaluate:
            restore_sgd_state(s.optimizer, s.meta, args.resume, s.logger)
        s.logger.info(f"=> loaded checkpoint '{args.resume}' (epoch {s.start_epoch}, best acc@1 {s.best_acc1:.3f})")
    return s


def val_loader_of(s, transform):
    s.val_dataset = check_readable(data_mod.ImageFolder(s.run.valdir, transform))
    return paddle.io.DataLoader(val_subset(s.val_dataset, s.run.rank, s.run.world), batch_size=s.run.per_proc,
                                shuffle=False, num_workers=s.args.workers)


def evaluate_only(s, val_loader, criterion, summary):
    res = evaluate(val_loader, s.model, criterion)
    s.logger.info(f" * Acc@1 {res['acc1']:.3f} Acc@5 {res['acc5']:.3f}  (loss {res['loss']:.4f}, "
                  f"{res['count']} images)")
    summary.update(acc1=res['acc1'], acc5=res['acc5'], val_loss=res['loss'], best_acc1=res['acc1'],
                   epochs_done=s.start_epoch, time=time.time() - s.t_start)
    return summary


def validate_and_save(s, epoch, tr, cur_lr, val_loader, criterion, checkpoint):
    """After an epoch: top-1/top-5 on val, the log line, the metrics record, checkpoint.pdparams and (best top-1)
    model_best.pdparams; ``checkpoint()`` builds the saved object (rank 0). Returns the val results."""
    res = evaluate(val_loader, s.model, criterion)
    is_best = res['acc1'] > s.best_acc1
    s.best_acc1 = max(res['acc1'], s.best_acc1)
    s.logger.info(f" * epoch {epoch}: Acc@1 {res['acc1']:.3f} Acc@5 {res['acc5']:.3f} (best {s.best_acc1:.3f}); "
                  f"train loss {tr['loss']:.4f}, lr {cur_lr:.4g}")
    rec = {'epoch': epoch, 'lr': cur_lr, 'train_loss': tr['loss'], 'val_loss': res['loss'], 'acc1': res['acc1'],
           'acc5': res['acc5']}
    s.history.append(dict(rec, **({'train_acc1': tr['acc1']} if 'acc1' in tr else {})))
    obj = checkpoint()
    if s.run.rank == 0:
        s.metrics.write(dict(rec, type='epoch', global_step=epoch + 1, best_acc1=s.best_acc1, time=time.time()))
        path = os.path.join(s.run.output_dir, 'checkpoint.pdparams')
        s.last_ckpt = engine.save_checkpoint(obj, path, s.last_ckpt, s.logger, f'--resume {path}')
        if is_best:
            engine.save_checkpoint(obj, os.path.join(s.run.output_dir, 'model_best.pdparams'), s.last_ckpt,
                                   s.logger, f'--resume {path}')
    return res


def finish(s, summary, res):
    summary.update(acc1=res['acc1'], acc5=res['acc5'], val_loss=res['loss'], best_acc1=s.best_acc1,
                   history=s.history, epochs_done=s.args.epochs, time=time.time() - s.t_start,
                   checkpoint=os.path.join(s.run.output_dir, 'checkpoint.pdparams'))
    if s.metrics is not None:
        s.metrics.close()
    s.logger.info(f'done in {utils.format_duration(summary["time"])}: best Acc@1 {s.best_acc1:.3f}')
    return summary


def linear_checkpoint(s, epoch):
    args, m = s.args, s.model_without_ddp
    return {'format': CHECKPOINT_FORMAT, 'kind': 'linear', 'epoch': epoch + 1, 'arch': args.arch,
            'img_size': s.img_size, 'num_classes': s.num_classes, 'vit_kwargs': s.vit_kwargs,
            'state_dict': m.state_dict(), 'best_acc1': s.best_acc1, 'optimizer': s.optimizer.state_dict(),
            'pretrained': args.pretrained, 'data_seed': s.data_seed, 'args': dict(vars(args))}


def run(args):
    """Linear classification as the official main_lincls; returns a summary dict (and the model under
    'model'). Raises RunError on a user error, Diverged on a NaN/inf loss."""
    s = setup(args)
    run_, criterion = s.run, nn.CrossEntropyLoss()
    train_transform, val_transform = loader_mod.build_lincls_transforms(s.img_size)
    val_loader = val_loader_of(s, val_transform)
    s.model_without_ddp = s.model
    summary = {'model': s.model, 'output_dir': run_.output_dir, 'num_classes': s.num_classes,
               'img_size': s.img_size, 'arch': args.arch}
    if args.evaluate:
        return evaluate_only(s, val_loader, criterion, summary)
    s.data_seed = engine.data_seed(args.seed, (s.meta or {}).get('data_seed'))
    train_dataset = check_readable(data_mod.ImageFolder(run_.traindir, train_transform, seed=s.data_seed))
    sampler = paddle.io.DistributedBatchSampler(train_dataset, batch_size=run_.per_proc, shuffle=True,
                                                drop_last=False, num_replicas=run_.world, rank=run_.rank)
    train_loader = paddle.io.DataLoader(train_dataset, batch_sampler=sampler, num_workers=args.workers)
    if run_.world > 1:
        s.model = paddle.DataParallel(s.model)
    n_backbone = sum(int(np.prod(p.shape)) for n, p in s.model_without_ddp.named_parameters()
                     if p.stop_gradient and not n.endswith(('_mean', '_variance')))
    s.logger.info(f'arch {args.arch} (img {s.img_size}, {n_backbone / 1e6:.2f}M frozen params), {s.num_classes} '
                  f'classes, {len(train_dataset)} train / {len(s.val_dataset)} val images, {run_.world} process(es) '
                  f'x {run_.per_proc} = batch {run_.per_proc * run_.world}, SGD lr {s.init_lr:.4g} (base {args.lr} x '
                  f'{args.batch_size}/256) momentum {args.momentum} wd {args.weight_decay}, device {run_.device}')
    s.metrics = engine.open_metrics(run_, args, resumed_at=s.start_epoch if args.resume else None)
    s.history, s.last_ckpt, res = [], args.resume or None, {'acc1': None, 'acc5': None, 'loss': None}
    for epoch in range(s.start_epoch, args.epochs):
        sampler.set_epoch(epoch)
        train_dataset.set_epoch(epoch)
        cur_lr = adjust_learning_rate(s.optimizer, s.init_lr, epoch, args.epochs)
        tr = train_one_epoch(train_loader, s.model, criterion, s.optimizer, epoch, args.print_freq, s.logger)
        res = validate_and_save(s, epoch, tr, cur_lr, val_loader, criterion, lambda: linear_checkpoint(s, epoch))
        if epoch == s.start_epoch and s.pre is not None:
            sanity_check(s.model_without_ddp, s.pre.state_dict, args.arch, s.loaded_keys)
            s.logger.info('=> sanity check passed: the backbone equals the pre-trained weights')
    return finish(s, summary, res)


def main(argv=None):
    args = get_parser().parse_args(argv)
    return engine.run_main(run, args, resume_hint='--resume OUTPUT_DIR/checkpoint.pdparams')


# ------------------------------------------------------------------------------------------------ demo

def linear_probe(data, pretrained=None, arch='vit_small', epochs=10, batch_size=128, lr=None, img_size=32,
                 output_dir=None, vit_kwargs=None, workers=0, seed=0, weight_decay=0., device=None, print_freq=10,
                 quiet=True):
    """Run main_lincls on DATA (train/ and val/) and return {'acc1', 'acc5', 'best_acc1', 'history', ...}.

    ``pretrained``: a main_moco checkpoint or backbone file, or None for a randomly initialised backbone
    (the baseline, seeded by ``seed``). ``vit_kwargs``: overrides (patch_size, embed_dim, depth, num_heads)
    for the random baseline (a main_moco checkpoint carries its own). ``lr``: base lr (default: the official
    recipe's, 0.1 for ResNet and 3 for ViTs). ``output_dir``: default a temporary folder, removed after."""
    import contextlib
    import io
    import shutil
    import tempfile
    tmp = None
    if output_dir is None:
        tmp = output_dir = tempfile.mkdtemp(prefix='lincls-')
    argv = [str(data), '-a', arch, '--epochs', str(epochs), '-b', str(batch_size), '--img-size', str(img_size),
            '--output-dir', str(output_dir), '-j', str(workers), '--seed', str(seed), '--wd', str(weight_decay),
            '-p', str(print_freq),
            '--lr', str(lr if lr is not None else (0.1 if arch in models.RESNET_ARCHS else 3.0))]
    if pretrained:
        argv += ['--pretrained', str(pretrained)]
    if device:
        argv += ['--device', device]
    for flag, key in VIT_FLAGS:
        if vit_kwargs and key in vit_kwargs:
            argv += ['--' + flag.replace('_', '-'), str(vit_kwargs[key])]
    args = get_parser().parse_args(argv)
    try:
        if quiet:
            with contextlib.redirect_stdout(io.StringIO()):
                out = run(args)
        else:
            out = run(args)
    finally:
        utils.close_logging()
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)
    out.pop('model', None)
    return out


if __name__ == '__main__':
    sys.exit(main())

