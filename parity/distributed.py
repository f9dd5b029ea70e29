"""Distributed semantics on the CPU: W processes, each holding N samples, take the same MoCo v3 training
steps as one process holding the W*N samples, in Paddle (paddle_impl) and in torch (torch_ref) alike.

What a step on W processes does (official main_moco): each rank r takes rows [r*N, (r+1)*N) of the global
batch; every BatchNorm is synchronised (statistics of the global batch: paddle_impl.utils.SyncBatchNormMixin,
torch_ref.distributed.SyncBatchNormCPU on the CPU); the contrastive loss gathers the keys of all ranks and
offsets its labels by N*r, so rank r holds the cross-entropy of rows r*N.. of the global logits matrix,
averaged over its N rows; DataParallel / DistributedDataParallel average the gradients over ranks. The mean
over ranks of the per-rank losses is the single process's loss over the 2N rows, and the averaged gradient is
its gradient, so the parameters after K optimizer steps agree to rounding (float64: ~1e-15 relative).

Layout of a work folder (``prepare``):
    spec.json                 the cases (arch, optimizer, sizes, schedule), K, N, W
    weights_<case>.npz        the torch_ref model's state dict (torch names), seeded, built once here; stored
                              in float32, which is lossless (torch_ref initialises in float32)
    batches_<case>.npz        x1, x2: [K, W*N, 3, H, W] float64 random views
    result_<fw>_w<W>_r<r>_<case>.npz   what a worker recorded (``run_worker``); rank 0 writes tensors,
                              other ranks only their losses
Recorded per case: per step the rank's loss, the mean loss over ranks, lr and moco m; the gradients of the
first step (after DDP averaging); BN running statistics after the first step and at the end; every
parameter at the end; the largest difference between ranks of the final parameters and the first gradients
(all-reduce max - min: 0 means every rank holds the same bits).

Workers: Paddle under ``python -m paddle.distributed.launch --nproc_per_node W parity/distributed.py worker
paddle DIR``; torch as W plain processes ``python parity/distributed.py worker torch DIR --rank r --world W
--init file://...`` (gloo). One process (W = 1): the same ``run_worker`` without a process group.
Paddle-side code never imports torch and torch-side code never imports paddle (lazy imports below).
"""
import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if __package__ in (None, ''):  # run as a script (paddle.distributed.launch takes a script path)
    if sys.path and os.path.abspath(sys.path[0]) == os.path.dirname(os.path.abspath(__file__)):
        sys.path.pop(0)  # parity/ itself must not shadow top-level modules
    sys.path.insert(0, REPO)

from parity.compare import ATOL, TOL, compare, flag  # noqa: E402  (numpy only)

# the cases of the float64 proof: vit_small at 32 px (2x2 patches of 16) with its depth cut to 2, AdamW as the
# ViT recipe; ResNet-50 at 32 px with LARS as the ResNet recipe. Small MLP dims keep the float64 runs short.
# per_rank: samples per process (the global batch is world * per_rank). The ViT needs a global batch of 8:
# with 4, its BatchNorms see nearly constant channels at init and the problem is ill-conditioned (measured:
# a 1e-15 relative change of the input moved the parameters after 3 AdamW steps by 2e-9, against 1e-12 with
# 8), which would blur a 1e-9 comparison; ResNet-50 is well conditioned at 4 (3e-12) and costs half as much.
CASES = {
    'vit_small': dict(arch='vit_small', optimizer='adamw', lr=1.5e-4 * 4096 / 256, wd=0.1, dim=16, mlp_dim=32,
                      T=0.2, vit_kwargs={'depth': 2}, stop_grad_conv1=True, per_rank=4),
    'resnet50': dict(arch='resnet50', optimizer='lars', lr=0.6, wd=1e-6, dim=16, mlp_dim=32, T=1.0,
                     vit_kwargs={}, stop_grad_conv1=False, per_rank=2),
}
# schedule: iterations start_iter.. of an epoch of iters_per_epoch (warm-up 1 epoch, cosine to `epochs`)
SCHEDULE = dict(start_iter=1, iters_per_epoch=4, warmup_epochs=1, epochs=4, moco_m=0.99)
BN_STATS_PADDLE = ('._mean', '._variance')


def _env(threads=1, **extra):
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS=str(threads), PYTHONPATH=REPO)
    for k in ('MOCO_DEBUG_NAN_AT_STEP', 'PADDLE_TRAINERS_NUM', 'PADDLE_TRAINER_ID', 'PADDLE_MASTER',
              'PADDLE_TRAINER_ENDPOINTS', 'PADDLE_CURRENT_ENDPOINT'):
        env.pop(k, None)
    env.update({k: str(v) for k, v in extra.items()})
    return env


# ------------------------------------------------------------------------------------------ preparation

def prepare(workdir, cases=('vit_small', 'resnet50'), steps=3, world=2, img_size=32, seed=0, per_rank=None):
    """Write spec.json, the seeded torch_ref weights and the global batches of each case into ``workdir``.
    ``per_rank``: overrides the cases' samples per process."""
    import torch
    from torch_ref import models as tm

    os.makedirs(workdir, exist_ok=True)
    spec = {'cases': {}, 'steps': steps, 'world': world, 'img_size': img_size, 'seed': seed,
            'schedule': SCHEDULE}
    rng = np.random.default_rng(seed + 7)
    for name in cases:
        c = dict(CASES[name])
        if per_rank:
            c['per_rank'] = per_rank
        spec['cases'][name] = c
        torch.manual_seed(seed)
        model = tm.build_moco(c['arch'], c['dim'], c['mlp_dim'], c['T'], img_size=img_size,
                              stop_grad_conv1=c['stop_grad_conv1'], **c['vit_kwargs'])
        sd = {k: v.detach().cpu().numpy() for k, v in model.state_dict().items()}
        np.savez(os.path.join(workdir, f'weights_{name}.npz'), **sd)
        del model
        shape = (steps, world * c['per_rank'], 3, img_size, img_size)
        np.savez(os.path.join(workdir, f'batches_{name}.npz'), x1=rng.standard_normal(shape),
                 x2=rng.standard_normal(shape))
    with open(os.path.join(workdir, 'spec.json'), 'w') as f:
        json.dump(spec, f, indent=1)
    return spec


def load_spec(workdir):
    with open(os.path.join(workdir, 'spec.json')) as f:
        return json.load(f)


def result_path(workdir, framework, world, rank, case):
    return os.path.join(workdir, f'result_{framework}_w{world}_r{rank}_{case}.npz')


# ------------------------------------------------------------------------------------------ the schedule

def _schedule(i):
    """The fractional epoch of step i (its lr and moco m then come from schedules.py on either side)."""
    s = SCHEDULE
    return (s['start_iter'] + i) / s['iters_per_epoch']


# ------------------------------------------------------------------------------------------ Paddle side

class _PaddleSide:
    name = 'paddle'

    def __init__(self, rank, world):
        import paddle
        import paddle.distributed as dist
        self.paddle, self.dist = paddle, dist
        self.rank, self.world = rank, world

    def build(self, c, img_size, weights):
        from convert.bridge import load_into_paddle
        from convert.keymap import torch_to_paddle
        from paddle_impl import models as pm
        paddle = self.paddle
        old = paddle.get_default_dtype()
        paddle.set_default_dtype('float64')
        try:
            model = pm.build_moco(c['arch'], c['dim'], c['mlp_dim'], c['T'], img_size=img_size,
                                  stop_grad_conv1=c['stop_grad_conv1'], **c['vit_kwargs'])
        finally:
            paddle.set_default_dtype(old)
        sd, _ = torch_to_paddle(weights)
        load_into_paddle(model, sd, f'weights of {c["arch"]}')
        model.train()
        return model

    def distribute(self, model):
        from paddle_impl import utils
        if self.world > 1:
            utils.convert_sync_batchnorm(model)
            return self.paddle.DataParallel(model)
        return model

    def optimizer(self, c, model):
        from paddle_impl.layers import model_parameters
        from paddle_impl.optimizer import build_optimizer
        return build_optimizer(c['optimizer'], model_parameters(model), c['lr'], c['wd'])

    def set_lr(self, opt, c, e):
        from paddle_impl import schedules
        s = SCHEDULE
        lr = schedules.adjust_learning_rate(opt, e, c['lr'], s['warmup_epochs'], s['epochs'])
        return lr, schedules.adjust_moco_momentum(e, s['moco_m'], s['epochs'])

    def tensor(self, a):
        return self.paddle.to_tensor(np.ascontiguousarray(a))

    def backward_step(self, opt, loss, record_grads, inner):
        opt.clear_grad()
        loss.backward()
        grads = None
        if record_grads:
            grads = {k: p.grad for k, p in inner.named_parameters() if p.grad is not None}
        return grads

    def step(self, opt):
        opt.step()

    def to_numpy(self, t):
        return np.array(t.numpy(), copy=True)

    def mean_over_ranks(self, t):
        y = t.detach().clone()
        if self.world > 1:
            self.dist.all_reduce(y)
            y = y / self.world
        return float(y.item())

    def spread(self, tensors):
        """max over tensors of max|max over ranks - min over ranks| (0.0: every rank holds the same bits)."""
        if self.world <= 1:
            return 0.0
        worst = 0.0
        for t in tensors:
            hi, lo = t.detach().clone(), t.detach().clone()
            self.dist.all_reduce(hi, op=self.dist.ReduceOp.MAX)
            self.dist.all_reduce(lo, op=self.dist.ReduceOp.MIN)
            worst = max(worst, float((hi - lo).abs().max().item()))
        return worst

    def params(self, inner):
        """Every parameter (BN running statistics apart), Paddle names and layouts."""
        return {k: p for k, p in inner.named_parameters() if not k.endswith(BN_STATS_PADDLE)}

    def bn_stats(self, inner):
        return {k: p for k, p in inner.named_parameters() if k.endswith(BN_STATS_PADDLE)}


# ------------------------------------------------------------------------------------------ torch side

class _TorchSide:
    name = 'torch'

    def __init__(self, rank, world):
        import torch
        import torch.distributed as dist
        self.torch, self.dist = torch, dist
        self.rank, self.world = rank, world

    def build(self, c, img_size, weights):
        from torch_ref import models as tm
        torch = self.torch
        old = torch.get_default_dtype()
        torch.set_default_dtype(torch.float64)  # built in float64 as the original is: its pos_embed stays float32
        try:
            model = tm.build_moco(c['arch'], c['dim'], c['mlp_dim'], c['T'], img_size=img_size,
                                  stop_grad_conv1=c['stop_grad_conv1'], **c['vit_kwargs'])
        finally:
            torch.set_default_dtype(old)
        model.load_state_dict({k: torch.from_numpy(np.asarray(v)) for k, v in weights.items()})
        model.train()
        return model

    def distribute(self, model):
        if self.world > 1:
            from torch_ref.distributed import convert_sync_batchnorm
            model = convert_sync_batchnorm(model)
            return self.torch.nn.parallel.DistributedDataParallel(model), model
        return model, model

    def optimizer(self, c, model):
        from torch_ref.optimizer import build_optimizer
        return build_optimizer(c['optimizer'], model.parameters(), c['lr'], c['wd'])

    def set_lr(self, opt, c, e):
        from torch_ref import schedules
        s = SCHEDULE
        lr = schedules.adjust_learning_rate(opt, e, c['lr'], s['warmup_epochs'], s['epochs'])
        return lr, schedules.adjust_moco_momentum(e, s['moco_m'], s['epochs'])

    def tensor(self, a):
        return self.torch.from_numpy(np.ascontiguousarray(a))

    def backward_step(self, opt, loss, record_grads, inner):
        opt.zero_grad()
        loss.backward()
        grads = None
        if record_grads:
            grads = {k: p.grad for k, p in inner.named_parameters() if p.grad is not None}
        return grads

    def step(self, opt):
        opt.step()

    def to_numpy(self, t):
        return t.detach().cpu().numpy().copy()  # not a view of a buffer that later steps update in place

    def mean_over_ranks(self, t):
        y = t.detach().clone()
        if self.world > 1:
            self.dist.all_reduce(y)
            y = y / self.world
        return float(y.item())

    def spread(self, tensors):
        if self.world <= 1:
            return 0.0
        worst = 0.0
        for t in tensors:
            hi, lo = t.detach().clone(), t.detach().clone()
            self.dist.all_reduce(hi, op=self.dist.ReduceOp.MAX)
            self.dist.all_reduce(lo, op=self.dist.ReduceOp.MIN)
            worst = max(worst, float((hi - lo).abs().max().item()))
        return worst

    def params(self, inner):
        return dict(inner.named_parameters())

    def bn_stats(self, inner):
        return {k: b for k, b in inner.named_buffers() if not k.endswith('num_batches_tracked')}


# ------------------------------------------------------------------------------------------ the worker

def run_case(side, name, spec, workdir, save=True):
    """K training steps of case ``name`` on this rank; returns (and, if ``save``, writes) the record."""
    c = spec['cases'][name]
    n, rank, world = c['per_rank'], side.rank, side.world
    with np.load(os.path.join(workdir, f'weights_{name}.npz')) as z:
        weights = {k: z[k].astype(np.float64) if z[k].dtype.kind == 'f' else z[k] for k in z.files}
    with np.load(os.path.join(workdir, f'batches_{name}.npz')) as z:
        x1s, x2s = z['x1'], z['x2']
    rows = slice(rank * n, (rank + 1) * n) if world > 1 else slice(0, x1s.shape[1])

    inner = side.build(c, spec['img_size'], weights)
    del weights
    wrapped = side.distribute(inner)
    if isinstance(wrapped, tuple):  # torch: (DDP, converted inner module)
        model, inner = wrapped
    else:
        model = wrapped
    opt = side.optimizer(c, inner)

    rec = {'loss_local': [], 'loss_mean': [], 'lr': [], 'm': []}
    t0 = time.perf_counter()
    grads0 = None
    for i in range(spec['steps']):
        e = _schedule(i)
        lr, m = side.set_lr(opt, c, e)
        loss = model(side.tensor(x1s[i, rows]), side.tensor(x2s[i, rows]), m)
        g = side.backward_step(opt, loss, i == 0, inner)
        if i == 0:
            grads0 = g
            rec['spread_grads_step0'] = side.spread(list(g.values()))
            if rank == 0:
                for k, v in g.items():
                    rec['grad0/' + k] = side.to_numpy(v)
        side.step(opt)
        rec['loss_local'].append(float(side.to_numpy(loss)))
        rec['loss_mean'].append(side.mean_over_ranks(loss))
        rec['lr'].append(lr)
        rec['m'].append(m)
        if i == 0 and rank == 0:
            for k, v in side.bn_stats(inner).items():
                rec['bn0/' + k] = side.to_numpy(v)
    del grads0
    rec['time'] = time.perf_counter() - t0
    params = side.params(inner)
    rec['spread_params'] = side.spread(list(params.values()))
    if rank == 0:
        for k, v in params.items():
            rec['param/' + k] = side.to_numpy(v)
        for k, v in side.bn_stats(inner).items():
            rec['bn/' + k] = side.to_numpy(v)
    out = {k: np.asarray(v) for k, v in rec.items()}
    if save:
        np.savez(result_path(workdir, side.name, world, rank, name), **out)
    return out


def _control_paddle(side, spec, workdir, name='vit_small'):
    """Planted mistakes, first step only, on the Paddle workers: (a) BatchNorm not synchronised, (b) labels
    not offset by the rank. Returns the mean loss over ranks of each; both must differ from the single
    process's loss (so the equalities above are not vacuous)."""
    import paddle
    from paddle_impl import builder
    c = spec['cases'][name]
    n, rank = c['per_rank'], side.rank
    with np.load(os.path.join(workdir, f'weights_{name}.npz')) as z:
        weights = {k: z[k].astype(np.float64) if z[k].dtype.kind == 'f' else z[k] for k in z.files}
    with np.load(os.path.join(workdir, f'batches_{name}.npz')) as z:
        x1, x2 = z['x1'][0, rank * n:(rank + 1) * n], z['x2'][0, rank * n:(rank + 1) * n]
    from paddle_impl import schedules, utils
    m = schedules.adjust_moco_momentum(_schedule(0), SCHEDULE['moco_m'], SCHEDULE['epochs'])
    out = {}
    with paddle.no_grad():
        plain = side.build(c, spec['img_size'], weights)  # no convert_sync_batchnorm
        out['control_unsynced_bn'] = side.mean_over_ranks(plain(side.tensor(x1), side.tensor(x2), m))
        synced = side.build(c, spec['img_size'], weights)
        utils.convert_sync_batchnorm(synced)
        orig = builder._rank
        builder._rank = lambda: 0
        try:
            out['control_no_label_offset'] = side.mean_over_ranks(synced(side.tensor(x1), side.tensor(x2), m))
        finally:
            builder._rank = orig
    return out


def run_worker(framework, workdir, rank=0, world=1, controls=False):
    """Every case of ``workdir``'s spec on this rank (``world`` == 1: one process, no process group)."""
    spec = load_spec(workdir)
    side = (_PaddleSide if framework == 'paddle' else _TorchSide)(rank, world)
    results = {}
    for name in spec['cases']:
        results[name] = run_case(side, name, spec, workdir, save=world > 1)
    if controls and framework == 'paddle' and 'vit_small' in spec['cases']:
        ctl = _control_paddle(side, spec, workdir)
        if rank == 0:
            with open(os.path.join(workdir, f'controls_w{world}.json'), 'w') as f:
                json.dump(ctl, f)
    return results


def run_single(framework, workdir, cases=None):
    """The cases (default: all of the spec) on one process, in this process, without a process group: the
    reference of the distributed runs. Returns {case: record}. torch is held to one thread meanwhile: with
    two OpenMP threads on a busy 2-core machine its many small float64 kernels ran 15x slower (measured),
    the threads waiting on each other at every barrier."""
    spec = load_spec(workdir)
    names = list(spec['cases']) if cases is None else list(cases)
    if framework == 'paddle':
        side = _PaddleSide(0, 1)
        return {n: run_case(side, n, spec, workdir, save=False) for n in names}
    import torch
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        side = _TorchSide(0, 1)
        return {n: run_case(side, n, spec, workdir, save=False) for n in names}
    finally:
        torch.set_num_threads(threads)


def _worker_main(argv):
    import argparse
    p = argparse.ArgumentParser(prog='parity/distributed.py worker')
    p.add_argument('framework', choices=('paddle', 'torch'))
    p.add_argument('workdir')
    p.add_argument('--rank', type=int, default=None, help='torch: this rank')
    p.add_argument('--world', type=int, default=None, help='torch: number of processes')
    p.add_argument('--init', default=None, help='torch: init_method (file://... or tcp://...)')
    p.add_argument('--controls', action='store_true')
    a = p.parse_args(argv)
    if a.framework == 'paddle':
        import paddle_impl  # noqa: F401  (CPU math defaults before paddle is imported)
        import paddle
        import paddle.distributed as dist
        paddle.set_device('cpu')
        world = int(os.environ.get('PADDLE_TRAINERS_NUM', '1'))
        if world > 1:
            dist.init_parallel_env()
        rank = dist.get_rank() if world > 1 else 0
    else:
        import torch
        import torch.distributed as dist
        torch.set_num_threads(int(os.environ.get('OMP_NUM_THREADS', '1')))
        rank, world = a.rank or 0, a.world or 1
        if world > 1:
            dist.init_process_group('gloo', init_method=a.init, rank=rank, world_size=world)
    run_worker(a.framework, a.workdir, rank, world, controls=a.controls)
    if a.framework == 'torch' and world > 1:
        dist.destroy_process_group()


# ------------------------------------------------------------------------------------------ orchestration

def free_port():
    s = socket.socket()
    s.bind(('127.0.0.1', 0))
    port = s.getsockname()[1]
    s.close()
    return port


def launch_paddle(script_args, nproc=2, log_dir=None, timeout=600, env=None, **launch_flags):
    """``python -m paddle.distributed.launch --nproc_per_node nproc [--flag value ...] script args...``;
    returns the CompletedProcess. ``launch_flags``: e.g. nnodes=2, master='127.0.0.1:PORT', rank=0."""
    cmd = [sys.executable, '-m', 'paddle.distributed.launch', '--nproc_per_node', str(nproc)]
    if log_dir:
        cmd += ['--log_dir', str(log_dir)]
    for k, v in launch_flags.items():
        cmd += [f'--{k}', str(v)]
    cmd += [str(a) for a in script_args]
    return subprocess.run(cmd, cwd=REPO, env=env or _env(), capture_output=True, text=True, timeout=timeout)


def launch_nodes(per_node_args, log_dir, env=None, nproc_per_node=1, job_id=None):
    """Start one ``paddle.distributed.launch`` per entry of ``per_node_args`` as the nodes of one job on
    this host (--nnodes len(per_node_args) --master 127.0.0.1:PORT --rank i), each running main_moco with
    its own arguments; returns the Popen objects (stdout/stderr to log_dir/node<i>.out)."""
    port = free_port()
    job_id = job_id or f'moco{os.getpid()}x{port}'
    procs = []
    for i, args in enumerate(per_node_args):
        node_log = os.path.join(str(log_dir), f'node{i}')
        os.makedirs(node_log, exist_ok=True)
        out = open(os.path.join(str(log_dir), f'node{i}.out'), 'w')
        cmd = [sys.executable, '-m', 'paddle.distributed.launch', '--nnodes', str(len(per_node_args)),
               '--master', f'127.0.0.1:{port}', '--rank', str(i), '--nproc_per_node', str(nproc_per_node),
               '--job_id', job_id, '--log_dir', node_log, *[str(a) for a in args]]
        procs.append(subprocess.Popen(cmd, cwd=REPO, env=env or _env(), stdout=out, stderr=subprocess.STDOUT))
        out.close()
    return procs


def worker_logs(log_dir, tail=3000):
    import glob
    out = []
    for p in sorted(glob.glob(os.path.join(str(log_dir), '**', 'workerlog.*'), recursive=True)):
        with open(p, errors='replace') as f:
            out.append(f'--- {p}\n' + f.read()[-tail:])
    return '\n'.join(out)


def run_paddle_workers(workdir, world=2, controls=True, timeout=600):
    log_dir = os.path.join(workdir, 'log_paddle')
    args = [os.path.join('parity', 'distributed.py'), 'worker', 'paddle', workdir]
    args += ['--controls'] if controls else []
    r = launch_paddle(args, nproc=world, log_dir=log_dir, timeout=timeout)
    if r.returncode != 0:
        raise RuntimeError(f'paddle workers failed ({r.returncode}):\n{worker_logs(log_dir)}\n{r.stderr[-2000:]}')
    return r


def run_torch_workers(workdir, world=2, timeout=600):
    init = 'file://' + os.path.join(workdir, f'torch_init_{os.getpid()}_{time.time_ns()}')
    procs, logs = [], []
    for r in range(world):
        log = open(os.path.join(workdir, f'torch_worker_{r}.log'), 'w')
        logs.append(log)
        procs.append(subprocess.Popen([sys.executable, os.path.join(REPO, 'parity', 'distributed.py'), 'worker',
                                       'torch', workdir, '--rank', str(r), '--world', str(world), '--init', init],
                                      cwd=REPO, env=_env(), stdout=log, stderr=subprocess.STDOUT))
    deadline = time.time() + timeout
    codes = [None] * world
    try:
        while any(c is None for c in codes):
            for i, p in enumerate(procs):
                if codes[i] is None:
                    codes[i] = p.poll()
            if any(c not in (None, 0) for c in codes):  # one failed: stop the others, they would wait on it
                break
            if time.time() > deadline:
                break
            time.sleep(0.2)
    finally:
        for i, p in enumerate(procs):
            if p.poll() is None:
                p.send_signal(signal.SIGKILL)
                p.wait()
            codes[i] = p.returncode
        for log in logs:
            log.close()
    if any(c != 0 for c in codes):
        text = ''
        for r in range(world):
            with open(os.path.join(workdir, f'torch_worker_{r}.log'), errors='replace') as f:
                text += f'--- torch rank {r} (exit {codes[r]})\n' + f.read()[-3000:]
        raise RuntimeError(f'torch workers failed: {codes}\n{text}')
    return codes


# ------------------------------------------------------------------------------------------ who writes

# sitecustomize.py for the processes of a launch: records every file each worker opens for writing (or
# renames into place) under $MOCO_WRITE_WATCH, one log per worker, named by its rank. Python audit hooks see
# every open() / os.open() / os.replace() of the process, so a rank that writes a checkpoint cannot hide.
_AUDIT_SITECUSTOMIZE = r"""
import os, sys
_dir, _watch = os.environ.get('MOCO_WRITE_AUDIT'), os.environ.get('MOCO_WRITE_WATCH')
_rank = os.environ.get('PADDLE_TRAINER_ID')
if _dir and _watch and _rank is not None:
    _watch = os.path.realpath(_watch) + os.sep
    _fd = os.open(os.path.join(_dir, 'writes.rank%s.%d.txt' % (_rank, os.getpid())),
                  os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    _W = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC

    def _hook(event, args):
        if event == 'open':
            path, mode, flags = (tuple(args) + (None, None, None))[:3]
            writing = ((isinstance(mode, str) and any(c in mode for c in 'wax+'))
                       or (mode is None and isinstance(flags, int) and flags & _W))
        elif event == 'os.rename':
            path, writing = args[1], True
        else:
            return
        if writing and isinstance(path, str) and os.path.realpath(path).startswith(_watch):
            os.write(_fd, ('%s\t%s\n' % (event, os.path.realpath(path))).encode())

    sys.addaudithook(_hook)
"""


def write_audit_env(audit_dir, watch_dir):
    """Environment for a launch whose workers log their writes under ``watch_dir`` into ``audit_dir``."""
    os.makedirs(audit_dir, exist_ok=True)
    with open(os.path.join(audit_dir, 'sitecustomize.py'), 'w') as f:
        f.write(_AUDIT_SITECUSTOMIZE)
    return {'PYTHONPATH': os.pathsep.join([str(audit_dir), REPO]), 'MOCO_WRITE_AUDIT': str(audit_dir),
            'MOCO_WRITE_WATCH': str(watch_dir)}


def read_write_audit(audit_dir):
    """{rank: [(event, path), ...]} of every worker that ran with ``write_audit_env``."""
    import glob
    out = {}
    for p in sorted(glob.glob(os.path.join(str(audit_dir), 'writes.rank*.txt'))):
        rank = int(os.path.basename(p).split('.')[1][len('rank'):])
        with open(p) as f:
            out.setdefault(rank, []).extend(tuple(line.rstrip('\n').split('\t')) for line in f if line.strip())
    return out


# ------------------------------------------------------------------------------------------ processes

def child_pids(pid):
    """Direct children of ``pid`` (Linux /proc)."""
    out = []
    try:
        for tid in os.listdir(f'/proc/{pid}/task'):
            with open(f'/proc/{pid}/task/{tid}/children') as f:
                out += [int(x) for x in f.read().split()]
    except OSError:
        pass
    return out


def trainer_id(pid):
    """PADDLE_TRAINER_ID of a launched worker process, or None."""
    try:
        with open(f'/proc/{pid}/environ', 'rb') as f:
            for item in f.read().split(b'\0'):
                if item.startswith(b'PADDLE_TRAINER_ID='):
                    return int(item.split(b'=', 1)[1])
    except (OSError, ValueError):
        pass
    return None


# ------------------------------------------------------------------------------------------ comparison

def load_result(workdir, framework, world, rank, case):
    with np.load(result_path(workdir, framework, world, rank, case)) as z:
        return {k: z[k] for k in z.files}


def _group(rec, prefix):
    return {k[len(prefix):]: v for k, v in rec.items() if k.startswith(prefix)}


def _torch_to_paddle_names(d):
    from convert.keymap import torch_to_paddle
    return torch_to_paddle(d)[0]


def as_paddle_names(rec):
    """A torch worker's record with Paddle parameter names and layouts (Linear weights transposed, BN buffer
    names), so that it compares key by key with a Paddle record."""
    out = {k: v for k, v in rec.items() if '/' not in k}
    for prefix in ('grad0/', 'param/', 'bn0/', 'bn/'):
        for k, v in _torch_to_paddle_names(_group(rec, prefix)).items():
            out[prefix + k] = v
    return out


def compare_records(label, a, b, case, tol=None):
    """Rows: a (e.g. 2 processes) against b (e.g. 1 process), same framework naming. ``tol``: rel L2 bound
    (default TOL['float64']['steps'], 1e-9)."""
    from parity.steps import NULL_ATOL, split_null
    tol = TOL['float64']['steps'] if tol is None else tol
    atol = ATOL['float64']
    rows = [
        compare(f'{label} {case}: loss per step (mean over ranks)', {'loss': a['loss_mean']}, {'loss': b['loss_mean']},
                tol),
        compare(f'{label} {case}: step-1 gradients (DDP-averaged)', _group(a, 'grad0/'), _group(b, 'grad0/'), tol,
                atol=atol),
        compare(f'{label} {case}: BN running stats after step 1', _group(a, 'bn0/'), _group(b, 'bn0/'), tol,
                atol=atol),
        compare(f'{label} {case}: BN running stats after the last step', _group(a, 'bn/'), _group(b, 'bn/'), tol,
                atol=atol),
    ]
    pa, pb = split_null(_group(a, 'param/')), split_null(_group(b, 'param/'))
    rows.append(compare(f'{label} {case}: parameters after {len(b["loss_mean"])} steps', pa[0], pb[0], tol,
                        atol=atol))
    if pb[1]:  # exact gradient 0: rounding noise that AdamW scales up; judged by the abs error
        rows.append(compare(f'{label} {case}: null-direction params', pa[1], pb[1], tol,
                            atol=NULL_ATOL['float64'], note='exact gradient 0'))
    return rows


def rank_rows(label, rec, case):
    """The ranks agree: final parameters and first-step gradients hold the same values on every rank."""
    return [flag(f'{label} {case}: every rank holds the same params and grads',
                 float(rec['spread_params']) == 0.0 and float(rec['spread_grads_step0']) == 0.0,
                 note=f"max spread params {float(rec['spread_params']):.1e}, "
                      f"grads {float(rec['spread_grads_step0']):.1e}")]


if __name__ == '__main__':
    if len(sys.argv) >= 2 and sys.argv[1] == 'worker':
        _worker_main(sys.argv[2:])
    else:
        sys.exit('usage: parity/distributed.py worker {paddle,torch} WORKDIR [--rank R --world W --init URL]')
