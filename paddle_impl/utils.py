"""Helpers of the training scripts: logging, meters, metrics file and plot, distributed set-up, a
synchronised BatchNorm that also runs on the CPU, optimizer state keyed by parameter names, RNG state.

Nothing here imports torch.
"""
import json
import logging
import math
import os
import random
import sys

import numpy as np
import paddle
import paddle.distributed as dist
import paddle.nn as nn
from paddle.autograd import PyLayer

from . import layers
from .layers import reduce_count

__all__ = ['LOGGER_NAME', 'setup_logging', 'close_logging', 'AverageMeter', 'ProgressMeter', 'format_duration',
           'MetricsWriter', 'read_metrics', 'plot_curves', 'world_size', 'rank', 'is_main_process',
           'init_distributed', 'all_reduce_mean', 'all_reduce_sum', 'SyncBatchNormMixin', 'convert_sync_batchnorm',
           'optimizer_state', 'load_optimizer_state', 'rng_state', 'set_rng_state']

LOGGER_NAME = 'moco'


# ----------------------------------------------------------------------------------------------------- logging

def setup_logging(rank=0, log_file=None, name=LOGGER_NAME):
    """The logger ``name``: rank 0 logs INFO to stdout (and to ``log_file`` if given, appended); other ranks
    only WARNING and above, to stderr. Calling it again replaces the handlers it installed before."""
    close_logging(name)
    logger = logging.getLogger(name)
    logger.propagate = False
    fmt = logging.Formatter('%(asctime)s %(message)s', datefmt='%H:%M:%S')
    if rank == 0:
        logger.setLevel(logging.INFO)
        handlers = [logging.StreamHandler(sys.stdout)]
        if log_file:
            handlers.append(logging.FileHandler(log_file, mode='a'))
    else:
        logger.setLevel(logging.WARNING)
        handlers = [logging.StreamHandler(sys.stderr)]
        fmt = logging.Formatter(f'[rank {rank}] %(asctime)s %(message)s', datefmt='%H:%M:%S')
    for h in handlers:
        h.setFormatter(fmt)
        h._moco_handler = True
        logger.addHandler(h)
    return logger


def close_logging(name=LOGGER_NAME):
    """Remove and close the handlers setup_logging installed (log.txt is released: a run called in-process
    leaves no open file in its output folder)."""
    logger = logging.getLogger(name)
    for h in list(logger.handlers):
        if getattr(h, '_moco_handler', False):
            logger.removeHandler(h)
            h.close()


class AverageMeter:
    """The current value, and the running average since the last reset."""

    def __init__(self, name, fmt=':f'):
        self.name = name
        self.fmt = fmt
        self.reset()

    def reset(self):
        self.val = 0.
        self.avg = 0.
        self.sum = 0.
        self.count = 0

    def update(self, val, n=1):
        self.val = float(val)
        self.sum += float(val) * n
        self.count += n
        self.avg = self.sum / self.count

    def __str__(self):
        return ('{name} {val' + self.fmt + '} ({avg' + self.fmt + '})').format(**self.__dict__)


class ProgressMeter:
    """One progress line: a prefix, the batch counter, then each meter and any extra fields."""

    def __init__(self, num_batches, meters, prefix=''):
        width = len(str(num_batches))
        self.batch_fmt = '[{:' + str(width) + 'd}/' + str(num_batches) + ']'
        self.meters = meters
        self.prefix = prefix

    def line(self, batch, extra=()):
        return '  '.join([self.prefix + self.batch_fmt.format(batch)] + [str(m) for m in self.meters] + list(extra))


def format_duration(seconds):
    """'1:02:03' style; '?' for a non-finite input."""
    if seconds is None or not math.isfinite(seconds):
        return '?'
    seconds = int(round(max(seconds, 0)))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f'{h}:{m:02d}:{s:02d}'


# ------------------------------------------------------------------------------------------ metrics and plots

class MetricsWriter:
    """Appends one JSON object per line to ``path`` (flushed at once, so a crash loses nothing logged)."""

    def __init__(self, path):
        self.path = path

    def write(self, record):
        with open(self.path, 'a') as f:
            f.write(json.dumps(record, sort_keys=True) + '\n')

    def truncate_after(self, global_step):
        """Drop the records of steps after ``global_step`` (a resumed run redoes them). Atomic rewrite."""
        if not os.path.exists(self.path):
            return 0
        keep, dropped = [], 0
        for rec in read_metrics(self.path):
            if rec.get('global_step', 0) > global_step:
                dropped += 1
            else:
                keep.append(rec)
        if dropped:
            tmp = self.path + '.tmp'
            with open(tmp, 'w') as f:
                for rec in keep:
                    f.write(json.dumps(rec, sort_keys=True) + '\n')
            os.replace(tmp, self.path)
        return dropped


def read_metrics(path):
    """The records of a metrics.jsonl (a torn last line is skipped)."""
    out = []
    with open(path) as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                out.append(json.loads(line))
            except ValueError:
                continue
    return out


def plot_curves(metrics_path, png_path, title=None):
    """Loss and learning rate over (fractional) epochs from the step records of ``metrics_path``, and the
    per-epoch mean loss, as a PNG written atomically. Returns False when there is nothing to plot."""
    steps = [r for r in read_metrics(metrics_path) if r.get('type') == 'step']
    epochs = [r for r in read_metrics(metrics_path) if r.get('type') == 'epoch']
    if not steps:
        return False
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    x = [r['epoch_float'] for r in steps]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.6))
    ax1.plot(x, [r['loss'] for r in steps], lw=1, label='loss (logged steps)')
    if epochs:
        ax1.plot([r['epoch'] + 1 for r in epochs], [r['loss_avg'] for r in epochs], 'o-', ms=3,
                 label='epoch mean')
    ax1.set_xlabel('epoch')
    ax1.set_ylabel('loss')
    ax1.legend(fontsize=8)
    ax1.grid(alpha=0.3)
    ax2.plot(x, [r['lr'] for r in steps], lw=1, color='tab:orange', label='lr')
    ax2.set_xlabel('epoch')
    ax2.set_ylabel('learning rate')
    ax2.grid(alpha=0.3)
    if 'm' in steps[0]:
        ax3 = ax2.twinx()
        ax3.plot(x, [r['m'] for r in steps], lw=1, color='tab:green', ls='--', label='moco m')
        ax3.set_ylabel('moco momentum')
        lines = ax2.get_lines() + ax3.get_lines()
        ax2.legend(lines, [line.get_label() for line in lines], fontsize=8)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    tmp = png_path + '.tmp.png'
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, png_path)
    return True


# --------------------------------------------------------------------------------------------- distributed

def world_size():
    return dist.get_world_size() if dist.is_initialized() else 1


def rank():
    return dist.get_rank() if dist.is_initialized() else 0


def is_main_process():
    return rank() == 0


def launched_world_size():
    """How many processes paddle.distributed.launch started (1 when not launched)."""
    try:
        return int(os.environ.get('PADDLE_TRAINERS_NUM', '1'))
    except ValueError:
        return 1


def init_distributed():
    """Initialise the process group when launched with more than one process; returns (rank, world)."""
    if launched_world_size() > 1 and not dist.is_initialized():
        dist.init_parallel_env()
    return rank(), world_size()


def all_reduce_sum(x, group=None):
    """Sum of ``x`` over all ranks, differentiable: the gradient of each rank's input is the sum over
    ranks of the gradients of the output (the all-reduce's adjoint). Identity on one process."""
    if world_size() <= 1:
        return x
    return _AllReduceSum.apply(x, group)


class _AllReduceSum(PyLayer):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        y = x.clone()
        dist.all_reduce(y, op=dist.ReduceOp.SUM, group=group)
        return y

    @staticmethod
    def backward(ctx, dy):
        dx = dy.clone()
        dist.all_reduce(dx, op=dist.ReduceOp.SUM, group=ctx.group)
        return dx


@paddle.no_grad()
def all_reduce_mean(x):
    """Mean over ranks of a tensor, without gradient (a copy; ``x`` is untouched)."""
    y = x.detach().clone()
    n = world_size()
    if n > 1:
        dist.all_reduce(y, op=dist.ReduceOp.SUM)
        y = y / n
    return y


class SyncBatchNormMixin:
    """BatchNorm whose training-mode statistics are those of the global batch (all processes together).

    Works wherever paddle.distributed's all_reduce works, the CPU (gloo) included, where Paddle's
    nn.SyncBatchNorm has no kernel. Per channel, over the batch (and spatial) axes:
      mean = all_reduce(sum x) / N_total;  var = all_reduce(sum (x - mean)^2) / N_total  (two passes)
      y = (x - mean) / sqrt(var + eps) * weight + bias
    Both all-reduces are differentiable (their adjoint is again an all-reduce sum), so autograd produces the
    gradient of the global-batch BN; with DataParallel averaging the parameter gradients, the step equals
    the one of a single process holding the whole batch. Statistics are computed in float32 at least
    (float16/bfloat16 inputs under AMP are cast, the output is cast back). Running statistics follow torch's
    SyncBatchNorm: momentum ``_torch_momentum`` (weight of the new value), unbiased variance over N_total.
    Eval mode, ``use_global_stats``, and a single process use the wrapped class's own forward.
    The collectives run on their own process group (``_sync_group``), so they never interleave with
    DataParallel's gradient all-reduces on the default group.

    On a GPU this formula is NOT used (use_sync_kernel): it costs ~9 passes over the activation forward and
    keeps float32 copies for autograd, where Paddle's fused sync_batch_norm kernel makes 2 passes forward
    and has a fused backward; see _forward_sync_kernel and docs/gpu.md.
    """

    _sync_group = None

    def forward(self, x):
        if not self.training or self._use_global_stats or world_size() <= 1:
            return super().forward(x)
        if use_sync_kernel(x):
            return self._forward_sync_kernel(x)
        if self._data_format not in ('NC', 'NCL', 'NCHW', 'NCDHW'):
            raise ValueError(f'{type(self).__name__}: data format {self._data_format} is not supported when '
                             f'synchronised (channels must be axis 1)')
        xf = x if x.dtype in (paddle.float32, paddle.float64) else x.astype('float32')
        c = xf.shape[1]
        axes = [0] + list(range(2, xf.ndim))
        shape = [1, c] + [1] * (xf.ndim - 2)
        n_local = reduce_count(xf)  # the static shape: int(numel()) would wait for the GPU
        count = paddle.full([1], float(n_local), dtype=xf.dtype)
        tot = all_reduce_sum(paddle.concat([xf.sum(axis=axes), count]), self._sync_group)
        n_total = tot[c:]
        mean = tot[:c] / n_total
        xc = xf - mean.reshape(shape)
        var = all_reduce_sum((xc * xc).sum(axis=axes), self._sync_group) / n_total
        y = xc * paddle.rsqrt(var + self._epsilon).reshape(shape)
        if self.weight is not None:
            y = y * self.weight.astype(xf.dtype).reshape(shape)
        if self.bias is not None:
            y = y + self.bias.astype(xf.dtype).reshape(shape)
        with paddle.no_grad():
            n = float(n_local * world_size())  # per-rank batches are equal (drop_last); no device sync
            unbiased = var.detach() * (n / (n - 1)) if n > 1 else var.detach()
            mom = self._torch_momentum
            dt = self._mean.dtype
            self._mean.set_value((1.0 - mom) * self._mean + mom * mean.detach().astype(dt))
            self._variance.set_value((1.0 - mom) * self._variance + mom * unbiased.astype(dt))
        return y if y.dtype == x.dtype else y.astype(x.dtype)


    def _forward_sync_kernel(self, x):
        """On GPU: Paddle's sync_batch_norm kernel (one statistics pass, one NCCL all-reduce of 2C+1 values on
        the default communicator, one normalise pass; its own fused backward), then torch's running-statistics
        rule restored as for the single-process BN (layers.restore_torch_running_stats). Whether the kernel
        stores the biased variance of the global batch (Paddle 3.3's does: KeSyncAndMovingStats) is asked by
        a probe on every process at once, the first time each input shape is seen."""
        world = world_size()
        c = int(x.shape[1 if self._data_format.startswith('NC') else -1])
        weight, bias = self.weight, self.bias
        if weight is None or bias is None:  # BN1d(affine=False): the kernel wants a scale and a shift
            dt = self._mean.dtype
            weight = paddle.ones([c], dtype=dt) if weight is None else weight
            bias = paddle.zeros([c], dtype=dt) if bias is None else bias
        unbiased = layers.kernel_stores_unbiased(x, self._variance.dtype, self._data_format,
                                                 kernel=_sync_bn_kernel, world=world)
        old_mean, old_var = self._mean.clone(), self._variance.clone()
        y = _sync_bn_kernel(x, self._mean, self._variance, weight, bias, self._momentum, self._epsilon,
                            self._data_format)
        layers.restore_torch_running_stats(self, old_mean, old_var, reduce_count(x) * world, unbiased)
        return y


def _sync_bn_kernel(x, running_mean, running_var, weight, bias, momentum, epsilon, data_format):
    """Paddle's synchronised BN kernel in training mode (GPU only: no CPU kernel is registered); the
    running statistics are updated in place, ``momentum`` the weight of the old value."""
    return paddle._C_ops.sync_batch_norm_(x, running_mean, running_var, weight, bias, False, momentum, epsilon,
                                          data_format, False, False)[0]


def use_sync_kernel(x=None):
    """Whether the synchronised BN runs Paddle's sync_batch_norm kernel (GPU) rather than our all-reduce
    formula (CPU, where Paddle has no such kernel). ``MOCO_SYNC_BN=ours`` forces ours everywhere."""
    if os.environ.get('MOCO_SYNC_BN', 'auto').strip().lower() == 'ours':
        return False
    if x is not None:
        return x.place.is_gpu_place()
    return paddle.device.is_compiled_with_cuda() and paddle.get_device().startswith('gpu')


_SYNC_CLASSES = {}


def _sync_class(cls):
    if cls not in _SYNC_CLASSES:
        _SYNC_CLASSES[cls] = type('Sync' + cls.__name__, (SyncBatchNormMixin, cls), {})
    return _SYNC_CLASSES[cls]


def convert_sync_batchnorm(layer, group=None):
    """Make every BatchNorm inside ``layer`` synchronised (SyncBatchNormMixin) in place, keeping its
    parameters, running statistics and state-dict names. ``group``: the process group of the statistics'
    all-reduces (None: a new group of all ranks, made here, when distributed). Returns (layer, count).

    Paddle's own ``nn.SyncBatchNorm.convert_sync_batchnorm`` is not used: it has no CPU kernel, and it
    would replace our torch-semantics BatchNorm (layers.BatchNorm1D/2D: unbiased running variance) by
    Paddle's plain one. On GPU the converted layers still run Paddle's sync_batch_norm kernel
    (SyncBatchNormMixin._forward_sync_kernel), with torch's running-variance rule restored."""
    if group is None and world_size() > 1 and not use_sync_kernel():  # the GPU kernel uses the default comm
        group = dist.new_group(list(range(world_size())))
    count = 0
    for sub in [layer] + list(layer.sublayers()):
        if isinstance(sub, nn.SyncBatchNorm):
            raise TypeError('convert_sync_batchnorm: the model already holds a paddle.nn.SyncBatchNorm')
        if isinstance(sub, nn.layer.norm._BatchNormBase) and not isinstance(sub, SyncBatchNormMixin):
            if not hasattr(sub, '_torch_momentum'):
                sub._torch_momentum = 1.0 - float(sub._momentum)  # Paddle: weight of the old value
            sub.__class__ = _sync_class(type(sub))
            sub._sync_group = group
            count += 1
    return layer, count


# --------------------------------------------------------------------------------------- optimizer state

def _named_trainable(model):
    return [(n, p) for n, p in model.named_parameters() if not p.stop_gradient]


def optimizer_state(optimizer, model):
    """The optimizer's state keyed by the parameters' structured names (``base_encoder.blocks.0...``),
    not by Paddle's generated tensor names (``linear_12.w_0_moment1_0``), which depend on how many layers
    the process created before: {'accumulators': {acc: {param name: array}}, 'lr': float, 'type': str}."""
    by_tensor_name = {p.name: n for n, p in model.named_parameters()}
    accs = {}
    for acc_name, per_param in optimizer._accumulators.items():
        for tensor_name, var in per_param.items():
            if tensor_name not in by_tensor_name:
                continue
            accs.setdefault(acc_name, {})[by_tensor_name[tensor_name]] = var.numpy()
    master = getattr(optimizer, '_master_weights', None) or {}
    masters = {by_tensor_name[k]: v.numpy() for k, v in master.items() if k in by_tensor_name}
    out = {'type': type(optimizer).__name__, 'lr': float(optimizer.get_lr()), 'accumulators': accs}
    if masters:
        out['master_weights'] = masters
    return out


def load_optimizer_state(optimizer, model, state):
    """Restore what ``optimizer_state`` saved into a freshly built optimizer over the same model.
    Raises ValueError (one line) if the state does not fit the model."""
    if not isinstance(state, dict) or 'accumulators' not in state:
        raise ValueError('the optimizer state is not in the format of paddle_impl.utils.optimizer_state')
    if state.get('type') in ('LARS', 'AdamW') and state['type'] != type(optimizer).__name__:
        raise ValueError(f"the checkpoint's optimizer is {state['type']}, this run uses "
                         f"{type(optimizer).__name__} (pass the --optimizer it was trained with)")
    named = _named_trainable(model)
    # create every accumulator now (Paddle creates them lazily at the first step)
    block = paddle.static.default_main_program().global_block()
    optimizer._create_accumulators(block, [p for _, p in named])
    by_name = dict(named)
    for acc_name, per_param in state['accumulators'].items():
        if acc_name not in optimizer._accumulators:
            raise ValueError(f"the checkpoint's optimizer state has '{acc_name}' accumulators, which "
                             f'{type(optimizer).__name__} does not use')
        for pname, value in per_param.items():
            p = by_name.get(pname)
            if p is None:
                raise ValueError(f"the checkpoint's optimizer state names parameter '{pname}', "
                                 f'which the model has not (or not as trainable)')
            var = optimizer._accumulators[acc_name][p.name]
            value = np.asarray(value)
            if tuple(var.shape) != tuple(value.shape):
                raise ValueError(f"optimizer state '{acc_name}' of '{pname}' has shape {tuple(value.shape)}, "
                                 f'the model needs {tuple(var.shape)}')
            var.set_value(value.astype(var.numpy().dtype, copy=False))
    for pname, value in (state.get('master_weights') or {}).items():
        p = by_name.get(pname)
        if p is not None and p.name in getattr(optimizer, '_master_weights', {}):
            optimizer._master_weights[p.name].set_value(np.asarray(value))
    if 'lr' in state:
        optimizer.set_lr(float(state['lr']))


# -------------------------------------------------------------------------------------------------- RNG

def _gpu_generators():
    """Paddle's per-GPU default generators when this process runs on a GPU, else [] (one per visible GPU:
    the list's length changes when a run resumes with a different number of visible GPUs)."""
    if not (paddle.device.is_compiled_with_cuda() and paddle.get_device().startswith('gpu')):
        return []
    core = paddle.base.core
    return [core.default_cuda_generator(i) for i in range(core.get_cuda_device_count())]


def rng_state():
    """Python's, numpy's and Paddle's (CPU, and every visible GPU's if on a GPU) generator states as plain
    data: containers, ints, floats and strings only (numpy's MT19937 key as a list of ints, not its uint32
    array, so that plain ``paddle.load`` reads a checkpoint holding it: Paddle turns every numpy array it
    finds into a tensor and has no uint32 tensor)."""
    name, key, pos, has_gauss, cached = np.random.get_state()
    state = {'python': random.getstate(),
             'numpy': [str(name), [int(v) for v in key], int(pos), int(has_gauss), float(cached)],
             'paddle_cpu': [g.__getstate__() for g in paddle.get_rng_state('cpu')]}
    gens = _gpu_generators()
    if gens:
        state['paddle_gpu'] = [g.get_state().__getstate__() for g in gens]
    return state


def _generator_states(plain):
    out = []
    for s in plain:
        g = paddle.base.core.GeneratorState.__new__(paddle.base.core.GeneratorState)
        g.__setstate__(tuple(s))
        out.append(g)
    return out


def _numpy_state(v):
    """np.random.set_state's tuple from what rng_state stored: a list holding the key as ints, or (files
    written before) the tuple/list numpy returned, with its uint32 array (or a tensor of it)."""
    key = v[1].numpy() if hasattr(v[1], 'numpy') else v[1]
    return (str(v[0]), np.asarray(key, dtype=np.int64).astype(np.uint32), int(v[2]), int(v[3]), float(v[4]))


def _restore_gpu_states(saved, gens, log=None):
    """Restore the saved per-GPU states into ``gens`` (this process's per-GPU generators) pairwise; where
    the counts differ (a run resumed with another number of visible GPUs) the generators beyond the
    shorter list keep their current state, and one warning line says so. Returns how many were restored."""
    n = min(len(saved), len(gens))
    for g, s in zip(gens[:n], _generator_states(saved[:n])):
        g.set_state(s)
    if len(saved) != len(gens):
        rest = (f'the states of GPUs {n}..{len(saved) - 1} are not used' if len(saved) > len(gens)
                else f'GPUs {n}..{len(gens) - 1} keep their fresh seeds')
        (log or logging.getLogger(LOGGER_NAME)).warning(
            f'RNG state: the checkpoint holds {len(saved)} GPU generator states, this process sees '
            f'{len(gens)} GPUs: restored {n}; {rest} (random draws differ from an uninterrupted run)')
    return n


def set_rng_state(state):
    """Undo ``rng_state``: restore every generator it holds (GPU states: as many as both sides have, see
    _restore_gpu_states)."""
    if 'python' in state:
        v = state['python']
        random.setstate((v[0], tuple(v[1]), v[2]))
    if 'numpy' in state:
        np.random.set_state(_numpy_state(state['numpy']))
    if 'paddle_cpu' in state:
        paddle.set_rng_state(_generator_states(state['paddle_cpu']), 'cpu')
    if 'paddle_gpu' in state:
        _restore_gpu_states(state['paddle_gpu'], _gpu_generators())
