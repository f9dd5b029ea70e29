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
  metrics.jsonl             one JSON object per logged step ({"type": "step", ...}), per epoch
                            ({"type": "epoch", ...}), per kNN evaluation ({"type": "knn", ...}, --knn-every)
                            and per skipped AMP step ({"type": "amp_skip", ...}); a resumed run drops the
                            records after its checkpoint.
  vdl/                      the same scalars for VisualDL (visualdl --logdir OUTPUT/vdl); --no-vdl: none.
  curves.png                loss, learning rate and MoCo momentum, redrawn at each epoch's end.
  log.txt                   the progress lines.

  A run killed in mid-save leaves a hidden .checkpoint_NNNN.pdparams.*.tmp (never picked by --resume auto);
  the next start in that folder removes it.

Exit status: 0 done; 2 a usage or input error, or a file that cannot be written (e.g. a full disk: the last
checkpoint stays intact) (one line 'error: ...' on stderr); 3 the loss became NaN or infinite (nothing is
saved after that: the last checkpoint stays the last good one). Under --amp float16 a NaN/inf loss skips the
step instead, as torch's GradScaler does; exit 3 after engine.AMP_MAX_CONSECUTIVE_SKIPS (20) skips in a row.

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
import math  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from types import SimpleNamespace  # noqa: E402

import numpy as np  # noqa: E402
import paddle  # noqa: E402

from paddle_impl import data as data_mod  # noqa: E402
from paddle_impl import engine, models, utils  # noqa: E402
from paddle_impl import io as pio  # noqa: E402
from paddle_impl import loader as loader_mod  # noqa: E402
from paddle_impl.engine import (CHECKPOINT_FORMAT, EXIT_DIVERGED, EXIT_USAGE, Diverged, RunError,  # noqa: E402,F401
                                check_agreement, find_latest_checkpoint, vit_kwargs)
from paddle_impl.layers import model_parameters  # noqa: E402
from paddle_impl.optimizer import OPTIMIZERS  # noqa: E402

AUGMENTATIONS = ('byol', 'crop-blur')


def get_parser():
    p = argparse.ArgumentParser(
        description='MoCo v3 ImageNet pre-training (PaddlePaddle)',
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog='Writes checkpoint_%04d.pdparams (per epoch), metrics.jsonl, vdl/, curves.png and log.txt to '
               '--output-dir.\nSeveral processes: python -m paddle.distributed.launch --nproc_per_node N '
               'paddle_impl/main_moco.py DIR ...\nExit status: 0 done, 2 usage/input error, 3 loss became '
               'NaN/inf (MOCO_DEBUG_NAN_AT_STEP=K forces it at step K).')
    engine.add_official_flags(p, 'path to the data set (DIR/train/<class>/<images>)', 'resnet50', 100, 4096, 0.6,
                              1e-6, 'momentum of LARS', "path to a checkpoint to resume from, or 'auto': the newest "
                              "in --output-dir")

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
    engine.add_port_flags(g, amp_dtype=True, amp_help='automatic mixed precision (default: on for gpu, off for cpu)')
    g.add_argument('--save-freq', default=0, type=int, metavar='N',
                   help='also save a checkpoint every N iterations (default: 0, only at epoch ends)')
    g.add_argument('--max-steps', default=0, type=int, metavar='N',
                   help='stop after N iterations of this run, saving a checkpoint (default: 0, no limit)')
    g.add_argument('--aug', default='byol', choices=AUGMENTATIONS,
                   help="views: 'byol' (official, default) or 'crop-blur' (random resized crop + blur only)")
    engine.add_vit_flags(g)
    g.add_argument('--knn-every', default=0, type=int, metavar='E',
                   help='kNN accuracy of the base encoder every E epochs, on rank 0 (default: 0, off)')
    g.add_argument('--knn-data', default=None, metavar='DIR',
                   help='labelled images for the kNN monitor, class folders as train/ (default: DATA/val)')
    g.add_argument('--knn-max-train', default=10000, type=int, metavar='N',
                   help='at most N images of DATA/train form the kNN memory (default: 10000)')
    return p


# ------------------------------------------------------------------------------------------- validation

def check_args(args):
    engine.check_common_args(args, positive=('epochs', 'batch_size', 'img_size', 'moco_dim', 'moco_mlp_dim',
                                             'print_freq', 'knn_max_train'),
                             non_negative=('workers', 'start_epoch', 'warmup_epochs', 'save_freq', 'max_steps',
                                           'knn_every'))
    if not 0 < args.crop_min <= 1:
        raise RunError(f'--crop-min must be in (0, 1], got {args.crop_min}')
    if not 0 <= args.moco_m <= 1:
        raise RunError(f'--moco-m must be in [0, 1], got {args.moco_m}')
    if not (args.moco_t > 0 and math.isfinite(args.moco_t)):
        raise RunError(f'--moco-t must be positive, got {args.moco_t}')
    if not (args.weight_decay >= 0 and math.isfinite(args.weight_decay)):
        raise RunError(f'--wd must not be negative, got {args.weight_decay}')
    if not 0 <= args.momentum < 1:
        raise RunError(f'--momentum must be in [0, 1), got {args.momentum}')
    if args.knn_every and args.knn_data and not os.path.isdir(args.knn_data):
        raise RunError(f'--knn-data {args.knn_data} is not a folder: expected {args.knn_data}/<class>/<images>')


def load_resume_checkpoint(path, arch):
    ckpt, _ = engine.read_checkpoint(path, quoted=False, paddle_only=True)
    ckpt = ckpt if isinstance(ckpt, dict) else None
    kind = (ckpt or {}).get('kind')
    if kind not in (None, 'pretrain'):
        what = {'linear': 'a linear-classification checkpoint (main_lincls)',
                'finetune': 'a fine-tuning checkpoint (main_finetune)'}.get(kind, f"a '{kind}' file")
        raise RunError(f'--resume {path} is {what}, not a pre-training one; pass a checkpoint_NNNN.pdparams '
                       f'written by main_moco')
    if ckpt is None or 'state_dict' not in ckpt or 'epoch' not in ckpt:
        raise RunError(f'--resume {path}: not a pre-training checkpoint of this port (needs epoch and '
                       f'state_dict); a linear-classification or converted file cannot be resumed')
    if ckpt.get('arch') != arch:
        raise RunError(f"--resume {path}: the checkpoint is of arch {ckpt.get('arch')}, this run is --arch {arch}; "
                       f"pass --arch {ckpt.get('arch')} or another checkpoint")
    return ckpt


def read_resume(args, run):
    """The checkpoint --resume names (PATH or 'auto'), read and checked before anything heavy is built."""
    path = engine.resume_file(args.resume, run.output_dir, run.logger)
    if not path:
        return None, None
    try:
        return load_resume_checkpoint(path, args.arch), path
    except RunError as e:
        if args.resume != 'auto':
            raise
        raise RunError(f'{e} (picked by --resume auto as the highest-numbered checkpoint in {run.output_dir}; '
                       f'move it away to resume from the one before)') from None


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


def build_data(args, run, seed):
    aug1, aug2 = build_views(args.aug, args.img_size, args.crop_min)
    try:
        dataset = data_mod.ImageFolder(run.traindir, loader_mod.TwoCropsTransform(aug1, aug2), seed=seed)
        engine.check_readable(dataset)
    except data_mod.DataError as e:
        raise RunError(str(e)) from None
    sampler = paddle.io.DistributedBatchSampler(dataset, batch_size=run.per_proc, shuffle=True, drop_last=True,
                                                num_replicas=run.world, rank=run.rank)
    if len(sampler) == 0:
        raise RunError(f'--batch-size {args.batch_size} is larger than the data set ({len(dataset)} images in '
                       f'{run.traindir}' + (f', {sampler.num_samples} per process' if run.world > 1 else '') +
                       '); lower --batch-size')
    return dataset, sampler


# ----------------------------------------------------------------------------------------- training

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


def resume_from(s, ckpt, path):
    """Model, optimizer, scaler and RNG state from ``ckpt``; sets s.start_epoch / start_iter / global_step."""
    engine.load_state_exactly(s.model, ckpt['state_dict'], f'--resume {path}: the checkpoint',
                              '--vit-*/--moco-*/--img-size')
    try:
        utils.load_optimizer_state(s.optimizer, s.model, ckpt['optimizer'])
    except (ValueError, KeyError) as e:
        raise RunError(f'--resume {path}: {e}') from None
    if ckpt.get('scaler') and s.amp and s.args.amp_dtype == 'float16':
        s.scaler.load_state_dict(ckpt['scaler'])
    if ckpt.get('rng'):
        utils.set_rng_state(ckpt['rng'])
    s.start_epoch, s.start_iter = int(ckpt['epoch']), int(ckpt.get('iteration', 0))
    s.global_step = int(ckpt.get('global_step', s.start_epoch * s.iters_per_epoch + s.start_iter))
    world, global_batch = s.run.world, s.run.per_proc * s.run.world
    if s.start_iter and not same_batch_order(ckpt, s.iters_per_epoch, world, global_batch, s.sampler.total_size):
        s.logger.warning(f'checkpoint saved in mid-epoch with {ckpt.get("iters_per_epoch")} iterations per '
                         f'epoch on {ckpt.get("world_size")} processes, this run has {s.iters_per_epoch} on '
                         f'{world} and other batches: epoch {s.start_epoch} restarts from its first batch')
        s.start_iter = 0
    s.logger.info(f"=> loaded checkpoint '{path}' (epoch {s.start_epoch}, iteration {s.start_iter}, "
                  f'global step {s.global_step})')


def main_worker(args):
    """Everything before the first step: checks, processes, data, model, optimizer, resume, metrics."""
    # Paddle's BatchNorm warns at every training-mode call that it tracks running statistics: noise here
    warnings.filterwarnings('ignore', message='When training, we now always track global mean and variance')
    check_args(args)
    run = engine.start(args, amp=args.amp, amp_dtype=args.amp_dtype)
    s = SimpleNamespace(args=args, run=run, logger=run.logger, amp=run.amp, t_start=time.time())
    if args.batch_size % run.world:
        s.logger.warning(f'--batch-size {args.batch_size} is not a multiple of {run.world} processes: '
                         f'{run.per_proc * run.world} images per step are used')
    if args.knn_every and run.rank == 0:  # the kNN data must fit before the first epoch, not after it
        try:
            data_mod.check_split(run.traindir, args.knn_data or os.path.join(args.data, 'val'))
        except data_mod.DataError as e:
            raise RunError(f'--knn-every: {e} (--knn-data DIR names labelled images with the classes of '
                           f'DATA/train)') from None
    ckpt, s.resume_path = read_resume(args, run)
    if args.seed is not None:
        engine.seed_everything(args.seed)
    s.data_seed = engine.data_seed((ckpt or {}).get('data_seed'), args.seed)
    s.dataset, s.sampler = build_data(args, run, s.data_seed)
    s.iters_per_epoch = len(s.sampler)
    try:
        s.model = models.build_moco(args.arch, dim=args.moco_dim, mlp_dim=args.moco_mlp_dim, T=args.moco_t,
                                    img_size=args.img_size, stop_grad_conv1=args.stop_grad_conv1,
                                    **vit_kwargs(args))
    except (ValueError, TypeError) as e:
        raise RunError(f'cannot build {args.arch}: {e}') from None
    if run.world > 1:
        _, n_bn = utils.convert_sync_batchnorm(s.model)
        s.logger.info(f'{run.world} processes: {n_bn} BatchNorm layers synchronised across them')
    s.optimizer, s.scaler, s.lr = engine.moco_training_setup(s.model, args.optimizer, args.lr, args.batch_size,
                                                             args.weight_decay, args.momentum, s.amp, args.amp_dtype)
    if run.rank == 0:
        engine.check_free_space(run.output_dir, s.model, 2 if args.optimizer == 'adamw' else 1)
    s.start_epoch, s.start_iter, s.global_step = args.start_epoch, 0, args.start_epoch * s.iters_per_epoch
    if ckpt is not None:
        resume_from(s, ckpt, s.resume_path)
    if run.world > 1:
        check_agreement('the data or the resume point',
                        {'images': len(s.dataset), 'iterations per epoch': s.iters_per_epoch, 'data seed': s.data_seed,
                         'start epoch': s.start_epoch, 'start iteration': s.start_iter, 'global step': s.global_step},
                        'every process needs the same data set and the same checkpoint (--resume auto reads '
                        "its node's --output-dir, which only rank 0 writes: on several nodes without a shared "
                        'folder copy the file to each and pass --resume FILE)')
    return s, ckpt


def save_checkpoint(s, file_epoch, ck_epoch, iteration):
    """checkpoint_<file_epoch>.pdparams (rank 0), after checking on every rank that the weights are finite."""
    if not all(bool(paddle.isfinite(p).all()) for p in s.model_without_ddp.parameters()):
        raise Diverged(f'a parameter became NaN/inf by epoch {file_epoch}, iteration {iteration}; '
                       f'not saved; last good checkpoint: {s.last_ckpt or "none"}')
    if s.run.rank != 0:
        return
    a, m = s.args, s.model_without_ddp
    obj = {'format': CHECKPOINT_FORMAT, 'kind': 'pretrain', 'img_size': a.img_size, 'epoch': ck_epoch,
           'iteration': iteration, 'global_step': s.global_step, 'arch': a.arch, 'state_dict': m.state_dict(),
           'optimizer': utils.optimizer_state(s.optimizer, m), 'scaler': s.scaler.state_dict(),
           'args': dict(vars(a)), 'rng': utils.rng_state(), 'data_seed': s.data_seed,
           'iters_per_epoch': s.iters_per_epoch, 'world_size': s.run.world, 'batch_size': a.batch_size,
           'global_batch': s.run.per_proc * s.run.world, 'sampler_total_size': s.sampler.total_size,
           'num_images': len(s.dataset)}
    path = os.path.join(s.run.output_dir, 'checkpoint_%04d.pdparams' % file_epoch)
    s.last_ckpt = engine.save_checkpoint(obj, path, s.last_ckpt, s.logger)


def log_step(s, progress, meters, epoch, done, e, res):
    batch_time, data_time = meters
    ips = s.run.per_proc * s.run.world / max(batch_time.val, 1e-9)
    avg = s.step_times.avg if s.step_times.count else batch_time.avg
    eta = avg * (s.total_steps_left - s.steps_this_run)
    s.logger.info(progress.line(done - 1, [f'LR {res.lr:.4e}', f'm {res.m:.5f}', f'img/s {ips:.1f}',
                                           f'ETA {utils.format_duration(eta)}']))
    if s.metrics:
        s.metrics.write({'type': 'step', 'epoch': epoch, 'iteration': done, 'iters_per_epoch': s.iters_per_epoch,
                         'global_step': s.global_step, 'epoch_float': e, 'loss': res.loss, 'lr': res.lr,
                         'm': res.m, 'images_per_s': ips, 'batch_time': batch_time.val,
                         'data_time': data_time.val, 'time': time.time()})


def train_one_epoch(s, epoch, skip):
    """The official train(): one epoch from iteration ``skip``; returns (iterations done, loss meter, lr, m).
    Saves within the epoch every --save-freq steps; sets s.stop at --max-steps."""
    a, ipe = s.args, s.iters_per_epoch
    s.batch_sampler.set_epoch(epoch)
    s.batch_sampler.skip = skip
    s.dataset.set_epoch(epoch)
    s.model.train()
    batch_time, data_time = utils.AverageMeter('Time', ':6.3f'), utils.AverageMeter('Data', ':6.3f')
    losses = utils.AverageMeter('Loss', ':.4e')
    progress = utils.ProgressMeter(ipe, [batch_time, data_time, losses], prefix=f'Epoch: [{epoch}]')
    end, done, res = time.time(), skip, engine.StepResult(None, s.lr, a.moco_m, True)
    for i, (images, _) in enumerate(s.train_loader, start=skip):
        data_time.update(time.time() - end)
        e = epoch + i / ipe
        s.global_step += 1
        res = engine.moco_step(s.model, images[0], images[1], s.optimizer, s.scaler, e=e, lr=s.lr, epochs=a.epochs,
                               warmup_epochs=a.warmup_epochs, moco_m=a.moco_m, moco_m_cos=a.moco_m_cos, amp=s.amp,
                               amp_dtype=a.amp_dtype, poison=bool(s.nan_at) and s.global_step == s.nan_at)
        if s.guard.check(res.finite, res.loss, f'epoch {epoch}, iteration {i + 1}/{ipe} (global step '
                         f'{s.global_step})', s.last_ckpt, s.global_step):
            losses.update(res.loss, s.run.per_proc * s.run.world)
            s.last_loss = res.loss
        batch_time.update(time.time() - end)
        if s.steps_this_run > 0:  # the first step includes start-up costs
            s.step_times.update(batch_time.val)
        s.steps_this_run += 1
        done = i + 1
        end = time.time()
        if (i % a.print_freq == 0 or done == ipe) and res.finite:
            log_step(s, progress, (batch_time, data_time), epoch, done, e, res)
        if a.max_steps and s.steps_this_run >= a.max_steps:
            s.stop = True
            break
        if a.save_freq and s.global_step % a.save_freq == 0 and done < ipe:
            save_checkpoint(s, epoch, epoch, done)
    return done, losses, res.lr, res.m


def knn_monitor(s, epoch):
    """--knn-every: kNN top-1 of the frozen base encoder (rank 0), logged to metrics.jsonl and VisualDL."""
    from paddle_impl import knn  # the kNN monitor (paddle_impl/knn.py)
    a = s.args
    res = knn.knn_monitor(s.model_without_ddp.base_encoder, s.run.traindir,
                          a.knn_data or os.path.join(a.data, 'val'), img_size=a.img_size, k=20,
                          max_train=a.knn_max_train, batch_size=s.run.per_proc)
    s.metrics.write({'type': 'knn', 'epoch': epoch, 'global_step': s.global_step, **res})
    s.logger.info(f"epoch {epoch}: kNN top-1 {100 * res['knn_top1']:.2f}% ({res['n_train']} train / "
                  f"{res['n_val']} val images, {res['seconds']:.1f} s)")
    s.model.train()


def end_of_epoch(s, epoch, skip, done, losses, cur_lr, m, epoch_time):
    save_checkpoint(s, epoch, epoch + 1, 0)
    if s.run.rank != 0:
        return
    gb = s.run.per_proc * s.run.world
    s.metrics.write({'type': 'epoch', 'epoch': epoch, 'global_step': s.global_step,
                     'loss_avg': losses.avg if losses.count else None, 'lr': cur_lr, 'm': m,
                     'epoch_time': epoch_time, 'steps': done - skip, 'time': time.time(),
                     'images_per_s': (done - skip) * gb / max(epoch_time, 1e-9)})
    if s.args.knn_every and (epoch + 1) % s.args.knn_every == 0:
        knn_monitor(s, epoch)
    try:
        utils.plot_curves(s.metrics.path, os.path.join(s.run.output_dir, 'curves.png'),
                          title=f'MoCo v3 {s.args.arch} ({s.run.output_dir})')
    except Exception as err:  # a plot must never stop training
        s.logger.warning(f'could not draw curves.png: {type(err).__name__}: {err}')
    s.logger.info(f'epoch {epoch} done in {utils.format_duration(epoch_time)}: mean loss {losses.avg:.4f}')


def train(args):
    """Pre-train as the official main_moco does; returns a summary dict (and the trained model under
    'model'). Raises RunError on a user error and Diverged on a NaN/inf loss."""
    s, ckpt = main_worker(args)
    a, run = args, s.run
    if s.start_epoch >= a.epochs:
        s.logger.info(f'nothing to train: epoch {s.start_epoch} >= --epochs {a.epochs}')
        return {'model': s.model, 'epochs_done': s.start_epoch, 'steps': 0, 'checkpoint': s.resume_path,
                'time': time.time() - s.t_start, 'last_loss': None}
    s.model_without_ddp = s.model
    if run.world > 1:
        s.model = paddle.DataParallel(s.model)
    s.batch_sampler = ResumableBatchSampler(s.sampler)
    s.train_loader = paddle.io.DataLoader(s.dataset, batch_sampler=s.batch_sampler, num_workers=a.workers)
    s.metrics = engine.open_metrics(run, a, resumed_at=s.global_step if ckpt is not None else None)
    s.guard = engine.OverflowGuard(s.amp and a.amp_dtype == 'float16', s.logger, s.metrics)
    n_params = sum(int(np.prod(p.shape)) for p in model_parameters(s.model_without_ddp.base_encoder))
    s.logger.info(f'arch {a.arch} ({n_params / 1e6:.2f}M params in the base encoder), {len(s.dataset)} images, '
                  f'{run.world} process(es) x {run.per_proc} = batch {run.per_proc * run.world}, {s.iters_per_epoch} '
                  f'iterations/epoch, {a.optimizer} lr {s.lr:.4g} (base {a.lr} x {a.batch_size}/256), device '
                  f'{run.device}, amp {s.amp and a.amp_dtype}')
    s.nan_at = int(os.environ.get('MOCO_DEBUG_NAN_AT_STEP', '0') or 0)
    s.steps_this_run, s.last_ckpt, s.last_loss, s.stop = 0, s.resume_path, None, False
    s.total_steps_left = (a.epochs - s.start_epoch) * s.iters_per_epoch - s.start_iter
    if a.max_steps:
        s.total_steps_left = min(s.total_steps_left, a.max_steps)
    s.step_times = utils.AverageMeter('step')
    for epoch in range(s.start_epoch, a.epochs):
        skip = s.start_iter if epoch == s.start_epoch else 0
        t_epoch = time.time()
        done, losses, cur_lr, m = train_one_epoch(s, epoch, skip)
        if done == s.iters_per_epoch:
            end_of_epoch(s, epoch, skip, done, losses, cur_lr, m, time.time() - t_epoch)
        elif done > skip:
            save_checkpoint(s, epoch, epoch, done)
        if s.stop:
            s.logger.info(f'--max-steps {a.max_steps} reached')
            break
    if s.metrics:
        s.metrics.close()
    total = time.time() - s.t_start
    s.logger.info(f'finished {s.steps_this_run} steps in {utils.format_duration(total)}')
    return {'model': s.model_without_ddp, 'epochs_done': epoch + (1 if done == s.iters_per_epoch else 0),
            'steps': s.steps_this_run, 'checkpoint': s.last_ckpt, 'time': total, 'last_loss': s.last_loss,
            'output_dir': run.output_dir}


def main(argv=None):
    args = get_parser().parse_args(argv)
    return engine.run_main(train, args)


if __name__ == '__main__':
    sys.exit(main())
