"""End-to-end fine-tuning of a MoCo v3 backbone with the DeiT recipe (PaddlePaddle).

The official MoCo v3 fine-tunes its ViTs with the DeiT code base (convert_to_deit.py, then DeiT's main.py);
this script is that recipe on this port's models:
    python -m paddle_impl.main_finetune DATA --finetune PRETRAIN -a vit_base [options]
    python -m paddle.distributed.launch --nproc_per_node N paddle_impl/main_finetune.py DATA --finetune ...

DATA holds train/<class>/<images> and val/<class>/<images>. --finetune takes what main_lincls' --pretrained
takes: a main_moco checkpoint (its base encoder minus the projector), or through convert/ an official
PyTorch pre-training file, a DeiT-format ({'model': ...}, convert_to_deit's output) or bare backbone.

Recipe (DeiT defaults; -b is the TOTAL batch of all processes, DeiT's 64 per GPU x 16 GPUs):
  AdamW (betas 0.9/0.999, eps 1e-8), lr 5e-4 * b / 512, weight decay 0.05 except biases, 1-D (norm)
  parameters, pos_embed and cls_token; learning rate per epoch: linear warm-up from 1e-6 over 5 epochs, then
  cosine to 1e-5 at --epochs (timm CosineLRScheduler: the cosine runs over all epochs, warm-up included);
  label smoothing 0.1; Mixup 0.8 / CutMix 1.0 (switch prob 0.5, prob 1.0); RandAugment rand-m9-mstd0.5-inc1;
  random erasing 0.25; drop path 0.1; 300 epochs (DeiT's default; MoCo v3 fine-tuned ViT-B for 150:
  --epochs 150); RandomResizedCrop bicubic + flip; eval Resize(256/224 * size) bicubic + CenterCrop; top-1/top-5.
  The position embedding is trained from the sin-cos values, as in DeiT's timm ViT (--fixed-pos-embed keeps
  it frozen as in pre-training).
Not reproduced (see README): DeiT's model EMA, repeated augmentation, and DeiT's one-epoch lag of its
per-epoch scheduler (DeiT trains epoch e >= 1 at the rate computed for e - 1).

Output (rank 0), in --output-dir: checkpoint.pdparams (every epoch), model_best.pdparams (best top-1), log.txt,
metrics.jsonl (one {"type": "epoch", ...} record per epoch) and vdl/ (VisualDL scalars; --no-vdl); atomic writes,
read back without running code. --resume PATH continues a run; --eval evaluates (--resume or --finetune weights)
and stops.

Exit status: 0 done; 2 a usage or input error (one line 'error: ...' on stderr); 3 a non-finite loss (under
--amp a NaN/inf loss skips the step, as torch's GradScaler does; exit 3 after
engine.AMP_MAX_CONSECUTIVE_SKIPS (20) skipped steps in a row).
"""
import os
import sys

if __package__ in (None, ''):  # run as a script (paddle.distributed.launch)
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import paddle_impl  # noqa: E402,F401  (sets OMP/MKL defaults before paddle is imported)
from paddle_impl import main_lincls as lc  # noqa: E402  (imports paddle quietly)

import argparse  # noqa: E402
import math  # noqa: E402
import time  # noqa: E402
from types import SimpleNamespace  # noqa: E402

import numpy as np  # noqa: E402
import paddle  # noqa: E402
import paddle.nn as nn  # noqa: E402

from paddle_impl import data as data_mod  # noqa: E402
from paddle_impl import finetune_aug as fa  # noqa: E402
from paddle_impl import engine, models, utils  # noqa: E402
from paddle_impl.engine import CHECKPOINT_FORMAT, Diverged, RunError  # noqa: E402,F401
from paddle_impl.optimizer import AdamW  # noqa: E402

NO_WEIGHT_DECAY = ('pos_embed', 'cls_token')  # timm VisionTransformer.no_weight_decay()


def get_parser():
    p = argparse.ArgumentParser(description='MoCo v3 end-to-end fine-tuning, DeiT recipe (PaddlePaddle)')
    p.add_argument('data', metavar='DIR', help='path to the data set (DIR/train/<class>, DIR/val/<class>)')
    p.add_argument('-a', '--arch', '--model', dest='arch', default='vit_base', type=engine.arch_name,
                   help='model architecture: ' + ' | '.join(models.ARCHS) + ' (default: vit_base)')
    p.add_argument('-b', '--batch-size', default=1024, type=int,
                   help='total batch size of all processes (default: 1024 = DeiT 64 x 16 GPUs)')
    p.add_argument('--epochs', default=300, type=int, help='epochs (default: 300; MoCo v3 ViT-B: 150)')
    p.add_argument('--start-epoch', default=0, type=int, help='manual epoch number (useful on restarts)')
    p.add_argument('--img-size', '--input-size', dest='img_size', default=None, type=int,
                   help="input resolution (default: the pre-trained ViT's, else 224)")
    p.add_argument('--drop-path', default=0.1, type=float, help='drop path rate (default: 0.1; ViTs only)')
    # optimizer
    p.add_argument('--opt-eps', default=1e-8, type=float, help='AdamW epsilon (default: 1e-8)')
    p.add_argument('--opt-betas', default=(0.9, 0.999), type=float, nargs=2, help='AdamW betas')
    p.add_argument('--clip-grad', default=None, type=float, help='clip the global gradient norm (default: off)')
    p.add_argument('--weight-decay', '--wd', dest='weight_decay', default=0.05, type=float,
                   help='weight decay (default: 0.05)')
    # schedule
    p.add_argument('--lr', default=5e-4, type=float, help='base learning rate, scaled by batch-size / 512')
    p.add_argument('--warmup-lr', default=1e-6, type=float, help='learning rate at the start of warm-up')
    p.add_argument('--min-lr', default=1e-5, type=float, help='learning rate at the end of the cosine')
    p.add_argument('--warmup-epochs', default=5, type=int, help='warm-up epochs (default: 5)')
    # augmentation
    p.add_argument('--color-jitter', default=0.4, type=float, help='colour jitter when --aa is none')
    p.add_argument('--aa', default='rand-m9-mstd0.5-inc1', type=str,
                   help="RandAugment policy (default: rand-m9-mstd0.5-inc1; 'none' disables)")
    p.add_argument('--smoothing', default=0.1, type=float, help='label smoothing (default: 0.1)')
    p.add_argument('--reprob', default=0.25, type=float, help='random erasing probability (default: 0.25)')
    p.add_argument('--remode', default='pixel', choices=('pixel',), help='random erasing mode')
    p.add_argument('--recount', default=1, type=int, help='random erasing count')
    p.add_argument('--mixup', default=0.8, type=float, help='mixup alpha, 0 disables (default: 0.8)')
    p.add_argument('--cutmix', default=1.0, type=float, help='cutmix alpha, 0 disables (default: 1.0)')
    p.add_argument('--mixup-prob', default=1.0, type=float, help='probability of mixing a batch')
    p.add_argument('--mixup-switch-prob', default=0.5, type=float, help='probability of cutmix when both on')
    # weights and run
    p.add_argument('--finetune', default='', help='pre-trained backbone to start from')
    p.add_argument('--resume', default='', help='fine-tuning checkpoint to continue from')
    p.add_argument('--eval', action='store_true', help='evaluate only')
    engine.add_port_flags(p, amp_help='automatic mixed precision, float16 + GradScaler (default: on for gpu, '
                                      'off for cpu)')
    p.add_argument('--seed', default=0, type=int, help='seed (default: 0, as DeiT)')
    p.add_argument('-j', '--num-workers', '--workers', dest='workers', default=10, type=int,
                   help='data loading workers per process (default: 10)')
    p.add_argument('-p', '--print-freq', default=10, type=int, help='print frequency (default: 10)')
    p.add_argument('--num-classes', default=None, type=int,
                   help='classifier outputs (default: the number of class folders in DIR/train)')
    p.add_argument('--fixed-pos-embed', action='store_true',
                   help='keep the sin-cos position embedding frozen (default: trained, as DeiT)')
    engine.add_vit_flags(p)
    return p


# ------------------------------------------------------------------------------------------- schedule

def deit_lr(epoch, lr, epochs, warmup_epochs=5, warmup_lr=1e-6, min_lr=1e-5):
    """timm CosineLRScheduler as DeiT configures it (t in epochs, no warm-up prefix, one cycle):
    warm-up: warmup_lr + epoch * (lr - warmup_lr) / warmup_epochs for epoch < warmup_epochs;
    then min_lr + 0.5 * (lr - min_lr) * (1 + cos(pi * epoch / epochs)); min_lr from ``epochs`` on."""
    if epoch < warmup_epochs:
        return warmup_lr + epoch * (lr - warmup_lr) / warmup_epochs
    if epoch >= epochs:
        return min_lr
    return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * epoch / epochs))


def no_decay_names(model):
    """Structured names of the parameters DeiT (timm's create_optimizer) exempts from weight decay:
    1-D parameters, biases, pos_embed and cls_token."""
    return {n for n, p in model.named_parameters()
            if len(p.shape) <= 1 or n.endswith('.bias') or n in NO_WEIGHT_DECAY}


def build_optimizer(model, lr, weight_decay, betas=(0.9, 0.999), eps=1e-8, clip_grad=None):
    named = [(n, p) for n, p in model.named_parameters() if not p.stop_gradient]
    skip = no_decay_names(model)
    decay_tensors = {p.name for n, p in named if n not in skip}
    clip = nn.ClipGradByGlobalNorm(clip_grad) if clip_grad else None
    return AdamW(learning_rate=lr, beta1=betas[0], beta2=betas[1], epsilon=eps, parameters=[p for _, p in named],
                 weight_decay=weight_decay, apply_decay_param_fun=lambda name: name in decay_tensors, grad_clip=clip)


def init_vit_head(model):
    """The classifier of DeiT's timm ViT: weight trunc_normal(std=0.02) truncated at +-2 (absolute, i.e. 100
    std: a plain normal in effect), bias 0. The backbone is then loaded over the rest."""
    w = model.head.weight
    w.set_value(paddle.normal(0.0, 0.02, w.shape).clip(-2.0, 2.0).astype(w.dtype))
    model.head.bias.set_value(paddle.zeros(model.head.bias.shape, dtype=model.head.bias.dtype))


# ------------------------------------------------------------------------------------------- training

def train_one_epoch(model, criterion, loader, optimizer, epoch, mixup_fn=None, scaler=None, amp=False,
                    print_freq=10, logger=None, guard=None):
    """One epoch of DeiT's train_one_epoch: model.train(), then engine.finetune_step (mixup/cutmix on the
    batch, loss, scaled step: the step the parity harness drives) per batch. ``guard``: engine.OverflowGuard
    (skips a NaN/inf loss under float16 AMP; without one a NaN/inf loss stops the run)."""
    model.train()
    guard = guard or engine.OverflowGuard(False, logger)
    losses = utils.AverageMeter('Loss', ':.4f')
    batch_time = utils.AverageMeter('Time', ':6.3f')
    n_iter = len(loader)
    progress = utils.ProgressMeter(n_iter, [batch_time, losses], prefix=f'Epoch: [{epoch}]')
    end = time.time()
    for i, (samples, targets) in enumerate(loader):
        value, _, finite = engine.finetune_step(model, samples, targets, optimizer, criterion, scaler, amp, mixup_fn)
        if guard.check(finite, value, f'epoch {epoch}, iteration {i + 1}/{n_iter}', global_step=epoch + 1):
            losses.update(value, int(samples.shape[0]))
        batch_time.update(time.time() - end)
        end = time.time()
        if logger is not None and (i % print_freq == 0 or i + 1 == n_iter):
            logger.info(progress.line(i, [f'LR {optimizer.get_lr():.4e}']))
    return {'loss': losses.avg}


# ----------------------------------------------------------------------------------------------- resume

def read_resume(path):
    obj, _ = engine.read_checkpoint(path)
    kind = engine.our_kind(obj)
    if kind == 'finetune':
        return obj
    hint = {'pretrain': 'a MoCo pre-training checkpoint; pass it as --finetune',
            'linear': 'a linear-classification checkpoint (main_lincls); fine-tuning starts from a backbone '
                      '(--finetune)'}.get(kind, 'not a fine-tuning checkpoint of this port; to start from a '
                                                'backbone pass it as --finetune')
    raise RunError(f"--resume '{path}' is {hint}")


# ------------------------------------------------------------------------------------------------- run

def check_args(args):
    engine.check_common_args(args, positive=('epochs', 'batch_size', 'print_freq', 'recount'),
                             non_negative=('workers', 'start_epoch', 'warmup_epochs', 'weight_decay', 'warmup_lr',
                                           'min_lr', 'mixup', 'cutmix', 'reprob', 'smoothing', 'drop_path',
                                           'color_jitter'),
                             optional_positive=('img_size', 'num_classes'))
    if args.clip_grad is not None and not (args.clip_grad > 0 and math.isfinite(args.clip_grad)):
        raise RunError(f'--clip-grad must be positive (it is a maximum gradient norm), got {args.clip_grad}')
    for flag in ('reprob', 'smoothing', 'mixup_prob', 'mixup_switch_prob'):
        if not 0 <= getattr(args, flag) <= 1:
            raise RunError(f"--{flag.replace('_', '-')} must be in [0, 1], got {getattr(args, flag)}")
    if not 0 <= args.drop_path < 1:
        raise RunError(f'--drop-path must be in [0, 1), got {args.drop_path}')
    if args.aa and args.aa.lower() != 'none':
        try:
            fa.parse_rand_augment(args.aa)
        except ValueError as e:
            raise RunError(f'--aa: {e}') from None


def build_model(s, args):
    extra = dict(s.vit_kwargs)
    if args.arch in models.VIT_ARCHS:
        extra['drop_path_rate'] = args.drop_path
        extra['pos_embed_dtype'] = None  # DeiT's timm ViT: a learned pos_embed in the default dtype
    elif args.drop_path:
        s.logger.info(f'--drop-path {args.drop_path} applies to the ViTs only; {args.arch} has none')
    try:
        model = models.encoder_factory(args.arch, img_size=s.img_size, **extra)(num_classes=s.num_classes)
    except (ValueError, TypeError) as e:
        raise RunError(f'cannot build {args.arch}: {e}') from None
    if hasattr(model, 'pos_embed'):
        model.pos_embed.stop_gradient = bool(args.fixed_pos_embed)
    if args.arch in models.VIT_ARCHS:
        init_vit_head(model)
    if s.pre is not None:
        lc.load_backbone_into(model, s.pre.state_dict, args.arch, s.pre.path, flag='--finetune')
        s.logger.info(f"=> loaded '{s.pre.path}' ({s.pre.what}) for fine-tuning")
    return model


def build_criterion(args, num_classes, per_proc, seed):
    """(mixup_fn or None, training loss) of the DeiT recipe."""
    if args.mixup > 0 or args.cutmix > 0:
        if per_proc % 2:
            raise RunError(f'mixup/cutmix needs an even batch per process, got {per_proc}; change -b or pass '
                           f'--mixup 0 --cutmix 0')
        return (fa.Mixup(args.mixup, args.cutmix, args.mixup_prob, args.mixup_switch_prob, args.smoothing,
                         num_classes, seed=seed), fa.soft_target_cross_entropy)
    if args.smoothing > 0:
        return None, lambda x, t: fa.label_smoothing_cross_entropy(x, t, args.smoothing)
    return None, nn.CrossEntropyLoss()


def resume_from(s, ckpt, args):
    lc.load_full_state(s.model, ckpt['model'], args.resume)
    s.start_epoch = int(engine.num(ckpt.get('epoch')) or 0)
    s.best_acc1 = float(engine.num(ckpt.get('best_acc1')) or 0.)
    if not args.eval:
        try:
            utils.load_optimizer_state(s.optimizer, s.model, ckpt['optimizer'])
        except (ValueError, KeyError) as e:
            raise RunError(f"--resume '{args.resume}': {e}") from None
        if s.scaler is not None and ckpt.get('scaler'):
            s.scaler.load_state_dict(ckpt['scaler'])
        states = ckpt.get('rank_states')
        if isinstance(states, list) and len(states) == s.run.world:
            mine = states[s.run.rank]
            if s.mixup_fn is not None and mine.get('mixup'):
                s.mixup_fn.set_state_dict(mine['mixup'])
            if mine.get('rng'):
                utils.set_rng_state(mine['rng'])  # drop path and anything else drawn from Paddle/numpy
        elif states:
            s.logger.warning(f"--resume: saved with {len(states)} processes, this run has {s.run.world}: the "
                             f"random draws of mixup and drop path are not continued exactly")
    s.logger.info(f"=> resumed '{args.resume}' (epoch {s.start_epoch}, best acc@1 {s.best_acc1:.3f})")


def setup(args):
    """Everything before the first epoch: checks, processes, files, model, optimizer, loss, resume."""
    check_args(args)
    run = engine.start(args, train=not args.eval, val=True, writes=not args.eval, amp=args.amp)
    s = SimpleNamespace(args=args, run=run, logger=run.logger, evaluate=args.eval, amp=run.amp, t_start=time.time())
    ckpt = s.meta = read_resume(args.resume) if args.resume else None
    lc.read_inputs(s, args, '--finetune', args.finetune)
    if s.pre is None and ckpt is None:
        s.logger.warning('neither --finetune nor --resume: training from a random initialisation')
    s.seed = args.seed + run.rank
    engine.seed_everything(s.seed)
    s.model = build_model(s, args)
    s.lr = args.lr * args.batch_size / 512.0
    s.optimizer = build_optimizer(s.model, s.lr, args.weight_decay, tuple(args.opt_betas), args.opt_eps,
                                  args.clip_grad)
    s.scaler = paddle.amp.GradScaler(enable=True, init_loss_scaling=2. ** 16) if s.amp else None
    s.mixup_fn, s.criterion = build_criterion(args, s.num_classes, run.per_proc, s.seed)
    s.start_epoch, s.best_acc1 = args.start_epoch, 0.
    if ckpt is not None:
        resume_from(s, ckpt, args)
    return s


def finetune_checkpoint(s, epoch):
    """checkpoint.pdparams' content, with every rank's generators (mixup's, and Paddle's/numpy's/Python's for
    drop path): a resume with the same number of processes continues the same random draws."""
    rank_states = [{'mixup': s.mixup_fn.state_dict() if s.mixup_fn is not None else None, 'rng': utils.rng_state()}]
    if s.run.world > 1:
        mine, rank_states = rank_states[0], []
        paddle.distributed.all_gather_object(rank_states, mine)
    args, m = s.args, s.model_without_ddp
    return {'format': CHECKPOINT_FORMAT, 'kind': 'finetune', 'epoch': epoch + 1, 'arch': args.arch,
            'img_size': s.img_size, 'num_classes': s.num_classes, 'vit_kwargs': s.vit_kwargs, 'model': m.state_dict(),
            'optimizer': utils.optimizer_state(s.optimizer, m), 'best_acc1': s.best_acc1,
            'scaler': s.scaler.state_dict() if s.scaler is not None else None, 'rank_states': rank_states,
            'world_size': s.run.world, 'data_seed': s.data_seed, 'finetune': args.finetune,
            'args': {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(args).items()}}


def run(args):
    """Fine-tune as DeiT does; returns a summary dict (the model under 'model')."""
    s = setup(args)
    run_, eval_criterion = s.run, nn.CrossEntropyLoss()
    train_tf, val_tf = fa.build_finetune_transforms(s.img_size, args.aa, args.reprob, args.color_jitter,
                                                    args.remode, args.recount)
    val_loader = lc.val_loader_of(s, val_tf)
    s.model_without_ddp = s.model
    summary = {'model': s.model, 'output_dir': run_.output_dir, 'num_classes': s.num_classes,
               'img_size': s.img_size, 'arch': args.arch}
    if args.eval:
        return lc.evaluate_only(s, val_loader, eval_criterion, summary)
    s.data_seed = engine.data_seed((s.meta or {}).get('data_seed'), args.seed)
    train_dataset = engine.check_readable(data_mod.ImageFolder(run_.traindir, train_tf, seed=s.data_seed))
    sampler = paddle.io.DistributedBatchSampler(train_dataset, batch_size=run_.per_proc, shuffle=True,
                                                drop_last=True, num_replicas=run_.world, rank=run_.rank)
    if len(sampler) == 0:
        raise RunError(f'--batch-size {args.batch_size} is larger than the training set ({len(train_dataset)} '
                       f'images in {run_.traindir}); lower -b')
    train_loader = paddle.io.DataLoader(train_dataset, batch_sampler=sampler, num_workers=args.workers)
    if run_.world > 1:
        s.model = paddle.DataParallel(s.model)
    n_params = sum(int(np.prod(p.shape)) for p in s.model_without_ddp.parameters() if not p.stop_gradient)
    s.logger.info(f'arch {args.arch} (img {s.img_size}, {n_params / 1e6:.2f}M trained params), {s.num_classes} '
                  f'classes, {len(train_dataset)} train / {len(s.val_dataset)} val images, {run_.world} x '
                  f'{run_.per_proc} = batch {run_.per_proc * run_.world}, AdamW lr {s.lr:.4g} (base {args.lr} x '
                  f'{args.batch_size}/512) wd {args.weight_decay}, mixup {args.mixup} cutmix {args.cutmix} smoothing '
                  f'{args.smoothing}, aa {args.aa}, reprob {args.reprob}, drop path {args.drop_path}, device '
                  f'{run_.device}, amp {s.amp}')
    s.metrics = engine.open_metrics(run_, args, resumed_at=s.start_epoch if args.resume else None)
    guard = engine.OverflowGuard(s.amp, s.logger, s.metrics)
    s.history, s.last_ckpt, res = [], args.resume or None, {'acc1': None, 'acc5': None, 'loss': None}
    for epoch in range(s.start_epoch, args.epochs):
        sampler.set_epoch(epoch)
        train_dataset.set_epoch(epoch)
        cur_lr = deit_lr(epoch, s.lr, args.epochs, args.warmup_epochs, args.warmup_lr, args.min_lr)
        s.optimizer.set_lr(cur_lr)
        tr = train_one_epoch(s.model, s.criterion, train_loader, s.optimizer, epoch, s.mixup_fn, s.scaler, s.amp,
                             args.print_freq, s.logger, guard)
        res = lc.validate_and_save(s, epoch, tr, cur_lr, val_loader, eval_criterion,
                                   lambda: finetune_checkpoint(s, epoch))
        guard.last_ckpt = s.last_ckpt
    return lc.finish(s, summary, res)


def main(argv=None):
    args = get_parser().parse_args(argv)
    return engine.run_main(run, args, resume_hint='--resume OUTPUT_DIR/checkpoint.pdparams')


if __name__ == '__main__':
    sys.exit(main())
