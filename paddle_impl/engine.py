"""The run core shared by the trainers (main_moco, main_lincls, main_finetune).

What the three command lines have in common lives here, once: the error and exit-code convention (RunError:
exit 2 with one line 'error: ...'; Diverged: exit 3), the flags of this port (--device, --amp, --output-dir,
--no-vdl, --vit-*), common argument checks, device and AMP resolution, the output folder (creation, write
probe, free space, stale temporaries), the readable-data check, seeding and the data seed shared by all
processes, the agreement of settings and data between processes, atomic checkpoint saves, `--resume auto`,
the metrics sink (metrics.jsonl and VisualDL scalars), the AMP overflow rule, and the product's training
steps: the very functions the trainers call for one iteration are those the parity harness drives
(parity/steps.py for MoCo, parity/steps_eval.py for linear classification and fine-tuning).
"""
import argparse
import json
import math
import os
import random
import re
import shutil
import sys
import warnings
from typing import NamedTuple

import numpy as np
import paddle
import paddle.distributed as dist

from paddle_impl import data as data_mod
from paddle_impl import io as pio
from paddle_impl import models, schedules, utils
from paddle_impl.layers import model_parameters
from paddle_impl.optimizer import build_optimizer

# Paddle checkpoints of this port (main_moco, main_lincls, main_finetune, convert/) share one format tag and
# say what they hold in 'kind': 'pretrain' | 'linear' | 'finetune' | 'deit' | 'backbone'.
CHECKPOINT_FORMAT = 'mocov3-paddle/1'
CHECKPOINT_RE = re.compile(r'^checkpoint_(\d+)\.pdparams$')
STALE_TEMP_RE = re.compile(r'^\.checkpoint_\d+\.pdparams\..+\.tmp$')  # io.atomic_write's temporary names
EXIT_USAGE = 2
EXIT_DIVERGED = 3
# --amp with float16: a step whose loss is NaN/inf is skipped (as torch's GradScaler skips a step whose
# gradients overflowed); the run stops (exit 3) when this many steps in a row were skipped.
AMP_MAX_CONSECUTIVE_SKIPS = 20
VIT_FLAGS = (('vit_patch_size', 'patch_size'), ('vit_embed_dim', 'embed_dim'), ('vit_depth', 'depth'),
             ('vit_num_heads', 'num_heads'))
# flags that may differ between processes (e.g. a data path mounted elsewhere on another node); everything
# else must be the same on every process, or the processes would run different loops and wait on each other
LOCAL_ARGS = ('data', 'output_dir', 'workers', 'print_freq', 'resume', 'no_vdl')


class RunError(Exception):
    """A user error: the message is one line naming what to change."""


class Diverged(Exception):
    """The loss (or a parameter) became NaN/inf."""


# ------------------------------------------------------------------------------------------------- flags

def arch_name(name):
    """-a/--arch type: the PASSL names (moco_vit_small, ...) map to ours once models.canonical_arch exists."""
    return getattr(models, 'canonical_arch', lambda a: a)(name)


def add_official_flags(p, data_help, arch, epochs, batch_size, lr, wd, momentum_help, resume_help):
    """The flags the official main_moco and main_lincls share, with their names; the defaults are given."""
    p.add_argument('data', metavar='DIR', help=data_help)
    p.add_argument('-a', '--arch', metavar='ARCH', default=arch, type=arch_name,
                   help='model architecture: ' + ' | '.join(models.ARCHS) + f' (default: {arch})')
    p.add_argument('-j', '--workers', default=32, type=int, metavar='N',
                   help='number of data loading workers per process (default: 32)')
    p.add_argument('--epochs', default=epochs, type=int, metavar='N', help='number of total epochs to run')
    p.add_argument('--start-epoch', default=0, type=int, metavar='N',
                   help='manual epoch number (useful on restarts)')
    p.add_argument('-b', '--batch-size', default=batch_size, type=int, metavar='N',
                   help=f'mini-batch size (default: {batch_size}), the total of all processes')
    p.add_argument('--lr', '--learning-rate', default=lr, type=float, metavar='LR', dest='lr',
                   help='initial (base) learning rate, scaled by batch-size / 256')
    p.add_argument('--momentum', default=0.9, type=float, metavar='M', help=momentum_help)
    p.add_argument('--wd', '--weight-decay', default=wd, type=float, metavar='W', dest='weight_decay',
                   help=f'weight decay (default: {wd})')
    p.add_argument('-p', '--print-freq', default=10, type=int, metavar='N', help='print frequency (default: 10)')
    p.add_argument('--resume', default='', type=str, metavar='PATH', help=resume_help)
    p.add_argument('--seed', default=None, type=int, help='seed for initializing training')


def add_port_flags(g, amp_help=None, amp_dtype=False):
    """--output-dir, --device, [--amp, --amp-dtype], --no-vdl: the flags of this port all trainers share."""
    g.add_argument('--output-dir', default='.', help="where checkpoints, logs and metrics go (default: '.')")
    g.add_argument('--device', default=None, choices=('cpu', 'gpu'),
                   help='default: gpu if Paddle was built with CUDA, else cpu')
    if amp_help:
        g.add_argument('--amp', default=None, action=argparse.BooleanOptionalAction, help=amp_help)
    if amp_dtype:
        g.add_argument('--amp-dtype', default='float16', choices=('float16', 'bfloat16'),
                       help='AMP compute type (default: float16, with a GradScaler as the official code)')
    g.add_argument('--no-vdl', action='store_true',
                   help='do not write VisualDL scalars (default: written under OUTPUT_DIR/vdl on rank 0)')


def add_vit_flags(g):
    for flag, key in VIT_FLAGS:
        g.add_argument('--' + flag.replace('_', '-'), default=None, type=int, help=f'override the ViT {key}')


def vit_kwargs(args):
    """The --vit-* overrides given, as keyword arguments of the ViT builders."""
    return {key: getattr(args, flag) for flag, key in VIT_FLAGS if getattr(args, flag, None) is not None}


def check_common_args(args, positive=(), non_negative=(), optional_positive=()):
    """The checks every trainer makes: a known arch, --vit-* only with a ViT, counts positive or not negative,
    a positive finite --lr. One RunError naming the flag."""
    if args.arch not in models.ARCHS:
        raise RunError(f"unknown arch '{args.arch}'; known: {', '.join(models.ARCHS)}")
    if vit_kwargs(args) and args.arch not in models.VIT_ARCHS:
        raise RunError(f'--vit-* options apply to the ViT archs only, not to {args.arch}')
    flags = [(f, 'must be positive', lambda v: v >= 1) for f in positive]
    flags += [(f, 'must not be negative', lambda v: v >= 0) for f in non_negative]
    flags += [(f, 'must be positive', lambda v: v is None or v >= 1)
              for f in tuple(optional_positive) + tuple(f for f, _ in VIT_FLAGS)]
    for flag, words, ok in flags:
        if not ok(getattr(args, flag, None)):
            raise RunError(f"--{flag.replace('_', '-')} {words}, got {getattr(args, flag)}")
    if not (args.lr > 0 and math.isfinite(args.lr)):
        raise RunError(f'--lr must be positive, got {args.lr}')


# ------------------------------------------------------------------------------------ device and folders

def resolve_device(name=None, amp=None, amp_dtype='float16'):
    """(device, amp) for --device / --amp / --amp-dtype. A GPU needs a CUDA build of Paddle that sees at least
    one GPU; bfloat16 AMP needs a GPU that supports it (else one line instead of silently training float32)."""
    cuda = paddle.device.is_compiled_with_cuda()
    device = name or ('gpu' if cuda else 'cpu')
    if device == 'gpu' and not cuda:
        raise RunError('--device gpu: this Paddle build has no CUDA support (install paddlepaddle-gpu, '
                       'or pass --device cpu)')
    if device == 'gpu' and paddle.device.cuda.device_count() < 1:
        raise RunError('--device gpu: Paddle was built with CUDA but sees no GPU (device count 0; check the '
                       'driver and CUDA_VISIBLE_DEVICES), or pass --device cpu')
    amp = amp if amp is not None else device == 'gpu'
    if device == 'gpu' and amp and amp_dtype == 'bfloat16' and not paddle.amp.is_bfloat16_supported():
        raise RunError('--amp-dtype bfloat16: this GPU does not support bfloat16 (it needs compute capability '
                       '8.0 or newer); pass --amp-dtype float16 or --no-amp')
    return device, amp


def use_device(device):
    paddle.set_device(f'gpu:{dist.ParallelEnv().device_id}' if device == 'gpu' else 'cpu')


def prepare_output_dir(path):
    """Create the output folder (its parent must exist) and prove that a file can be written in it."""
    path = os.path.abspath(path)
    if os.path.exists(path) and not os.path.isdir(path):
        raise RunError(f'--output-dir {path} exists and is not a folder')
    if not os.path.isdir(path):
        parent = os.path.dirname(path)
        if not os.path.isdir(parent):
            raise RunError(f'--output-dir {path}: its parent folder {parent} does not exist (create it first)')
        try:
            os.makedirs(path, exist_ok=True)
        except OSError as e:
            raise RunError(f'--output-dir {path} cannot be created: {e.strerror or e}') from None
    probe = os.path.join(path, f'.write-probe-{os.getpid()}')
    try:
        with open(probe, 'w') as f:
            f.write('ok')
        os.remove(probe)
    except OSError as e:
        raise RunError(f'--output-dir {path} is not writable: {e.strerror or e}') from None
    return path


def check_free_space(output_dir, model, n_buffers):
    """Fail before training when --output-dir cannot hold one checkpoint: the weights, and ``n_buffers``
    optimizer buffers per trainable parameter (LARS/SGD 1, AdamW 2). The real file is a little larger."""
    try:
        free = shutil.disk_usage(output_dir).free
    except OSError:
        return
    n_bytes = sum(int(np.prod(t.shape)) * t.element_size() for t in model.state_dict().values())
    n_bytes += n_buffers * sum(int(np.prod(p.shape)) * p.element_size()
                               for p in model.parameters() if not p.stop_gradient)
    if free < n_bytes:
        raise RunError(f'--output-dir {output_dir} has {free / 2**20:.2f} MiB free, a checkpoint of this model '
                       f'needs about {n_bytes / 2**20:.2f} MiB; free space or choose another folder')


def remove_stale_temporaries(output_dir, logger):
    """Delete the temporary files of checkpoint saves that a killed run left behind (complete or not, they
    were never renamed into place, so no checkpoint_NNNN.pdparams depends on them)."""
    removed = []
    for name in os.listdir(output_dir):
        if STALE_TEMP_RE.match(name):
            try:
                os.remove(os.path.join(output_dir, name))
                removed.append(name)
            except OSError:
                pass
    if removed:
        logger.info(f'removed {len(removed)} temporary file(s) of an interrupted save: {", ".join(removed)}')
    return removed


def data_folders(data, train=True, val=False):
    """(traindir or None, valdir or None) of DATA, checked to exist (and, both given, to hold the same classes)."""
    want = ' and '.join(f'{data}/{s}/<class>/<images>' for s, on in (('train', train or not val), ('val', val)) if on)
    if not os.path.isdir(data):
        what = 'is not a folder' if os.path.exists(data) else 'does not exist'
        raise RunError(f'data folder {data} {what}: expected {want}')
    traindir, valdir = os.path.join(data, 'train'), os.path.join(data, 'val')
    for sub, on in (('val', val), ('train', train)):
        if on and not os.path.isdir(os.path.join(data, sub)):
            raise RunError(f'{data} has no {sub}/ sub-folder: expected {data}/{sub}/<class>/<images>')
    if train and val:
        data_mod.check_split(traindir, valdir)
    elif val:
        data_mod.find_classes(valdir)
    return (traindir if train else None), (valdir if val else None)


def check_readable(dataset):
    """Read one sample here, in this thread: a folder without any readable image fails now with one line
    (DataError), not inside Paddle's DataLoader, whose -j 0 reader thread dies and leaves the training loop
    waiting forever. The warnings about the unreadable files met on the way are shown only if one is found."""
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter('always', data_mod.CorruptImageWarning)
        dataset[0]
    for w in seen:
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    return dataset


# -------------------------------------------------------------------------------------- run start-up

class Run(NamedTuple):
    device: str
    amp: bool
    rank: int
    world: int
    logger: object
    output_dir: str
    per_proc: int     # the batch of each process (--batch-size // world)
    traindir: str
    valdir: str


def start(args, train=True, val=False, writes=True, amp=None, amp_dtype='float16'):
    """What every trainer does first: device and AMP, the process group, every process started alike, the data
    folders, the output folder (rank 0: created, probed, log.txt, stale temporaries removed), the batch per
    process."""
    device, amp = resolve_device(args.device, amp, amp_dtype)
    use_device(device)
    rank, world = utils.init_distributed()
    logger = utils.setup_logging(rank)
    if world > 1:
        check_agreement('their settings', run_settings(args, device, amp), 'start every process with the same '
                        'arguments', as_flags=True)
    traindir, valdir = data_folders(args.data, train, val)
    output_dir = os.path.abspath(args.output_dir)
    if rank == 0 and writes:
        output_dir = prepare_output_dir(output_dir)
        logger = utils.setup_logging(rank, os.path.join(output_dir, 'log.txt'))
        remove_stale_temporaries(output_dir, logger)
    per_proc = args.batch_size // world
    if per_proc < 1:
        raise RunError(f'--batch-size {args.batch_size} is smaller than the number of processes ({world}); '
                       f'each process needs at least one image')
    return Run(device, amp, rank, world, logger, output_dir, per_proc, traindir, valdir)


def run_settings(args, device, amp):
    s = {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(args).items() if k not in LOCAL_ARGS}
    s.update(device=device, amp=bool(amp))
    return s


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed)
    paddle.seed(seed)


def shared_int(value):
    """``value`` of rank 0, on every rank."""
    if utils.world_size() <= 1:
        return int(value)
    t = paddle.to_tensor([int(value) if utils.rank() == 0 else 0], dtype='int64')
    dist.all_reduce(t)
    return int(t.item())


def data_seed(*candidates):
    """The first candidate that is not None (a checkpoint's or --seed), else a random one of rank 0's."""
    for c in candidates:
        if c is not None:
            return int(np.asarray(c).item())
    return shared_int(int.from_bytes(os.urandom(4), 'little') >> 1)


def all_gather_json(obj):
    """``obj`` (JSON-able) of every rank, in rank order ([obj] on one process). Sent as JSON bytes in uint8
    tensors: nothing is unpickled."""
    if utils.world_size() <= 1:
        return [obj]
    data = np.frombuffer(json.dumps(obj, sort_keys=True).encode(), dtype=np.uint8)
    sizes = []
    dist.all_gather(sizes, paddle.to_tensor([data.size], dtype='int64'))
    sizes = [int(s.item()) for s in sizes]
    buf = np.zeros(max(sizes), dtype=np.uint8)
    buf[:data.size] = data
    parts = []
    dist.all_gather(parts, paddle.to_tensor(buf))
    return [json.loads(bytes(p.numpy()[:n]).decode()) for p, n in zip(parts, sizes)]


def check_agreement(what, values, hint, as_flags=False):
    """Raise RunError, on every rank alike, unless every process holds the same ``values`` (a JSON-able dict).
    Several processes that disagree (on the arch, the batch size, the data, the resume point) would otherwise
    build different models or run loops of different lengths and wait on each other's collectives."""
    everyone = all_gather_json(values)
    diffs = []
    for r, other in enumerate(everyone[1:], start=1):
        for k in sorted(set(everyone[0]) | set(other)):
            if everyone[0].get(k) != other.get(k):
                name = '--' + k.replace('_', '-') if as_flags else k
                diffs.append(f'{name}: rank 0 {everyone[0].get(k)!r}, rank {r} {other.get(k)!r}')
    if diffs:
        shown = '; '.join(diffs[:4]) + (f' (+{len(diffs) - 4} more)' if len(diffs) > 4 else '')
        raise RunError(f'the {len(everyone)} processes disagree on {what}: {shown}; {hint}')


# ------------------------------------------------------------------------------------ checkpoints

def find_latest_checkpoint(output_dir):
    """The checkpoint_NNNN.pdparams in ``output_dir`` with the highest NNNN, or None."""
    if not os.path.isdir(output_dir):
        return None
    best = None
    for name in os.listdir(output_dir):
        m = CHECKPOINT_RE.match(name)
        if m and (best is None or int(m.group(1)) > best[0]):
            best = (int(m.group(1)), name)
    return os.path.join(output_dir, best[1]) if best else None


def resume_file(resume, output_dir, logger):
    """The file --resume names: PATH, or with 'auto' the newest checkpoint_NNNN.pdparams (None if there is none)."""
    if resume != 'auto':
        return resume or None
    path = find_latest_checkpoint(output_dir)
    if path is None:
        logger.info(f'--resume auto: no checkpoint_*.pdparams in {output_dir}; starting from scratch')
    return path


def read_checkpoint(path, flag='--resume', quoted=True, paddle_only=False):
    """(object, format) of a checkpoint file, read without running code. A file that is not a Paddle pickle
    gives (None, its format), or with ``paddle_only`` the loader's one-line refusal (e.g. 'a PyTorch
    checkpoint, not a Paddle one: convert it ...')."""
    if not os.path.isfile(path):
        name = f"'{path}'" if quoted else path
        raise RunError(f'{flag} {name}: ' + ('no such file' if not os.path.exists(path) else 'not a file'))
    try:
        fmt = 'pickle' if paddle_only else pio.sniff_format(path)
        return (pio.load_checkpoint(path) if fmt == 'pickle' else None), fmt
    except pio.CheckpointError as e:
        raise RunError(f'{flag}: {e}') from None


def our_kind(obj):
    """The 'kind' of an object read from one of this port's Paddle files, else None."""
    if not isinstance(obj, dict) or obj.get('format') != CHECKPOINT_FORMAT:
        return None
    return obj.get('kind')


def load_state_exactly(model, state, what, hint):
    """Load ``state`` into ``model``; every key of both must be there with the same shape (one RunError)."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    if missing or unexpected:
        raise RunError(f'{what} does not fit the model ({len(missing)} missing keys, e.g. {missing[:2]}; '
                       f'{len(unexpected)} unexpected, e.g. {unexpected[:2]}); use the {hint} settings it was '
                       f'trained with')
    for k, v in own.items():
        if tuple(v.shape) != tuple(np.shape(state[k])):
            raise RunError(f'{what}: {k} has shape {tuple(np.shape(state[k]))} in the checkpoint, '
                           f'{tuple(v.shape)} in the model; use the {hint} settings it was trained with')
    model.set_state_dict({k: np.asarray(v) for k, v in state.items()})


def save_checkpoint(obj, path, last, logger, resume_hint='--resume auto'):
    """Atomic save (paddle_impl.io); a failure (e.g. a full disk) leaves any file of that name untouched and
    becomes one RunError naming the last good checkpoint."""
    try:
        pio.save_checkpoint(obj, path)
    except pio.CheckpointError as e:
        raise RunError(f'{e}; last checkpoint: {last or "none"} (intact); free space or choose another '
                       f'--output-dir (then move the checkpoints there), and rerun with {resume_hint}') from None
    logger.info(f'saved {path}' + (f" (epoch {obj['epoch']}, iteration {obj['iteration']})"
                                   if 'iteration' in obj else f" (epoch {obj['epoch']})"))
    return path


def num(x):
    return x.item() if isinstance(x, (np.ndarray, np.generic)) else x


# ------------------------------------------------------------------------------------------- metrics

VDL_SCALARS = {'step': ('loss', 'lr', 'm', 'images_per_s'),
               'epoch': ('loss_avg', 'train_loss', 'lr', 'm', 'images_per_s', 'acc1', 'acc5', 'val_loss'),
               'knn': ('knn_top1',), 'amp_skip': ('skipped_in_a_row',)}


class MetricsSink:
    """Rank 0's metrics: one JSON object a line in OUTPUT_DIR/metrics.jsonl and, unless --no-vdl, the same
    values as VisualDL scalars under OUTPUT_DIR/vdl (tag '<type>/<key>', step: global_step), readable with
    `visualdl --logdir OUTPUT_DIR/vdl`. A fresh run keeps an old metrics.jsonl aside (.old); a resumed one
    drops the records after its checkpoint's step."""

    def __init__(self, output_dir, vdl=True, resumed_at=None):
        self.metrics = utils.MetricsWriter(os.path.join(output_dir, 'metrics.jsonl'))
        self.path = self.metrics.path
        if resumed_at is not None:
            self.metrics.truncate_after(resumed_at)
        elif os.path.exists(self.path):
            os.replace(self.path, self.path + '.old')
        self.vdl_dir = os.path.join(output_dir, 'vdl') if vdl else None
        self._writer = None

    def write(self, record):
        self.metrics.write(record)
        keys = VDL_SCALARS.get(record.get('type'), ())
        if self.vdl_dir is None or not keys:
            return
        if self._writer is None:
            from visualdl import LogWriter  # imported when first needed: only rank 0 writes
            self._writer = LogWriter(logdir=self.vdl_dir, flush_secs=5)
        step = int(record.get('global_step') if record.get('global_step') is not None else record.get('epoch') or 0)
        for k in keys:
            v = record.get(k)
            if isinstance(v, (int, float)) and math.isfinite(v):
                self._writer.add_scalar(tag=f"{record['type']}/{k}", value=float(v), step=step)
        self._writer.flush()

    def close(self):
        if self._writer is not None:
            self._writer.close()
            self._writer = None


def open_metrics(run, args, resumed_at=None):
    """The MetricsSink of rank 0 (None elsewhere)."""
    if run.rank != 0:
        return None
    return MetricsSink(run.output_dir, vdl=not getattr(args, 'no_vdl', False), resumed_at=resumed_at)


# ----------------------------------------------------------------------------------------------- AMP

class OverflowGuard:
    """The GradScaler's rule for a non-finite loss under float16 AMP: skip the step (no backward, no update),
    count it, log it, and stop (Diverged) only after AMP_MAX_CONSECUTIVE_SKIPS skipped steps in a row. Without
    float16 AMP a non-finite loss stops the run at once (nothing explains it but divergence)."""

    def __init__(self, enabled, logger, metrics=None, limit=None):
        self.enabled, self.logger, self.metrics = enabled, logger, metrics
        self.limit = AMP_MAX_CONSECUTIVE_SKIPS if limit is None else limit
        self.in_a_row = 0
        self.total = 0
        self.last_ckpt = None  # named in the message when the run stops (the caller keeps it current)

    def check(self, finite, loss, where, last_ckpt=None, global_step=None):
        """True: the step was made. False: it was skipped. Raises Diverged when the run must stop."""
        if finite:
            self.in_a_row = 0
            return True
        if not self.enabled or self.in_a_row + 1 >= self.limit:
            extra = (f' ({self.in_a_row + 1} steps in a row skipped under --amp float16)' if self.enabled else '')
            raise Diverged(f'loss is {loss} at {where}{extra}; stopped without saving; last good checkpoint: '
                           f'{last_ckpt or self.last_ckpt or "none"}')
        self.in_a_row += 1
        self.total += 1
        self.logger.warning(f'loss is {loss} at {where}: step skipped (float16 overflow, {self.in_a_row} in a '
                            f'row, {self.total} in this run; the run stops after {self.limit} in a row)')
        if self.metrics is not None:
            self.metrics.write({'type': 'amp_skip', 'global_step': global_step, 'loss': str(loss),
                                'skipped_in_a_row': self.in_a_row, 'skipped_total': self.total})
        return False


# --------------------------------------------------------------------------------------- the steps

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


def _backward_and_update(loss, optimizer, scaler, before_update):
    optimizer.clear_grad(set_to_zero=False)
    if scaler is None:
        loss.backward()
    else:
        scaler.scale(loss).backward()
    if before_update is not None:
        before_update(optimizer)
    if scaler is None:
        optimizer.step()
    else:
        scaler.step(optimizer)
        scaler.update()
    # Released now rather than by the next step's clear_grad: the gradients would otherwise sit through the
    # next forward, on top of its saved activations (ResNet-50, 8 images per view, CPU: the step's peak of
    # live tensors 61 MiB lower). Read them in before_update.
    optimizer.clear_grad(set_to_zero=False)


def moco_step(model, x1, x2, optimizer, scaler, *, e, lr, epochs, warmup_epochs, moco_m, moco_m_cos,
              amp=False, amp_dtype='float16', poison=False, before_update=None):
    """One MoCo v3 pre-training iteration as the official main_moco runs it.

    e: the fractional epoch (epoch + i / iters_per_epoch); lr: the peak (batch-scaled) learning rate.
    Sets the scheduled learning rate and MoCo momentum, runs the forward (momentum update inside) under
    autocast, all-reduces the loss for logging, then backward through the scaler and the optimizer step.
    poison: turn the loss into NaN (debug hook). before_update(optimizer): called after backward, before
    the optimizer step (the harness reads gradients and optimizer state there); the gradients are released
    after the optimizer step."""
    cur_lr = schedules.adjust_learning_rate(optimizer, e, lr, warmup_epochs, epochs)
    m = schedules.adjust_moco_momentum(e, moco_m, epochs) if moco_m_cos else moco_m
    with paddle.amp.auto_cast(enable=amp, dtype=amp_dtype, level='O1'):
        loss = model(x1, x2, m)
    if poison:
        loss = loss * float('nan')
    loss_all = float(utils.all_reduce_mean(loss).item())
    if not math.isfinite(loss_all):
        return StepResult(loss_all, cur_lr, m, False)
    _backward_and_update(loss, optimizer, scaler, before_update)
    return StepResult(loss_all, cur_lr, m, True)


class EvalStep(NamedTuple):
    loss: float     # this process's loss (lincls) or the mean over processes (finetune)
    output: object  # the logits (for the accuracy)
    finite: bool    # False: NaN/inf loss; no backward and no update were made


def lincls_step(model, images, target, optimizer, criterion, before_update=None):
    """One iteration of the official main_lincls train(): forward (the model stays in eval mode), loss,
    SGD step over the classifier. The learning rate is set per epoch (main_lincls.adjust_learning_rate)."""
    output = model(images)
    loss = criterion(output, target)
    value = float(loss.item())
    if not math.isfinite(value):
        return EvalStep(value, output, False)
    optimizer.clear_grad()
    loss.backward()
    if before_update is not None:
        before_update(optimizer)
    optimizer.step()
    return EvalStep(value, output, True)


def finetune_step(model, samples, targets, optimizer, criterion, scaler=None, amp=False, mixup_fn=None,
                  poison=False, before_update=None):
    """One iteration of DeiT's train_one_epoch: mixup/cutmix on the batch, forward under autocast (logits cast
    to float32 for the loss), loss averaged over processes for logging, backward through the scaler, AdamW."""
    if mixup_fn is not None:
        samples, targets = mixup_fn(samples, targets)
    with paddle.amp.auto_cast(enable=amp, dtype='float16', level='O1'):
        outputs = model(samples)
        loss = criterion(outputs.astype('float32') if amp else outputs, targets)
    if poison:
        loss = loss * float('nan')
    value = float(utils.all_reduce_mean(loss).item())
    if not math.isfinite(value):
        return EvalStep(value, outputs, False)
    _backward_and_update(loss, optimizer, scaler, before_update)
    return EvalStep(value, outputs, True)


# ------------------------------------------------------------------------------------------- main()

def run_main(fn, args, resume_hint='--resume auto'):
    """Call fn(args) under the exit-code convention: 0 done; 2 a usage/input error or a file that cannot be
    written (one line 'error: ...' on stderr); 3 a non-finite loss; 130 interrupted."""
    try:
        fn(args)
    except (RunError, data_mod.DataError, pio.CheckpointError) as e:
        return _fail(e, EXIT_USAGE)
    except Diverged as e:
        return _fail(e, EXIT_DIVERGED)
    except KeyboardInterrupt:
        return _fail('interrupted', 130)
    except OSError as e:  # e.g. metrics.jsonl on a full disk
        where = f"'{e.filename}'" if getattr(e, 'filename', None) else f'a file in --output-dir {args.output_dir}'
        return _fail(f'cannot write {where}: {e.strerror or e}; the checkpoints written so far are intact: fix '
                     f'the cause and rerun with {resume_hint}', EXIT_USAGE)
    finally:
        utils.close_logging()  # log.txt is not held open after the run (in-process callers, notebooks)
    return 0


def _fail(message, code):
    print(f'error: {message}', file=sys.stderr, flush=True)
    return code
