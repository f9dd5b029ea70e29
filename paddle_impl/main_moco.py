"""MoCo v3 pre-training in PaddlePaddle: the twin of the official moco-v3 main_moco.py.

One process (CPU or one GPU):
    python -m paddle_impl.main_moco DATA [options]
Several processes (paddle.distributed.launch takes a script path, not -m):
    python -m paddle.distributed.launch --nproc_per_node N paddle_impl/main_moco.py DATA [options]
    (multi-node: add --nnodes K --master HOST:PORT on every node)

DATA holds train/<class>/<images>. The official flags keep their names and defaults; -b/--batch-size is
the TOTAL batch over all processes (each takes b // world_size) and the learning rate is scaled by b / 256.
With several processes the model is wrapped in paddle.DataParallel (gradients averaged), every BatchNorm
computes global-batch statistics (utils.convert_sync_batchnorm; on the CPU too, where Paddle's SyncBatchNorm
has no kernel) and the contrastive loss gathers the keys of all processes.

Output (rank 0 only), in --output-dir:
  checkpoint_%04d.pdparams  one per epoch, numbered by the epoch being trained (0-based). At the epoch's
                            end it holds {'epoch': e + 1, 'iteration': 0, ...}; saves within the epoch
                            (--save-freq, --max-steps) overwrite the same file with {'epoch': e,
                            'iteration': i} (i iterations of epoch e done). The highest number is always
                            the newest state, which --resume auto picks.
      keys: format, kind ('pretrain'), img_size, epoch, iteration, global_step, arch, state_dict (MoCo model, no 'module.' prefix), optimizer
            (state keyed by parameter names, utils.optimizer_state), scaler, args, rng (python / numpy /
            paddle generators), data_seed, iters_per_epoch, world_size, batch_size, global_batch,
            sampler_total_size, num_images, format. A run on another number of processes resumes a checkpoint
            saved in mid-epoch exactly when its global batches are the same (same_batch_order), else it
            restarts that epoch.
      Files are written atomically (paddle_impl.io.save_checkpoint) and read without running code.
  metrics.jsonl             one JSON object per logged step ({"type": "step", ...}) and per epoch
                            ({"type": "epoch", ...}); a resumed run drops the records after its checkpoint.
  curves.png                loss, learning rate and MoCo momentum, redrawn at each epoch's end.
  log.txt                   the progress lines.

  A run killed in mid-save leaves a hidden .checkpoint_NNNN.pdparams.*.tmp (never picked by --resume auto);
  the next start in that folder removes it.

Exit status: 0 done; 2 a usage or input error, or a file that cannot be written (e.g. a full disk: the last
checkpoint stays intact) (one line 'error: ...' on stderr); 3 the loss became NaN or infinite (nothing is
saved after that: the last checkpoint stays the last good one).

Debugging hooks: the environment variable MOCO_DEBUG_NAN_AT_STEP=K turns the loss of global step K (1-based,
counted from the start of training) into NaN, to exercise the divergence handling; MOCO_DEBUG_SLOW_SAVE=SECONDS
(paddle_impl/io.py) waits between writing a checkpoint and renaming it into place (tests/test_reliability.py
kills the run there).
"""
import os
import sys

if __package__ in (None, ''):  # run as a script (paddle.distributed.launch): make the repo root importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import paddle_impl  # noqa: E402,F401  (sets OMP/MKL defaults before paddle is imported)


paddle_impl.import_paddle_quietly()

import argparse  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import random  # noqa: E402
import re  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402

import numpy as np  # noqa: E402
import paddle  # noqa: E402
import paddle.distributed as dist  # noqa: E402

from paddle_impl import data as data_mod  # noqa: E402
from paddle_impl import io as pio  # noqa: E402
from paddle_impl import loader as loader_mod  # noqa: E402
from paddle_impl import engine, models, schedules, utils  # noqa: E402
from paddle_impl.layers import model_parameters  # noqa: E402
from paddle_impl.optimizer import OPTIMIZERS, build_optimizer  # noqa: E402

CHECKPOINT_FORMAT = 'mocov3-paddle/1'  # as convert/checkpoints.py writes Paddle files
CHECKPOINT_RE = re.compile(r'^checkpoint_(\d+)\.pdparams$')
AUGMENTATIONS = ('byol', 'crop-blur')
EXIT_USAGE = 2
EXIT_DIVERGED = 3


class RunError(Exception):
    """A user error: the message is one line naming what to change."""


class Diverged(Exception):
    """The loss (or a parameter) became NaN/inf."""


def get_parser():
    p = argparse.ArgumentParser(
        description='MoCo v3 ImageNet pre-training (PaddlePaddle)',
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog='Writes checkpoint_%04d.pdparams (per epoch), metrics.jsonl, curves.png and log.txt to '
               '--output-dir.\nSeveral processes: python -m paddle.distributed.launch --nproc_per_node N '
               'paddle_impl/main_moco.py DIR ...\nExit status: 0 done, 2 usage/input error, 3 loss became '
               'NaN/inf (MOCO_DEBUG_NAN_AT_STEP=K forces it at step K).')
    p.add_argument('data', metavar='DIR', help='path to the data set (DIR/train/<class>/<images>)')
    p.add_argument('-a', '--arch', metavar='ARCH', default='resnet50',
                   help='model architecture: ' + ' | '.join(models.ARCHS) + ' (default: resnet50)')
    p.add_argument('-j', '--workers', default=32, type=int, metavar='N',
                   help='number of data loading workers per process (default: 32)')
    p.add_argument('--epochs', default=100, type=int, metavar='N', help='number of total epochs to run')
    p.add_argument('--start-epoch', default=0, type=int, metavar='N',
                   help='manual epoch number (useful on restarts)')
    p.add_argument('-b', '--batch-size', default=4096, type=int, metavar='N',
                   help='mini-batch size (default: 4096), the total of all processes')
    p.add_argument('--lr', '--learning-rate', default=0.6, type=float, metavar='LR', dest='lr',
                   help='initial (base) learning rate, scaled by batch-size / 256')
    p.add_argument('--momentum', default=0.9, type=float, metavar='M', help='momentum of LARS')
    p.add_argument('--wd', '--weight-decay', default=1e-6, type=float, metavar='W', dest='weight_decay',
                   help='weight decay (default: 1e-6)')
    p.add_argument('-p', '--print-freq', default=10, type=int, metavar='N', help='print frequency (default: 10)')
    p.add_argument('--resume', default='', type=str, metavar='PATH',
                   help="path to a checkpoint to resume from, or 'auto': the newest in --output-dir")
    p.add_argument('--seed', default=None, type=int, help='seed for initializing training')

    # moco specific configs:
    p.add_argument('--moco-dim', default=256, type=int, help='feature dimension (default: 256)')
    p.add_argument('--moco-mlp-dim', default=4096, type=int, help='hidden dimension in MLPs (default: 4096)')
    p.add_argument('--moco-m', default=0.99, type=float, help='moco momentum of updating momentum encoder')
    p.add_argument('--moco-m-cos', action='store_true', help='gradually increase moco momentum to 1 with a '
                   'half-cycle cosine schedule')
    p.add_argument('--moco-t', default=1.0, type=float, help='softmax temperature (default: 1.0)')

    # vit specific configs:
    p.add_argument('--stop-grad-conv1', action='store_true', help='stop-grad after first conv, or patch embedding')

    # other upgrades
    p.add_argument('--optimizer', default='lars', type=str, choices=OPTIMIZERS, help='optimizer (default: lars)')
    p.add_argument('--warmup-epochs', default=10, type=int, metavar='N', help='number of warmup epochs')
    p.add_argument('--crop-min', default=0.08, type=float, help='minimum scale for random cropping')

    # this port
    g = p.add_argument_group('Paddle port')
    g.add_argument('--img-size', default=224, type=int, help='input resolution (default: 224)')
    g.add_argument('--output-dir', default='.', help="where checkpoints, logs and plots go (default: '.')")
    g.add_argument('--device', default=None, choices=('cpu', 'gpu'),
                   help='default: gpu if Paddle was built with CUDA, else cpu')
    g.add_argument('--amp', default=None, action=argparse.BooleanOptionalAction,
                   help='automatic mixed precision (default: on for gpu, off for cpu)')
    g.add_argument('--amp-dtype', default='float16', choices=('float16', 'bfloat16'),
                   help='AMP compute type (default: float16, with a GradScaler as the official code)')
    g.add_argument('--save-freq', default=0, type=int, metavar='N',
                   help='also save a checkpoint every N iterations (default: 0, only at epoch ends)')
    g.add_argument('--max-steps', default=0, type=int, metavar='N',
                   help='stop after N iterations of this run, saving a checkpoint (default: 0, no limit)')
    g.add_argument('--aug', default='byol', choices=AUGMENTATIONS,
                   help="views: 'byol' (official, default) or 'crop-blur' (random resized crop + blur only)")
    g.add_argument('--vit-patch-size', default=None, type=int, help='override the ViT patch size')
    g.add_argument('--vit-embed-dim', default=None, type=int, help='override the ViT width')
    g.add_argument('--vit-depth', default=None, type=int, help='override the ViT depth')
    g.add_argument('--vit-num-heads', default=None, type=int, help='override the ViT number of heads')
    return p


# ------------------------------------------------------------------------------------------- validation

def vit_kwargs(args):
    kw = {}
    for flag, key in (('vit_patch_size', 'patch_size'), ('vit_embed_dim', 'embed_dim'),
                      ('vit_depth', 'depth'), ('vit_num_heads', 'num_heads')):
        v = getattr(args, flag, None)
        if v is not None:
            kw[key] = v
    return kw


def check_args(args):
    if args.arch not in models.ARCHS:
        raise RunError(f"unknown arch '{args.arch}'; known: {', '.join(models.ARCHS)}")
    if vit_kwargs(args) and args.arch not in models.VIT_ARCHS:
        raise RunError(f'--vit-* options apply to the ViT archs only, not to {args.arch}')
    for flag in ('epochs', 'batch_size', 'img_size', 'moco_dim', 'moco_mlp_dim'):
        if getattr(args, flag) < 1:
            raise RunError(f"--{flag.replace('_', '-')} must be positive, got {getattr(args, flag)}")
    for flag in ('workers', 'start_epoch', 'warmup_epochs', 'save_freq', 'max_steps'):
        if getattr(args, flag) < 0:
            raise RunError(f"--{flag.replace('_', '-')} must not be negative, got {getattr(args, flag)}")
    if args.print_freq < 1:
        raise RunError(f'--print-freq must be positive, got {args.print_freq}')
    if not 0 < args.crop_min <= 1:
        raise RunError(f'--crop-min must be in (0, 1], got {args.crop_min}')
    if not 0 <= args.moco_m <= 1:
        raise RunError(f'--moco-m must be in [0, 1], got {args.moco_m}')
    if not (args.moco_t > 0 and math.isfinite(args.moco_t)):
        raise RunError(f'--moco-t must be positive, got {args.moco_t}')
    if not (args.lr > 0 and math.isfinite(args.lr)):
        raise RunError(f'--lr must be positive, got {args.lr}')
    if not (args.weight_decay >= 0 and math.isfinite(args.weight_decay)):
        raise RunError(f'--wd must not be negative, got {args.weight_decay}')
    if not 0 <= args.momentum < 1:
        raise RunError(f'--momentum must be in [0, 1), got {args.momentum}')
    for flag in ('vit_patch_size', 'vit_embed_dim', 'vit_depth', 'vit_num_heads'):
        v = getattr(args, flag)
        if v is not None and v < 1:
            raise RunError(f"--{flag.replace('_', '-')} must be positive, got {v}")


def resolve_device(args):
    cuda = paddle.device.is_compiled_with_cuda()
    device = args.device or ('gpu' if cuda else 'cpu')
    if device == 'gpu' and not cuda:
        raise RunError('--device gpu: this Paddle build has no CUDA support (install paddlepaddle-gpu, '
                       'or pass --device cpu)')
    amp = args.amp if args.amp is not None else device == 'gpu'
    return device, amp


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
            os.mkdir(path)
        except FileExistsError:
            pass
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


def train_folder(data):
    if not os.path.isdir(data):
        what = 'is not a folder' if os.path.exists(data) else 'does not exist'
        raise RunError(f'data folder {data} {what}: expected {data}/train/<class>/<images>')
    traindir = os.path.join(data, 'train')
    if not os.path.isdir(traindir):
        raise RunError(f'{data} has no train/ sub-folder: expected {data}/train/<class>/<images>')
    return traindir


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


STALE_TEMP_RE = re.compile(r'^\.checkpoint_\d+\.pdparams\..+\.tmp$')  # io.atomic_write's temporary names


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


def check_free_space(output_dir, model, optimizer_name):
    """Fail before training when --output-dir cannot hold one checkpoint: the weights, and the optimizer's
    buffers (LARS one per trainable parameter, AdamW two). The real file is a little larger."""
    import shutil
    try:
        free = shutil.disk_usage(output_dir).free
    except OSError:
        return
    n_bytes = sum(int(np.prod(t.shape)) * t.element_size() for t in model.state_dict().values())
    n_bytes += (2 if optimizer_name == 'adamw' else 1) * sum(
        int(np.prod(p.shape)) * p.element_size() for p in model.parameters() if not p.stop_gradient)
    if free < n_bytes:
        raise RunError(f'--output-dir {output_dir} has {free / 2**20:.2f} MiB free, a checkpoint of this model '
                       f'needs about {n_bytes / 2**20:.2f} MiB; free space or choose another folder')


def check_readable(dataset):
    """Read one sample here, in this thread: a folder without any readable image fails now with one line
    (DataError), not inside Paddle's DataLoader, whose -j 0 reader thread dies and leaves the training loop
    waiting forever. The warnings about the unreadable files met on the way are shown only if one is found."""
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter('always', data_mod.CorruptImageWarning)
        dataset[0]
    for w in seen:
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)


def load_resume_checkpoint(path, arch):
    if not os.path.isfile(path):
        raise RunError(f'--resume {path}: no such file' if not os.path.exists(path)
                       else f'--resume {path}: not a file')
    try:
        ckpt = pio.load_checkpoint(path)
    except pio.CheckpointError as e:
        raise RunError(f'--resume: {e}') from None
    kind = ckpt.get('kind') if isinstance(ckpt, dict) else None
    if kind not in (None, 'pretrain'):
        what = {'linear': 'a linear-classification checkpoint (main_lincls)',
                'finetune': 'a fine-tuning checkpoint (main_finetune)'}.get(kind, f"a '{kind}' file")
        raise RunError(f'--resume {path} is {what}, not a pre-training one; pass a checkpoint_NNNN.pdparams '
                       f'written by main_moco')
    if not isinstance(ckpt, dict) or 'state_dict' not in ckpt or 'epoch' not in ckpt:
        raise RunError(f'--resume {path}: not a pre-training checkpoint of this port (needs epoch and '
                       f'state_dict); a linear-classification or converted file cannot be resumed')
    ck_arch = ckpt.get('arch')
    if ck_arch != arch:
        raise RunError(f'--resume {path}: the checkpoint is of arch {ck_arch}, this run is --arch {arch}; '
                       f'pass --arch {ck_arch} or another checkpoint')
    return ckpt


def load_model_state(model, state, path):
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    if missing or unexpected:
        raise RunError(f'--resume {path}: the checkpoint does not fit the model ({len(missing)} missing keys, '
                       f'e.g. {missing[:2]}; {len(unexpected)} unexpected, e.g. {unexpected[:2]}); '
                       f'use the --arch/--vit-*/--moco-* settings it was trained with')
    for k, v in own.items():
        if tuple(v.shape) != tuple(np.shape(state[k])):
            raise RunError(f'--resume {path}: {k} has shape {tuple(np.shape(state[k]))} in the checkpoint, '
                           f'{tuple(v.shape)} in the model; use the --vit-*/--moco-*/--img-size settings it '
                           f'was trained with')
    model.set_state_dict({k: np.asarray(v) for k, v in state.items()})


# --------------------------------------------------------------------------------------------- data

def build_views(aug, img_size, crop_min):
    if aug == 'byol':
        return loader_mod.build_augmentations(img_size, crop_min)
    L = loader_mod
    norm = [L.ToTensor(), L.Normalize(L.IMAGENET_MEAN, L.IMAGENET_STD)]
    v1 = L.Compose([L.RandomResizedCrop(img_size, scale=(crop_min, 1.)),
                    L.RandomApply([L.GaussianBlur([.1, 2.])], p=1.0)] + norm)
    v2 = L.Compose([L.RandomResizedCrop(img_size, scale=(crop_min, 1.)),
                    L.RandomApply([L.GaussianBlur([.1, 2.])], p=0.1)] + list(norm))
    return v1, v2


class ResumableBatchSampler(paddle.io.BatchSampler):
    """Wraps a DistributedBatchSampler; ``skip`` batches at the start of the next pass are left out
    (not loaded) so a run resumed in mid-epoch sees exactly the batches it had not seen."""

    def __init__(self, inner):  # noqa: no super().__init__: everything is delegated to `inner`
        self.inner = inner
        self.skip = 0

    def set_epoch(self, epoch):
        self.inner.set_epoch(epoch)

    def __iter__(self):
        skip, self.skip = self.skip, 0
        for k, batch in enumerate(self.inner):
            if k >= skip:
                yield batch

    def __len__(self):
        return max(len(self.inner) - self.skip, 0)


# ----------------------------------------------------------------------------------------- training

def _seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed)
    paddle.seed(seed)


def _shared_int(value):
    """``value`` of rank 0, on every rank."""
    if utils.world_size() <= 1:
        return int(value)
    t = paddle.to_tensor([int(value) if utils.rank() == 0 else 0], dtype='int64')
    dist.all_reduce(t)
    return int(t.item())


def _all_gather_json(obj):
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


# flags that may differ between processes (e.g. a data path mounted elsewhere on another node); everything
# else must be the same on every process, or the processes would run different loops and wait on each other
LOCAL_ARGS = ('data', 'output_dir', 'workers', 'print_freq', 'resume')


def run_settings(args, device, amp):
    s = {k: v for k, v in vars(args).items() if k not in LOCAL_ARGS}
    s.update(device=device, amp=bool(amp))
    return s


def check_agreement(what, values, hint, as_flags=False):
    """Raise RunError, on every rank alike, unless every process holds the same ``values`` (a JSON-able dict).
    Several processes that disagree (on the arch, the batch size, the data, the resume point) would otherwise
    build different models or run loops of different lengths and wait on each other's collectives."""
    everyone = _all_gather_json(values)
    diffs = []
    for r, other in enumerate(everyone[1:], start=1):
        for k in sorted(set(everyone[0]) | set(other)):
            if everyone[0].get(k) != other.get(k):
                name = '--' + k.replace('_', '-') if as_flags else k
                diffs.append(f'{name}: rank 0 {everyone[0].get(k)!r}, rank {r} {other.get(k)!r}')
    if diffs:
        shown = '; '.join(diffs[:4]) + (f' (+{len(diffs) - 4} more)' if len(diffs) > 4 else '')
        raise RunError(f'the {len(everyone)} processes disagree on {what}: {shown}; {hint}')


def same_batch_order(ckpt, iters_per_epoch, world, global_batch, total_size):
    """Whether this run takes the checkpointed run's global batches of an epoch, in the same order, so that a
    resume in mid-epoch can skip the batches done. DistributedBatchSampler pads the index list to
    ``total_size`` (a multiple of the number of processes), shuffles it with a seed made of the epoch alone,
    and gives step i the slice [i*global_batch, (i+1)*global_batch), rank r its r-th part; the images' views
    depend only on (data seed, epoch, index). So the world size matters only through the padding and the
    rounding of the batch per process; checkpoints from before these were saved fall back to 'same world'."""
    if ckpt.get('iters_per_epoch') != iters_per_epoch:
        return False
    if 'sampler_total_size' in ckpt and 'global_batch' in ckpt:
        return int(ckpt['sampler_total_size']) == total_size and int(ckpt['global_batch']) == global_batch
    return ckpt.get('world_size') == world


def _all_finite(layer):
    return all(bool(paddle.isfinite(p).all()) for p in layer.parameters())


def train(args):
    """Pre-train as the official main_moco does; returns a summary dict (and the trained model under
    'model'). Raises RunError on a user error and Diverged on a NaN/inf loss."""
    t_start = time.time()
    # Paddle's BatchNorm warns at every training-mode call that it tracks running statistics: noise here
    warnings.filterwarnings('ignore', message='When training, we now always track global mean and variance')
    check_args(args)
    device, amp = resolve_device(args)
    if device == 'gpu':
        paddle.set_device(f'gpu:{dist.ParallelEnv().device_id}')
    else:
        paddle.set_device('cpu')
    rank, world = utils.init_distributed()
    logger = utils.setup_logging(rank)
    if world > 1:
        check_agreement('their settings', run_settings(args, device, amp),
                        'start every process with the same arguments', as_flags=True)

    traindir = train_folder(args.data)
    output_dir = os.path.abspath(args.output_dir)
    if rank == 0:
        output_dir = prepare_output_dir(output_dir)
        logger = utils.setup_logging(rank, os.path.join(output_dir, 'log.txt'))
        remove_stale_temporaries(output_dir, logger)

    per_proc = args.batch_size // world
    if per_proc < 1:
        raise RunError(f'--batch-size {args.batch_size} is smaller than the number of processes ({world}); '
                       f'each process needs at least one image')
    if args.batch_size % world:
        logger.warning(f'--batch-size {args.batch_size} is not a multiple of {world} processes: '
                       f'{per_proc * world} images per step are used')

    # resume: resolve the file first, so a wrong one fails before anything heavy is built
    ckpt, resume_path = None, None
    if args.resume == 'auto':
        resume_path = find_latest_checkpoint(output_dir)
        if resume_path is None:
            logger.info(f'--resume auto: no checkpoint_*.pdparams in {output_dir}; starting from scratch')
    elif args.resume:
        resume_path = args.resume
    if resume_path:
        try:
            ckpt = load_resume_checkpoint(resume_path, args.arch)
        except RunError as e:
            if args.resume != 'auto':
                raise
            raise RunError(f'{e} (picked by --resume auto as the highest-numbered checkpoint in {output_dir}; '
                           f'move it away to resume from the one before)') from None

    if args.seed is not None:
        _seed_everything(args.seed)
    if ckpt is not None and ckpt.get('data_seed') is not None:
        data_seed = int(ckpt['data_seed'])
    elif args.seed is not None:
        data_seed = args.seed
    else:
        data_seed = _shared_int(int.from_bytes(os.urandom(4), 'little') >> 1)

    aug1, aug2 = build_views(args.aug, args.img_size, args.crop_min)
    try:
        dataset = data_mod.ImageFolder(traindir, loader_mod.TwoCropsTransform(aug1, aug2), seed=data_seed)
        check_readable(dataset)
    except data_mod.DataError as e:
        raise RunError(str(e)) from None
    sampler = paddle.io.DistributedBatchSampler(dataset, batch_size=per_proc, shuffle=True, drop_last=True,
                                                num_replicas=world, rank=rank)
    iters_per_epoch = len(sampler)
    if iters_per_epoch == 0:
        raise RunError(f'--batch-size {args.batch_size} is larger than the data set ({len(dataset)} images in '
                       f'{traindir}' + (f', {sampler.num_samples} per process' if world > 1 else '') +
                       '); lower --batch-size')

    try:
        model = models.build_moco(args.arch, dim=args.moco_dim, mlp_dim=args.moco_mlp_dim, T=args.moco_t,
                                  img_size=args.img_size, stop_grad_conv1=args.stop_grad_conv1,
                                  **vit_kwargs(args))
    except (ValueError, TypeError) as e:
        raise RunError(f'cannot build {args.arch}: {e}') from None
    if world > 1:
        _, n_bn = utils.convert_sync_batchnorm(model)
        logger.info(f'{world} processes: {n_bn} BatchNorm layers synchronised across them')

    optimizer, scaler, lr = engine.moco_training_setup(model, args.optimizer, args.lr, args.batch_size,
                                                       args.weight_decay, args.momentum, amp, args.amp_dtype)
    use_scaler = amp and args.amp_dtype == 'float16'
    if rank == 0:
        check_free_space(output_dir, model, args.optimizer)

    start_epoch, start_iter, global_step = args.start_epoch, 0, args.start_epoch * iters_per_epoch
    if ckpt is not None:
        load_model_state(model, ckpt['state_dict'], resume_path)
        try:
            utils.load_optimizer_state(optimizer, model, ckpt['optimizer'])
        except (ValueError, KeyError) as e:
            raise RunError(f'--resume {resume_path}: {e}') from None
        if ckpt.get('scaler') and use_scaler:
            scaler.load_state_dict(ckpt['scaler'])
        if ckpt.get('rng'):
            utils.set_rng_state(ckpt['rng'])
        start_epoch = int(ckpt['epoch'])
        start_iter = int(ckpt.get('iteration', 0))
        global_step = int(ckpt.get('global_step', start_epoch * iters_per_epoch + start_iter))
        if start_iter and not same_batch_order(ckpt, iters_per_epoch, world, per_proc * world, sampler.total_size):
            logger.warning(f'checkpoint saved in mid-epoch with {ckpt.get("iters_per_epoch")} iterations per '
                           f'epoch on {ckpt.get("world_size")} processes, this run has {iters_per_epoch} on '
                           f'{world} and other batches: epoch {start_epoch} restarts from its first batch')
            start_iter = 0
        logger.info(f"=> loaded checkpoint '{resume_path}' (epoch {start_epoch}, iteration {start_iter}, "
                    f'global step {global_step})')
    if world > 1:
        check_agreement('the data or the resume point',
                        {'images': len(dataset), 'iterations per epoch': iters_per_epoch, 'data seed': data_seed,
                         'start epoch': start_epoch, 'start iteration': start_iter, 'global step': global_step},
                        'every process needs the same data set and the same checkpoint (--resume auto reads '
                        "its node's --output-dir, which only rank 0 writes: on several nodes without a shared "
                        'folder copy the file to each and pass --resume FILE)')
    if start_epoch >= args.epochs:
        logger.info(f'nothing to train: epoch {start_epoch} >= --epochs {args.epochs}')
        return {'model': model, 'epochs_done': start_epoch, 'steps': 0, 'checkpoint': resume_path,
                'time': time.time() - t_start, 'last_loss': None}

    model_without_ddp = model
    if world > 1:
        model = paddle.DataParallel(model)

    batch_sampler = ResumableBatchSampler(sampler)
    train_loader = paddle.io.DataLoader(dataset, batch_sampler=batch_sampler, num_workers=args.workers)

    metrics = None
    if rank == 0:
        metrics = utils.MetricsWriter(os.path.join(output_dir, 'metrics.jsonl'))
        if ckpt is not None:
            metrics.truncate_after(global_step)
        elif os.path.exists(metrics.path):  # a fresh start: keep the old records aside
            os.replace(metrics.path, metrics.path + '.old')

    n_params = sum(int(np.prod(p.shape)) for p in model_parameters(model_without_ddp.base_encoder))
    logger.info(f'arch {args.arch} ({n_params / 1e6:.2f}M params in the base encoder), {len(dataset)} images, '
                f'{world} process(es) x {per_proc} = batch {per_proc * world}, {iters_per_epoch} iterations/epoch, '
                f'{args.optimizer} lr {lr:.4g} (base {args.lr} x {args.batch_size}/256), device {device}, '
                f'amp {amp and args.amp_dtype}')

    nan_at = int(os.environ.get('MOCO_DEBUG_NAN_AT_STEP', '0') or 0)
    moco_m = args.moco_m
    steps_this_run = 0
    total_steps_left = (args.epochs - start_epoch) * iters_per_epoch - start_iter
    if args.max_steps:
        total_steps_left = min(total_steps_left, args.max_steps)
    last_ckpt = resume_path
    last_loss = None
    stop = False
    step_times = utils.AverageMeter('step')

    def save(file_epoch, ck_epoch, iteration):
        nonlocal last_ckpt
        if not _all_finite(model_without_ddp):  # on every rank: the parameters are the same everywhere
            raise Diverged(f'a parameter became NaN/inf by epoch {file_epoch}, iteration {iteration}; '
                           f'not saved; last good checkpoint: {last_ckpt or "none"}')
        if rank != 0:
            return
        path = os.path.join(output_dir, 'checkpoint_%04d.pdparams' % file_epoch)
        obj = {'format': CHECKPOINT_FORMAT, 'kind': 'pretrain', 'img_size': args.img_size,
               'epoch': ck_epoch, 'iteration': iteration,
               'global_step': global_step, 'arch': args.arch, 'state_dict': model_without_ddp.state_dict(),
               'optimizer': utils.optimizer_state(optimizer, model_without_ddp), 'scaler': scaler.state_dict(),
               'args': dict(vars(args)), 'rng': utils.rng_state(), 'data_seed': data_seed,
               'iters_per_epoch': iters_per_epoch, 'world_size': world, 'batch_size': args.batch_size,
               'global_batch': per_proc * world, 'sampler_total_size': sampler.total_size,
               'num_images': len(dataset)}
        try:
            pio.save_checkpoint(obj, path)
        except pio.CheckpointError as e:  # e.g. the disk is full: the file of that name, if any, is untouched
            raise RunError(f'{e}; last checkpoint: {last_ckpt or "none"} (intact); free space or choose another '
                           f'--output-dir (then move the checkpoints there), and rerun with --resume auto') from None
        last_ckpt = path
        logger.info(f'saved {path} (epoch {ck_epoch}, iteration {iteration})')

    for epoch in range(start_epoch, args.epochs):
        skip = start_iter if epoch == start_epoch else 0
        batch_sampler.set_epoch(epoch)
        batch_sampler.skip = skip
        dataset.set_epoch(epoch)
        model.train()

        batch_time = utils.AverageMeter('Time', ':6.3f')
        data_time = utils.AverageMeter('Data', ':6.3f')
        losses = utils.AverageMeter('Loss', ':.4e')
        progress = utils.ProgressMeter(iters_per_epoch, [batch_time, data_time, losses],
                                       prefix=f'Epoch: [{epoch}]')
        t_epoch = end = time.time()
        done = skip
        cur_lr, m = lr, moco_m
        for i, (images, _) in enumerate(train_loader, start=skip):
            data_time.update(time.time() - end)
            e = epoch + i / iters_per_epoch
            global_step += 1
            loss_all, cur_lr, m, finite = engine.moco_step(
                model, images[0], images[1], optimizer, scaler, e=e, lr=lr, epochs=args.epochs,
                warmup_epochs=args.warmup_epochs, moco_m=moco_m, moco_m_cos=args.moco_m_cos, amp=amp,
                amp_dtype=args.amp_dtype, poison=bool(nan_at) and global_step == nan_at)
            if not finite:
                raise Diverged(f'loss is {loss_all} at epoch {epoch}, iteration {i + 1}/{iters_per_epoch} '
                               f'(global step {global_step}); stopped without saving; last good checkpoint: '
                               f'{last_ckpt or "none"}')
            losses.update(loss_all, per_proc * world)

            bt = time.time() - end
            batch_time.update(bt)
            if steps_this_run > 0:  # the first step includes start-up costs
                step_times.update(bt)
            steps_this_run += 1
            done = i + 1
            last_loss = loss_all
            end = time.time()

            if i % args.print_freq == 0 or done == iters_per_epoch:
                ips = per_proc * world / max(batch_time.val, 1e-9)
                avg = step_times.avg if step_times.count else batch_time.avg
                eta = avg * (total_steps_left - steps_this_run)
                logger.info(progress.line(i, [f'LR {cur_lr:.4e}', f'm {m:.5f}', f'img/s {ips:.1f}',
                                              f'ETA {utils.format_duration(eta)}']))
                if metrics:
                    metrics.write({'type': 'step', 'epoch': epoch, 'iteration': done,
                                   'iters_per_epoch': iters_per_epoch, 'global_step': global_step,
                                   'epoch_float': e, 'loss': loss_all, 'lr': cur_lr, 'm': m,
                                   'images_per_s': ips, 'batch_time': batch_time.val,
                                   'data_time': data_time.val, 'time': time.time()})

            if args.max_steps and steps_this_run >= args.max_steps:
                stop = True
                break
            if args.save_freq and global_step % args.save_freq == 0 and done < iters_per_epoch:
                save(epoch, epoch, done)

        epoch_time = time.time() - t_epoch
        if done == iters_per_epoch:
            save(epoch, epoch + 1, 0)
            if rank == 0:
                metrics.write({'type': 'epoch', 'epoch': epoch, 'global_step': global_step,
                               'loss_avg': losses.avg if losses.count else None, 'lr': cur_lr, 'm': m,
                               'epoch_time': epoch_time, 'steps': done - skip,
                               'images_per_s': (done - skip) * per_proc * world / max(epoch_time, 1e-9),
                               'time': time.time()})
                try:
                    utils.plot_curves(metrics.path, os.path.join(output_dir, 'curves.png'),
                                      title=f'MoCo v3 {args.arch} ({output_dir})')
                except Exception as err:  # a plot must never stop training
                    logger.warning(f'could not draw curves.png: {type(err).__name__}: {err}')
                logger.info(f'epoch {epoch} done in {utils.format_duration(epoch_time)}: mean loss '
                            f'{losses.avg:.4f}')
        elif done > skip:
            save(epoch, epoch, done)
        if stop:
            logger.info(f'--max-steps {args.max_steps} reached')
            break

    total = time.time() - t_start
    logger.info(f'finished {steps_this_run} steps in {utils.format_duration(total)}')
    return {'model': model_without_ddp, 'epochs_done': epoch + (1 if done == iters_per_epoch else 0),
            'steps': steps_this_run, 'checkpoint': last_ckpt, 'time': total, 'last_loss': last_loss,
            'output_dir': output_dir}


def main(argv=None):
    args = get_parser().parse_args(argv)
    try:
        train(args)
    except RunError as e:
        print(f'error: {e}', file=sys.stderr, flush=True)
        return EXIT_USAGE
    except Diverged as e:
        print(f'error: {e}', file=sys.stderr, flush=True)
        return EXIT_DIVERGED
    except KeyboardInterrupt:
        print('error: interrupted', file=sys.stderr, flush=True)
        return 130
    except OSError as e:  # e.g. metrics.jsonl on a full disk
        where = f"'{e.filename}'" if getattr(e, 'filename', None) else f'a file in --output-dir {args.output_dir}'
        print(f'error: cannot write {where}: {e.strerror or e}; the checkpoints written so far are intact: fix the '
              f'cause and rerun with --resume auto', file=sys.stderr, flush=True)
        return EXIT_USAGE
    return 0


if __name__ == '__main__':
    sys.exit(main())
