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

Output (rank 0), in --output-dir: checkpoint.pdparams (every epoch), model_best.pdparams (best top-1),
log.txt; atomic writes, read back without running code. --resume PATH continues a run; --eval evaluates
(--resume or --finetune weights) and stops.

Exit status: 0 done; 2 a usage or input error (one line 'error: ...' on stderr); 3 a non-finite loss.
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

import numpy as np  # noqa: E402
import paddle  # noqa: E402
import paddle.nn as nn  # noqa: E402

from paddle_impl import data as data_mod  # noqa: E402
from paddle_impl import finetune_aug as fa  # noqa: E402
from paddle_impl import io as pio  # noqa: E402
from paddle_impl import models, utils  # noqa: E402
from paddle_impl.optimizer import AdamW  # noqa: E402

RunError, Diverged = lc.RunError, lc.Diverged
CHECKPOINT_FORMAT = lc.CHECKPOINT_FORMAT
NO_WEIGHT_DECAY = ('pos_embed', 'cls_token')  # timm VisionTransformer.no_weight_decay()


def get_parser():
    p = argparse.ArgumentParser(description='MoCo v3 end-to-end fine-tuning, DeiT recipe (PaddlePaddle)')
    p.add_argument('data', metavar='DIR', help='path to the data set (DIR/train/<class>, DIR/val/<class>)')
    p.add_argument('-a', '--arch', '--model', dest='arch', default='vit_base',
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
    p.add_argument('--output-dir', default='.', help="where checkpoints and the log go (default: '.')")
    p.add_argument('--device', default=None, choices=('cpu', 'gpu'),
                   help='default: gpu if Paddle was built with CUDA, else cpu')
    p.add_argument('--amp', default=None, action=argparse.BooleanOptionalAction,
                   help='automatic mixed precision, float16 + GradScaler (default: on for gpu, off for cpu)')
    p.add_argument('--seed', default=0, type=int, help='seed (default: 0, as DeiT)')
    p.add_argument('-j', '--num-workers', '--workers', dest='workers', default=10, type=int,
                   help='data loading workers per process (default: 10)')
    p.add_argument('-p', '--print-freq', default=10, type=int, help='print frequency (default: 10)')
    p.add_argument('--num-classes', default=None, type=int,
                   help='classifier outputs (default: the number of class folders in DIR/train)')
    p.add_argument('--fixed-pos-embed', action='store_true',
                   help='keep the sin-cos position embedding frozen (default: trained, as DeiT)')
    p.add_argument('--vit-patch-size', default=None, type=int, help='override the ViT patch size')
    p.add_argument('--vit-embed-dim', default=None, type=int, help='override the ViT width')
    p.add_argument('--vit-depth', default=None, type=int, help='override the ViT depth')
    p.add_argument('--vit-num-heads', default=None, type=int, help='override the ViT number of heads')
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
                    print_freq=10, logger=None):
    """One epoch of DeiT's train_one_epoch: model.train(), mixup/cutmix on the batch, loss, scaled step."""
    model.train()
    losses = utils.AverageMeter('Loss', ':.4f')
    batch_time = utils.AverageMeter('Time', ':6.3f')
    n_iter = len(loader)
    progress = utils.ProgressMeter(n_iter, [batch_time, losses], prefix=f'Epoch: [{epoch}]')
    end = time.time()
    for i, (samples, targets) in enumerate(loader):
        if mixup_fn is not None:
            samples, targets = mixup_fn(samples, targets)
        with paddle.amp.auto_cast(enable=amp, dtype='float16', level='O1'):
            outputs = model(samples)
            loss = criterion(outputs.astype('float32') if amp else outputs, targets)
        value = float(utils.all_reduce_mean(loss).item())
        if not math.isfinite(value):
            raise Diverged(f'loss is {value} at epoch {epoch}, iteration {i + 1}/{n_iter}; stopping training')
        optimizer.clear_grad()
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            optimizer.step()
        losses.update(value, int(samples.shape[0]))
        batch_time.update(time.time() - end)
        end = time.time()
        if logger is not None and (i % print_freq == 0 or i + 1 == n_iter):
            logger.info(progress.line(i, [f'LR {optimizer.get_lr():.4e}']))
    return {'loss': losses.avg}


# ----------------------------------------------------------------------------------------------- resume

def read_resume(path):
    if not os.path.isfile(path):
        raise RunError(f"--resume '{path}': " + ('no such file' if not os.path.exists(path) else 'not a file'))
    try:
        fmt = pio.sniff_format(path)
        obj = pio.load_checkpoint(path) if fmt == 'pickle' else None
    except pio.CheckpointError as e:
        raise RunError(f'--resume: {e}') from None
    kind = lc._our_kind(obj)
    if kind == 'finetune':
        return obj
    hint = {'pretrain': 'a MoCo pre-training checkpoint; pass it as --finetune',
            'linear': 'a linear-classification checkpoint (main_lincls); fine-tuning starts from a backbone '
                      '(--finetune)'}.get(kind, 'not a fine-tuning checkpoint of this port; to start from a '
                                                'backbone pass it as --finetune')
    raise RunError(f"--resume '{path}' is {hint}")


# ------------------------------------------------------------------------------------------------- run

def check_args(args):
    if args.arch not in models.ARCHS:
        raise RunError(f"unknown arch '{args.arch}'; known: {', '.join(models.ARCHS)}")
    if lc.vit_kwargs_of(args) and args.arch not in models.VIT_ARCHS:
        raise RunError(f'--vit-* options apply to the ViT archs only, not to {args.arch}')
    for flag in ('epochs', 'batch_size', 'print_freq', 'recount'):
        if getattr(args, flag) < 1:
            raise RunError(f"--{flag.replace('_', '-')} must be positive, got {getattr(args, flag)}")
    for flag in ('workers', 'start_epoch', 'warmup_epochs'):
        if getattr(args, flag) < 0:
            raise RunError(f"--{flag.replace('_', '-')} must not be negative, got {getattr(args, flag)}")
    for flag in ('img_size', 'num_classes', 'vit_patch_size', 'vit_embed_dim', 'vit_depth', 'vit_num_heads'):
        v = getattr(args, flag, None)
        if v is not None and v < 1:
            raise RunError(f"--{flag.replace('_', '-')} must be positive, got {v}")
    if not (args.lr > 0 and math.isfinite(args.lr)):
        raise RunError(f'--lr must be positive, got {args.lr}')
    if args.clip_grad is not None and not (args.clip_grad > 0 and math.isfinite(args.clip_grad)):
        raise RunError(f'--clip-grad must be positive (it is a maximum gradient norm), got {args.clip_grad}')
    for flag in ('weight_decay', 'warmup_lr', 'min_lr', 'mixup', 'cutmix', 'reprob', 'smoothing', 'drop_path',
                 'color_jitter'):
        if getattr(args, flag) < 0:
            raise RunError(f"--{flag.replace('_', '-')} must not be negative, got {getattr(args, flag)}")
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


def run(args):
    """Fine-tune as DeiT does; returns a summary dict (the model under 'model')."""
    t_start = time.time()
    check_args(args)
    device = lc.resolve_device(args.device)
    amp = args.amp if args.amp is not None else device == 'gpu'
    rank, world = utils.init_distributed()
    logger = utils.setup_logging(rank)

    traindir, valdir = lc.data_folders(args.data, need_train=not args.eval)
    output_dir = os.path.abspath(args.output_dir)
    if rank == 0 and not args.eval:
        output_dir = lc.prepare_output_dir(output_dir)
        logger = utils.setup_logging(rank, os.path.join(output_dir, 'log.txt'))
    per_proc = args.batch_size // world
    if per_proc < 1:
        raise RunError(f'--batch-size {args.batch_size} is smaller than the number of processes ({world})')

    ckpt = read_resume(args.resume) if args.resume else None
    pre = lc.read_pretrained(args.finetune, flag='--finetune') if args.finetune else None
    if pre is not None:
        lc.check_pretrained_arch(pre, args.arch, flag='--finetune')
    if ckpt is not None and ckpt.get('arch') != args.arch:
        raise RunError(f"--resume '{args.resume}' is a {ckpt.get('arch')} model, this run is -a {args.arch}; "
                       f"pass -a {ckpt.get('arch')}")
    if pre is None and ckpt is None:
        logger.warning('neither --finetune nor --resume: training from a random initialisation')

    vit_kwargs = {**((ckpt or {}).get('vit_kwargs') or (pre.vit_kwargs if pre else {})), **lc.vit_kwargs_of(args)}
    img_size = int(args.img_size or (ckpt or {}).get('img_size') or (pre.img_size if pre else None) or 224)
    classes, _ = data_mod.find_classes(valdir if args.eval else traindir)
    num_classes = args.num_classes or len(classes)
    if num_classes < len(classes):
        raise RunError(f'--num-classes {num_classes} is smaller than the {len(classes)} class folders of the data')
    if ckpt is not None and ckpt.get('num_classes') not in (None, num_classes):
        raise RunError(f"--resume '{args.resume}' has {ckpt['num_classes']} classes, the data {num_classes}; "
                       f"pass --num-classes {ckpt['num_classes']} or other data")

    seed = args.seed + rank
    lc.seed_everything(seed)
    extra = dict(vit_kwargs)
    if args.arch in models.VIT_ARCHS:
        extra['drop_path_rate'] = args.drop_path
    elif args.drop_path:
        logger.info(f'--drop-path {args.drop_path} applies to the ViTs only; {args.arch} has none')
    try:
        model = models.encoder_factory(args.arch, img_size=img_size, **extra)(num_classes=num_classes)
    except (ValueError, TypeError) as e:
        raise RunError(f'cannot build {args.arch}: {e}') from None
    if hasattr(model, 'pos_embed'):
        model.pos_embed.stop_gradient = bool(args.fixed_pos_embed)
    if args.arch in models.VIT_ARCHS:
        init_vit_head(model)
    if pre is not None:
        lc.load_backbone_into(model, pre.state_dict, args.arch, pre.path, flag='--finetune')
        logger.info(f"=> loaded '{pre.path}' ({pre.what}) for fine-tuning")

    lr = args.lr * args.batch_size / 512.0
    optimizer = build_optimizer(model, lr, args.weight_decay, tuple(args.opt_betas), args.opt_eps, args.clip_grad)
    scaler = paddle.amp.GradScaler(enable=True, init_loss_scaling=2. ** 16) if amp else None

    mixup_fn = None
    if args.mixup > 0 or args.cutmix > 0:
        mixup_fn = fa.Mixup(args.mixup, args.cutmix, args.mixup_prob, args.mixup_switch_prob, args.smoothing,
                            num_classes, seed=seed)
        criterion = fa.soft_target_cross_entropy
        if per_proc % 2:
            raise RunError(f'mixup/cutmix needs an even batch per process, got {per_proc}; change -b or pass '
                           f'--mixup 0 --cutmix 0')
    elif args.smoothing > 0:
        def criterion(x, t):
            return fa.label_smoothing_cross_entropy(x, t, args.smoothing)
    else:
        criterion = nn.CrossEntropyLoss()

    start_epoch, best_acc1 = args.start_epoch, 0.
    if ckpt is not None:
        lc.load_full_state(model, ckpt['model'], args.resume)
        start_epoch = int(lc._num(ckpt.get('epoch')) or 0)
        best_acc1 = float(lc._num(ckpt.get('best_acc1')) or 0.)
        if not args.eval:
            try:
                utils.load_optimizer_state(optimizer, model, ckpt['optimizer'])
            except (ValueError, KeyError) as e:
                raise RunError(f"--resume '{args.resume}': {e}") from None
            if scaler is not None and ckpt.get('scaler'):
                scaler.load_state_dict(ckpt['scaler'])
            states = ckpt.get('rank_states')
            if isinstance(states, list) and len(states) == world:
                mine = states[rank]
                if mixup_fn is not None and mine.get('mixup'):
                    mixup_fn.set_state_dict(mine['mixup'])
                if mine.get('rng'):
                    utils.set_rng_state(mine['rng'])  # drop path and anything else drawn from Paddle/numpy
            elif states:
                logger.warning(f"--resume: saved with {len(states)} processes, this run has {world}: the random "
                               f"draws of mixup and drop path are not continued exactly")
        logger.info(f"=> resumed '{args.resume}' (epoch {start_epoch}, best acc@1 {best_acc1:.3f})")

    eval_criterion = nn.CrossEntropyLoss()
    train_tf, val_tf = fa.build_finetune_transforms(img_size, args.aa, args.reprob, args.color_jitter, args.remode,
                                                    args.recount)
    val_dataset = lc.check_readable(data_mod.ImageFolder(valdir, val_tf))
    val_loader = paddle.io.DataLoader(lc.val_subset(val_dataset, rank, world), batch_size=max(per_proc, 1),
                                      shuffle=False, num_workers=args.workers)
    summary = {'model': model, 'output_dir': output_dir, 'num_classes': num_classes, 'img_size': img_size,
               'arch': args.arch}
    if args.eval:
        res = lc.evaluate(val_loader, model, eval_criterion)
        logger.info(f" * Acc@1 {res['acc1']:.3f} Acc@5 {res['acc5']:.3f}  (loss {res['loss']:.4f}, "
                    f"{res['count']} images)")
        summary.update(acc1=res['acc1'], acc5=res['acc5'], val_loss=res['loss'], best_acc1=res['acc1'],
                       epochs_done=start_epoch, time=time.time() - t_start)
        return summary

    data_seed = int(lc._num(ckpt['data_seed'])) if ckpt is not None and ckpt.get('data_seed') is not None \
        else args.seed
    train_dataset = lc.check_readable(data_mod.ImageFolder(traindir, train_tf, seed=data_seed))
    sampler = paddle.io.DistributedBatchSampler(train_dataset, batch_size=per_proc, shuffle=True, drop_last=True,
                                                num_replicas=world, rank=rank)
    if len(sampler) == 0:
        raise RunError(f'--batch-size {args.batch_size} is larger than the training set ({len(train_dataset)} '
                       f'images in {traindir}); lower -b')
    train_loader = paddle.io.DataLoader(train_dataset, batch_sampler=sampler, num_workers=args.workers)
    model_without_ddp = model
    if world > 1:
        model = paddle.DataParallel(model)

    n_params = sum(int(np.prod(p.shape)) for p in model_without_ddp.parameters() if not p.stop_gradient)
    logger.info(f'arch {args.arch} (img {img_size}, {n_params / 1e6:.2f}M trained params), {num_classes} classes, '
                f'{len(train_dataset)} train / {len(val_dataset)} val images, {world} x {per_proc} = batch '
                f'{per_proc * world}, AdamW lr {lr:.4g} (base {args.lr} x {args.batch_size}/512) wd '
                f'{args.weight_decay}, mixup {args.mixup} cutmix {args.cutmix} smoothing {args.smoothing}, '
                f'aa {args.aa}, reprob {args.reprob}, drop path {args.drop_path}, device {device}, amp {amp}')

    history, res = [], {'acc1': None, 'acc5': None, 'loss': None}
    for epoch in range(start_epoch, args.epochs):
        sampler.set_epoch(epoch)
        train_dataset.set_epoch(epoch)
        cur_lr = deit_lr(epoch, lr, args.epochs, args.warmup_epochs, args.warmup_lr, args.min_lr)
        optimizer.set_lr(cur_lr)
        tr = train_one_epoch(model, criterion, train_loader, optimizer, epoch, mixup_fn, scaler, amp,
                             args.print_freq, logger)
        res = lc.evaluate(val_loader, model, eval_criterion)
        is_best = res['acc1'] > best_acc1
        best_acc1 = max(best_acc1, res['acc1'])
        logger.info(f" * epoch {epoch}: Acc@1 {res['acc1']:.3f} Acc@5 {res['acc5']:.3f} (best {best_acc1:.3f}); "
                    f"train loss {tr['loss']:.4f}, lr {cur_lr:.4g}")
        history.append({'epoch': epoch, 'lr': cur_lr, 'train_loss': tr['loss'], 'val_loss': res['loss'],
                        'acc1': res['acc1'], 'acc5': res['acc5']})
        # every rank's generators (mixup's, and Paddle's/numpy's/Python's for drop path): a resume with the same
        # number of processes continues the same random draws
        rank_state = {'mixup': mixup_fn.state_dict() if mixup_fn is not None else None, 'rng': utils.rng_state()}
        rank_states = [rank_state]
        if world > 1:
            rank_states = []
            paddle.distributed.all_gather_object(rank_states, rank_state)
        if rank == 0:
            obj = {'format': CHECKPOINT_FORMAT, 'kind': 'finetune', 'epoch': epoch + 1, 'arch': args.arch,
                   'img_size': img_size, 'num_classes': num_classes, 'vit_kwargs': vit_kwargs,
                   'model': model_without_ddp.state_dict(),
                   'optimizer': utils.optimizer_state(optimizer, model_without_ddp),
                   'scaler': scaler.state_dict() if scaler is not None else None, 'best_acc1': best_acc1,
                   'rank_states': rank_states, 'world_size': world, 'data_seed': data_seed, 'finetune': args.finetune,
                   'args': {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(args).items()}}
            pio.save_checkpoint(obj, os.path.join(output_dir, 'checkpoint.pdparams'))
            if is_best:
                pio.save_checkpoint(obj, os.path.join(output_dir, 'model_best.pdparams'))

    summary.update(acc1=res['acc1'], acc5=res['acc5'], val_loss=res['loss'], best_acc1=best_acc1, history=history,
                   epochs_done=args.epochs, time=time.time() - t_start,
                   checkpoint=os.path.join(output_dir, 'checkpoint.pdparams'))
    logger.info(f'done in {utils.format_duration(summary["time"])}: best Acc@1 {best_acc1:.3f}')
    return summary


def main(argv=None):
    args = get_parser().parse_args(argv)
    try:
        run(args)
    except (RunError, data_mod.DataError, pio.CheckpointError) as e:
        print(f'error: {e}', file=sys.stderr, flush=True)
        return lc.EXIT_USAGE
    except Diverged as e:
        print(f'error: {e}', file=sys.stderr, flush=True)
        return lc.EXIT_DIVERGED
    except KeyboardInterrupt:
        print('error: interrupted', file=sys.stderr, flush=True)
        return 130
    return 0


if __name__ == '__main__':
    sys.exit(main())
