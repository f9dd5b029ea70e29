"""Paddle port vs the PyTorch reference, measured in one run: training step, memory, augmentation, GFLOP/s.

    python -m bench.bench [--quick] [--device cpu|gpu] [--allocator tuned|default|both] [--out bench/results.json]

Every measurement runs in worker processes, one framework per process (as in real training: no second
OpenMP runtime and no other framework's allocations in the process), and the parent alternates between the
paddle and the torch worker call by call: warm-up, then the median over repetitions, the order reversed on
every other round, with a short pause between calls so that one side's idle OpenMP threads stop spinning
before the other side starts.

Settings. Both frameworks' workers get the environment paddle_impl decides for this machine
(paddle_impl/machine.py: threads = cores, MKL's code path on AMD CPUs; torch's own MKL ignores that variable)
and, per run, the same glibc malloc settings: 'tuned' (``paddle_impl.MALLOC_ENV``: freed memory is kept for
reuse rather than unmapped, glibc's tcache of small freed blocks off) or glibc's 'default'. ``--allocator both`` (what `make bench` runs) measures the
steps under each, so every step item comes three ways:
  step_time_<model>                  identical settings, tuned malloc on both sides
  step_time_<model>_glibc_default    identical settings, glibc's defaults on both sides
  step_time_<model>_best             each framework at its own best measured setting (the faster of the two
                                     by median; ``setting`` says which), the ratio of those
Every step item has ``median`` and ``min`` (and ``ratio`` = median ratio, ``ratio_min``) and the load average
of the machine (1-minute, at start and end of the item): on a shared machine absolute times are noisy, the
ratios of one alternating run much less so. ``machine`` records the CPU (vendor, model, ISA: AVX2, AVX-512,
AMX), the settings paddle_impl chose and why, and the instruction-set variant our CPU kernels ran.

Items (each reported as paddle, torch, ratio = paddle / torch, units):
  step_time_<model>    one complete MoCo v3 training step: both views through the base encoder and the
                       predictor, momentum update, momentum-encoder forward of both views, the symmetric
                       loss, backward, optimizer step. ViT-S/16 with AdamW, ResNet-50 with LARS; 224x224,
                       8 images per view, float32, all cores (OMP_NUM_THREADS). Also kept: every timing,
                       the minimum (``min``, ``ratio_min``) and the median CPU time of the worker process
                       (``cpu_time``, ``ratio_cpu_time``), which tell load from other processes apart.
  peak_memory_<model>  CPU: growth of the worker's peak resident set (ru_maxrss) from just after importing
                       the framework and the model code to the end of the timed steps; each (framework,
                       model) in a fresh process. GPU: the allocator's peak (max_memory_allocated).
  aug_throughput       source images/s through the two BYOL views (JPEG decode, view 1 and view 2, to
                       normalised float CHW), one process with one thread, as one DataLoader worker:
                       paddle_impl.loader (PIL + numpy) vs torch_ref.loader (torchvision), on synthetic
                       ImageNet-sized (500x375) JPEGs.
  gflops_<model>       achieved GFLOP/s of the training step: the FLOPs of one step counted once with
                       torch.utils.flop_counter on the torch step (attention in its math form so that it is
                       counted; optimizer and elementwise work not counted), the same count for both
                       frameworks, divided by each one's median step time.
  gemm_peak            GFLOP/s of one square fp32 matmul (2048 on CPU, 8192 on GPU with TF32 off on both
                       sides) in each framework: what the step could reach.

``--device gpu`` (CUDA machines with paddlepaddle-gpu and a CUDA torch): AMP float16 with a GradScaler on
both sides, 64 images per view, step time plus images/s per GPU (``images_per_s``: images of one view per
second; each image passes twice through the base encoder and twice through the momentum encoder).

``--quick``: tiny models and images, one repetition: exercises every code path in seconds (tests/test_bench.py).
"""
import json
import os
import signal
import sys
import time

# This process (the inference item runs Paddle, torch and onnxruntime in it) and the GEMM and augmentation
# workers: idle OpenMP threads sleep instead of spinning (measured, 2 shared vCPUs under load: torch's step of
# a tiny ViT took 2.3 s with 2 spinning threads, 10 ms with PASSIVE). The training-step workers are measured
# under each setting named by --wait-policy (wait_env), and a worker is stopped while the other one works.
os.environ.setdefault('OMP_WAIT_POLICY', 'PASSIVE')
# the defaults Paddle reads at its import (threads; MKL's fast path on AMD); workers inherit them
import paddle_impl  # noqa: F401,E402
from bench import mkl_path  # noqa: E402

MODELS = {
    # the official recipes (moco-v3 CONFIG.md); lr is scaled by batch / 256 as main_moco does
    'vit_small': dict(arch='vit_small', optimizer='adamw', lr=1.5e-4, weight_decay=0.1, T=0.2,
                      stop_grad_conv1=True),
    'resnet50': dict(arch='resnet50', optimizer='lars', lr=0.6, weight_decay=1e-6, T=1.0,
                     stop_grad_conv1=False),
}

SIZES = {
    'cpu': dict(img_size=224, batch=8, dim=256, mlp_dim=4096, warmup=2, reps=7, gemm=2048, gemm_reps=10,
                aug_images=64, aug_size=(500, 375), aug_reps=3, aug_crop=224),
    'gpu': dict(img_size=224, batch=64, dim=256, mlp_dim=4096, warmup=5, reps=20, gemm=8192, gemm_reps=20,
                aug_images=64, aug_size=(500, 375), aug_reps=3, aug_crop=224),
    'quick': dict(img_size=32, batch=4, dim=16, mlp_dim=32, warmup=1, reps=1, gemm=128, gemm_reps=1,
                  aug_images=2, aug_size=(64, 48), aug_reps=1, aug_crop=32,
                  vit=dict(patch_size=8, embed_dim=32, depth=1, num_heads=2)),
}

MOMENTUM = 0.99  # MoCo momentum of every step (its value does not change the cost)
CROP_MIN = 0.08  # the ViT recipe; ResNet's 0.2 changes only the crop's area
SETTLE_S = 0.3  # pause between calls: idle OpenMP threads (iomp5 spins 200 ms by default) go to sleep
FRAMEWORKS = ('paddle', 'torch')


def _inputs(size, seed=0):
    import numpy as np
    rng = np.random.default_rng(seed)
    shape = (size['batch'], 3, size['img_size'], size['img_size'])
    return rng.standard_normal(shape).astype(np.float32), rng.standard_normal(shape).astype(np.float32)


def _vit_kwargs(cfg, size):
    return dict(size.get('vit', {})) if cfg['arch'].startswith('vit') else {}


def _maxrss():
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


# ----------------------------------------------------------------------------------------------------------
# one training step per framework (built inside a worker)

class TorchStep:
    def __init__(self, model_name, size, device='cpu'):
        import torch
        from torch_ref.models import build_moco
        from torch_ref.optimizer import build_optimizer
        self.torch = torch
        cfg = MODELS[model_name]
        self.device = 'cuda' if device == 'gpu' else 'cpu'
        self.amp = device == 'gpu'
        torch.manual_seed(0)
        self.model = build_moco(cfg['arch'], size['dim'], size['mlp_dim'], cfg['T'], size['img_size'],
                                cfg['stop_grad_conv1'], **_vit_kwargs(cfg, size)).to(self.device)
        self.model.train()
        self.optimizer = build_optimizer(cfg['optimizer'], self.model.parameters(),
                                         cfg['lr'] * size['batch'] / 256, cfg['weight_decay'])
        self.scaler = torch.amp.GradScaler('cuda', enabled=self.amp)
        x1, x2 = _inputs(size)
        self.x1 = torch.from_numpy(x1).to(self.device)
        self.x2 = torch.from_numpy(x2).to(self.device)

    def __call__(self):
        torch = self.torch
        with torch.autocast(self.device, dtype=torch.float16, enabled=self.amp):
            loss = self.model(self.x1, self.x2, MOMENTUM)
        self.optimizer.zero_grad()
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        return loss.item()  # waits for the device

    def count_flops(self):
        """FLOPs of the forward and backward of one step; attention in its math form, so that it is counted
        (the flop counter knows no CPU flash-attention kernel)."""
        from torch.nn.attention import SDPBackend, sdpa_kernel
        from torch.utils.flop_counter import FlopCounterMode
        counter = FlopCounterMode(display=False)
        with sdpa_kernel(SDPBackend.MATH), counter:
            with self.torch.autocast(self.device, dtype=self.torch.float16, enabled=self.amp):
                loss = self.model(self.x1, self.x2, MOMENTUM)
            self.optimizer.zero_grad()
            loss.backward()
        self.optimizer.zero_grad()
        return int(counter.get_total_flops())

    def peak_device_memory(self):
        return int(self.torch.cuda.max_memory_allocated())


class PaddleStep:
    """The product's own training step (paddle_impl/engine.py moco_training_setup + moco_step, what main_moco
    runs every iteration): learning-rate schedule at its peak value, forward (the targets first), gradients
    released (clear_grad(set_to_zero=False), as torch's zero_grad), backward, optimizer step, gradients
    released again."""

    def __init__(self, model_name, size, device='cpu'):
        import paddle
        from paddle_impl import engine
        from paddle_impl.models import build_moco
        self.paddle = paddle
        self.engine = engine
        cfg = MODELS[model_name]
        paddle.set_device('gpu' if device == 'gpu' else 'cpu')
        self.amp = device == 'gpu'
        paddle.seed(0)
        self.model = build_moco(cfg['arch'], size['dim'], size['mlp_dim'], cfg['T'], size['img_size'],
                                cfg['stop_grad_conv1'], **_vit_kwargs(cfg, size))
        self.model.train()
        # the official --lr is for a batch of 256: moco_training_setup scales it by the batch, as main_moco
        self.optimizer, self.scaler, self.lr = engine.moco_training_setup(
            self.model, cfg['optimizer'], cfg['lr'], size['batch'], cfg['weight_decay'], amp=self.amp)
        x1, x2 = _inputs(size)
        self.x1 = paddle.to_tensor(x1)
        self.x2 = paddle.to_tensor(x2)

    def __call__(self):
        # e=0 of a 1-epoch cosine schedule without warm-up: the learning rate is the peak, as torch's step
        res = self.engine.moco_step(self.model, self.x1, self.x2, self.optimizer, self.scaler, e=0., lr=self.lr,
                                    epochs=1, warmup_epochs=0, moco_m=MOMENTUM, moco_m_cos=False, amp=self.amp)
        return res.loss  # a Python float: waits for the device

    def peak_device_memory(self):
        return int(self.paddle.device.cuda.max_memory_allocated())


STEPPERS = {'paddle': PaddleStep, 'torch': TorchStep}


# ----------------------------------------------------------------------------------------------------------
# the worker process: one framework, commands as JSON lines on stdin, answers on its own pipe

def _check_cuda(framework):
    if framework == 'paddle':
        import paddle
        ok = paddle.is_compiled_with_cuda() and paddle.device.cuda.device_count() > 0
        hint = 'install paddlepaddle-gpu (see README) on a machine with a CUDA GPU'
    else:
        import torch
        ok = torch.cuda.is_available()
        hint = 'install a CUDA build of torch on a machine with a CUDA GPU'
    if not ok:
        raise RuntimeError(f'--device gpu: no CUDA device for {framework}; {hint}')


class Worker:
    """What runs inside a worker process (see serve())."""

    def __init__(self, framework, device, role):
        self.framework, self.device, self.role = framework, device, role
        self.step = None
        if device == 'gpu' and role == 'model':
            _check_cuda(framework)
        if role == 'aug':  # one DataLoader worker: one thread, no framework but the data pipeline
            if framework == 'torch':
                import torch
                torch.set_num_threads(1)
                import torch_ref.loader  # noqa: F401
            else:
                import paddle_impl.loader  # noqa: F401
        elif framework == 'paddle':
            import paddle  # noqa: F401
            import paddle_impl.models  # noqa: F401
            import paddle_impl.optimizer  # noqa: F401
        else:
            import torch
            torch.set_num_threads(int(os.environ.get('OMP_NUM_THREADS') or torch.get_num_threads()))
            import torch_ref.models  # noqa: F401
            import torch_ref.optimizer  # noqa: F401
        self.rss_after_import = _maxrss()

    def op_info(self):
        info = machine_info(self.framework, self.device)
        if self.framework == 'paddle' and self.role == 'model':
            from paddle_impl import cpu_kernels
            info['kernel_isa'] = cpu_kernels.active_isa()
            info['kernel_openmp'] = cpu_kernels.openmp_runtime()
        return info

    def op_build(self, model, size):
        self.step = STEPPERS[self.framework](model, SIZES[size], self.device)
        return {}

    def op_step(self):
        w0, c0 = time.perf_counter(), time.process_time()
        loss = self.step()
        return {'time': time.perf_counter() - w0, 'cpu': time.process_time() - c0, 'loss': loss}

    def op_memory(self):
        peak = _maxrss()
        out = {'rss_after_import': self.rss_after_import, 'rss_peak': peak, 'value': peak - self.rss_after_import}
        if self.device == 'gpu':
            out['value'] = self.step.peak_device_memory()
        return out

    def op_flops(self):
        return {'flops': self.step.count_flops()}

    def op_gemm_setup(self, n):
        import numpy as np
        rng = np.random.default_rng(0)
        a, b = (rng.standard_normal((n, n)).astype(np.float32) for _ in range(2))
        if self.framework == 'paddle':
            import paddle
            pa, pb = paddle.to_tensor(a), paddle.to_tensor(b)
            if self.device == 'gpu':  # true fp32 on both sides (torch's default); Paddle allows TF32 by default
                paddle.set_flags({'FLAGS_allow_tf32_cublas': False})
            sync = paddle.device.synchronize if self.device == 'gpu' else (lambda: None)
            self.gemm = lambda: (paddle.matmul(pa, pb), sync())
        else:
            import torch
            dev = 'cuda' if self.device == 'gpu' else 'cpu'
            ta, tb = torch.from_numpy(a).to(dev), torch.from_numpy(b).to(dev)
            sync = torch.cuda.synchronize if self.device == 'gpu' else (lambda: None)
            self.gemm = lambda: (torch.mm(ta, tb), sync())
        self.gemm()
        return {}

    def op_gemm(self):
        t0 = time.perf_counter()
        self.gemm()
        return {'time': time.perf_counter() - t0}

    def op_aug_setup(self, paths, img_size, crop_min):
        if self.framework == 'paddle':
            import paddle_impl.loader as loader
        else:
            import torch_ref.loader as loader
        self.paths = paths
        self.aug = loader.TwoCropsTransform(*loader.build_augmentations(img_size, crop_min))
        if self.framework == 'paddle':  # our C image kernels: the variant that runs (None: PIL's own code)
            from paddle_impl import image_ops
            return {'image_kernels_isa': image_ops.active_isa()}
        return {}

    def op_aug(self):
        from PIL import Image
        t0 = time.perf_counter()
        for p in self.paths:
            with open(p, 'rb') as f:  # the official pil_loader (ImageFolder)
                img = Image.open(f).convert('RGB')
            v1, v2 = self.aug(img)
        return {'time': time.perf_counter() - t0, 'shape': list(v1.shape)}


def serve(framework, device, role):
    """Worker main loop. Answers go to a private copy of stdout; fd 1 is pointed at stderr so that what
    the libraries print cannot corrupt the protocol."""
    answers = os.fdopen(os.dup(1), 'w')
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    try:
        worker = Worker(framework, device, role)
        hello = {'ok': True}
    except Exception as e:  # e.g. no CUDA build: the parent reports it in one line
        worker, hello = None, {'ok': False, 'error': f'{type(e).__name__}: {e}'}
    answers.write(json.dumps(hello) + '\n')
    answers.flush()
    if worker is None:
        return
    for line in sys.stdin:
        req = json.loads(line)
        op = req.pop('op')
        if op == 'quit':
            break
        try:
            res = {'ok': True, **getattr(worker, 'op_' + op)(**req)}
        except Exception as e:  # reported to the parent, which stops
            import traceback
            res = {'ok': False, 'error': f'{type(e).__name__}: {e}', 'traceback': traceback.format_exc()}
        answers.write(json.dumps(res) + '\n')
        answers.flush()


class WorkerProcess:
    """The parent's handle on a worker."""

    def __init__(self, framework, device='cpu', role='model', env=None, hold=False):
        import subprocess
        import tempfile
        self.name = f'{framework}/{role}'
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        self.log = tempfile.TemporaryFile(mode='w+')
        cmd = [sys.executable, '-m', 'bench.bench', '--worker', framework, '--worker-role', role,
               '--device', device]
        self.proc = subprocess.Popen(cmd, cwd=root, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self.log, text=True, env=env)
        # hold: the worker is stopped (SIGSTOP) between calls, so that nothing of it runs while the other
        # framework is measured (idle OpenMP threads under OMP_WAIT_POLICY=ACTIVE spin for seconds)
        self.hold = hold and hasattr(signal, 'SIGSTOP')
        self._read()
        self._signal('SIGSTOP')

    def _signal(self, name):
        if self.hold and self.proc.poll() is None:
            os.kill(self.proc.pid, getattr(signal, name))

    def _read(self):
        line = self.proc.stdout.readline()
        if not line:
            self.log.seek(0)
            raise RuntimeError(f'bench worker {self.name} died:\n{self.log.read()[-4000:]}')
        res = json.loads(line)
        if not res.get('ok'):
            tb = res.get('traceback')
            raise RuntimeError(f'bench worker {self.name}: {res["error"]}' + (f'\n{tb}' if tb else ''))
        return res

    def call(self, op, **kw):
        self._signal('SIGCONT')
        try:
            self.proc.stdin.write(json.dumps({'op': op, **kw}) + '\n')
            self.proc.stdin.flush()
            return self._read()
        finally:
            self._signal('SIGSTOP')

    def close(self):
        self._signal('SIGCONT')
        self.hold = False
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write(json.dumps({'op': 'quit'}) + '\n')
                self.proc.stdin.flush()
                self.proc.wait(timeout=30)
            except Exception:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


class Pair:
    """A paddle and a torch worker, closed together; each one is stopped while the other works (``hold``)."""

    def __init__(self, device, role='model', env=None, hold=True):
        self.w = {}
        try:
            for fw in FRAMEWORKS:
                self.w[fw] = WorkerProcess(fw, device, role, env, hold=hold)
        except BaseException:
            self.close()
            raise

    def __enter__(self):
        return self.w

    def __exit__(self, *exc):
        self.close()

    def close(self):
        for w in self.w.values():
            w.close()


def alternate(workers, op, warmup, reps, settle=SETTLE_S):
    """Calls ``op`` on each worker in turn (warm-up, then ``reps`` timed rounds, the order reversed on every
    other round); returns each one's list of answers."""
    names = list(workers)
    for _ in range(warmup):
        for n in names:
            workers[n].call(op)
            time.sleep(settle)
    out = {n: [] for n in names}
    for r in range(reps):
        for n in (names if r % 2 == 0 else names[::-1]):
            out[n].append(workers[n].call(op))
            time.sleep(settle)
    return out


def _median(xs):
    xs = sorted(xs)
    k = len(xs) // 2
    return xs[k] if len(xs) % 2 else 0.5 * (xs[k - 1] + xs[k])


# ----------------------------------------------------------------------------------------------------------
# measurements (parent)

def make_jpegs(folder, count, size, seed=0):
    """ImageNet-like JPEGs: colour gradients, a few filled ellipses and pixel noise (so that JPEG decoding,
    resampling and blur have real content to work on)."""
    import numpy as np
    from PIL import Image, ImageDraw
    rng = np.random.default_rng(seed)
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    paths = []
    for i in range(count):
        c0, c1, c2 = rng.uniform(0, 255, (3, 3))
        img = c0 + (c1 - c0) * (xx / w)[..., None] + 0.5 * (c2 - c0) * (yy / h)[..., None]
        img = img + rng.normal(0, 20, (h, w, 3))
        im = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8), 'RGB')
        draw = ImageDraw.Draw(im)
        for _ in range(6):
            x0, y0 = int(rng.integers(0, w - 2)), int(rng.integers(0, h - 2))
            x1, y1 = int(rng.integers(x0 + 1, w)), int(rng.integers(y0 + 1, h))
            draw.ellipse([x0, y0, x1, y1], fill=tuple(int(v) for v in rng.integers(0, 256, 3)))
        path = os.path.join(folder, f'img_{i:04d}.JPEG')
        im.save(path, quality=90)
        paths.append(path)
    return paths


def _load():
    return round(os.getloadavg()[0], 2) if hasattr(os, 'getloadavg') else None


def item(paddle_v, torch_v, units, **extra):
    ratio = paddle_v / torch_v if torch_v else None
    return {'paddle': paddle_v, 'torch': torch_v, 'ratio': ratio, 'units': units, **extra}


def measure_gemm(size, device, log, infos=None, env=None):
    n = size['gemm']
    load0 = _load()
    with Pair(device, env=env) as w:
        if infos is not None:
            infos.update({fw: w[fw].call('info') for fw in FRAMEWORKS})
        for x in w.values():
            x.call('gemm_setup', n=n)
        res = alternate(w, 'gemm', warmup=2, reps=size['gemm_reps'], settle=SETTLE_S / 3)
    t = {fw: _median([r['time'] for r in res[fw]]) for fw in res}
    tmin = {fw: min(r['time'] for r in res[fw]) for fw in res}
    flop = 2 * n ** 3
    out = item(flop / t['paddle'] / 1e9, flop / t['torch'] / 1e9, 'GFLOP/s', n=n, statistic='median',
               max={fw: flop / tmin[fw] / 1e9 for fw in tmin}, ratio_max=tmin['torch'] / tmin['paddle'],
               load_average=[load0, _load()])
    log(f'gemm {n}x{n}: paddle {out["paddle"]:.1f}, torch {out["torch"]:.1f} GFLOP/s')
    return out


def measure_aug(size, log, env=None):
    import tempfile
    env = dict(env or os.environ, OMP_NUM_THREADS='1')  # one DataLoader worker
    load0 = _load()
    with tempfile.TemporaryDirectory() as tmp:
        paths = make_jpegs(tmp, size['aug_images'], size['aug_size'])
        with Pair('cpu', role='aug', env=env) as w:
            setup = {fw: x.call('aug_setup', paths=paths, img_size=size['aug_crop'], crop_min=CROP_MIN)
                     for fw, x in w.items()}
            res = alternate(w, 'aug', warmup=1, reps=size['aug_reps'], settle=0.05)
    t = {fw: _median([r['time'] for r in res[fw]]) for fw in res}
    out = item(len(paths) / t['paddle'], len(paths) / t['torch'], 'images/s', images=len(paths),
               image_kernels_isa=setup['paddle'].get('image_kernels_isa'),
               image_size=list(size['aug_size']), crop=size['aug_crop'], views=2, threads=1,
               statistic='median', load_average=[load0, _load()])
    log(f'augmentation: paddle {out["paddle"]:.1f}, torch {out["torch"]:.1f} images/s')
    return out


def measure_model(name, skey, device, log, env=None):
    size = SIZES[skey]
    load0 = _load()
    with Pair(device, env=env) as w:
        for x in w.values():
            x.call('build', model=name, size=skey)
        res = alternate(w, 'step', warmup=size['warmup'], reps=size['reps'])
        mem = {fw: w[fw].call('memory') for fw in FRAMEWORKS}
        flops = w['torch'].call('flops')['flops']
    t = {fw: _median([r['time'] for r in res[fw]]) for fw in FRAMEWORKS}
    tmin = {fw: min(r['time'] for r in res[fw]) for fw in FRAMEWORKS}
    cpu = {fw: _median([r['cpu'] for r in res[fw]]) for fw in FRAMEWORKS}
    out = {}
    step = item(t['paddle'], t['torch'], 's', optimizer=MODELS[name]['optimizer'], batch_per_view=size['batch'],
                img_size=size['img_size'], reps=size['reps'], warmup=size['warmup'],
                median=t, min=tmin, ratio_min=tmin['paddle'] / tmin['torch'], load_average=[load0, _load()],
                cpu_time=cpu, ratio_cpu_time=cpu['paddle'] / cpu['torch'] if cpu['torch'] else None,
                times={fw: [r['time'] for r in res[fw]] for fw in FRAMEWORKS},
                loss={fw: res[fw][-1]['loss'] for fw in FRAMEWORKS})
    if device == 'gpu':
        step['images_per_s'] = {fw: size['batch'] / t[fw] for fw in FRAMEWORKS}
    out[f'step_time_{name}'] = step
    mib = {fw: mem[fw]['value'] / 2 ** 20 for fw in FRAMEWORKS}
    out[f'peak_memory_{name}'] = item(mib['paddle'], mib['torch'], 'MiB',
                                      measure='max_memory_allocated' if device == 'gpu' else 'peak RSS growth',
                                      detail=mem)
    out[f'gflops_{name}'] = item(flops / t['paddle'] / 1e9, flops / t['torch'] / 1e9, 'GFLOP/s',
                                 flops_per_step=flops)
    log(f'{name}: step paddle {t["paddle"]:.3f} s, torch {t["torch"]:.3f} s '
        f'(ratio {t["paddle"] / t["torch"]:.3f}); memory paddle {mib["paddle"]:.0f} MiB, torch {mib["torch"]:.0f} MiB; '
        f'{flops / 1e9:.1f} GFLOP/step')
    return out


def machine_info(framework=None, device='cpu'):
    import platform
    info = {'cpu': platform.processor() or platform.machine(), 'device': device}
    try:
        with open('/proc/cpuinfo') as f:
            for line in f:
                if line.startswith('model name'):
                    info['cpu'] = line.split(':', 1)[1].strip()
                    break
    except OSError:
        pass
    info['cores'] = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count()
    info['env'] = {k: os.environ.get(k) for k in ('OMP_NUM_THREADS', 'MKL_DEBUG_CPU_TYPE', 'MKL_ENABLE_INSTRUCTIONS',
                                                  'OMP_WAIT_POLICY', 'KMP_BLOCKTIME', 'MALLOC_MMAP_MAX_',
                                                  'MALLOC_TRIM_THRESHOLD_', 'GLIBC_TUNABLES', 'MOCO_MALLOC_TUNE',
                                                  'MOCO_CPU_KERNELS',
                                                  'MOCO_CPU_ISA', 'MOCO_IMAGE_KERNELS', 'MOCO_ONEDNN_CONV',
                                                  'ATEN_CPU_CAPABILITY', 'DNNL_MAX_CPU_ISA', 'ONEDNN_MAX_CPU_ISA',
                                                  'LD_PRELOAD')}
    info['python'] = platform.python_version()
    info['platform'] = platform.platform()
    versions = {}
    if framework == 'paddle':
        import paddle
        versions['paddlepaddle'] = paddle.__version__
        info['paddle_flags'] = paddle.get_flags(['FLAGS_use_mkldnn', 'FLAGS_use_stride_kernel'])
        if device == 'gpu':
            info['gpu'] = paddle.device.cuda.get_device_name(0)
    elif framework == 'torch':
        import timm
        import torch
        import torchvision
        versions.update(torch=torch.__version__, torchvision=torchvision.__version__, timm=timm.__version__)
        info['torch_threads'] = torch.get_num_threads()
        if device == 'gpu':
            info['gpu'] = torch.cuda.get_device_name(0)
    import numpy
    import PIL
    versions.update(numpy=numpy.__version__, pillow=PIL.__version__)
    info['versions'] = versions
    return info


def allocator_env(env, mode):
    """The worker environment for an allocator mode, the same for both frameworks: 'tuned' = glibc malloc
    keeps freed memory (paddle_impl.MALLOC_ENV, what paddle_impl sets for itself at import); 'default' =
    glibc's defaults (and paddle_impl told not to tune)."""
    from paddle_impl import MALLOC_ENV
    env = {k: v for k, v in env.items() if k not in MALLOC_ENV and k != 'MOCO_MALLOC_TUNE'}
    if mode == 'tuned':
        env.update(MALLOC_ENV)
    else:
        env['MOCO_MALLOC_TUNE'] = '0'
    return env


# --isa avx2: both frameworks restricted to AVX2/FMA on a wider CPU (what an AVX2-only machine runs): MKL's own
# cap (Paddle's and torch's MKL), oneDNN's (both frameworks ship one), torch's ATen vector kernels, our kernels.
ISA_CAPS = {'avx2': {'MKL_ENABLE_INSTRUCTIONS': 'AVX2', 'DNNL_MAX_CPU_ISA': 'AVX2', 'ONEDNN_MAX_CPU_ISA': 'AVX2',
                     'ATEN_CPU_CAPABILITY': 'avx2', 'MOCO_CPU_ISA': 'avx2'}}


def isa_env(env, isa):
    """The workers' environment with every library capped at ``isa`` (None/'native': unchanged). MKL's code
    path on AMD CPUs (MKL_DEBUG_CPU_TYPE) is decided again by paddle_impl for the capped instruction set."""
    if not isa or isa == 'native':
        return env
    if isa not in ISA_CAPS:
        raise RuntimeError(f"--isa {isa}: unknown; choose from native, {', '.join(ISA_CAPS)}")
    from paddle_impl import machine
    if isa not in machine.cpu_facts()['isa']:
        raise RuntimeError(f'--isa {isa}: this CPU does not have {isa}')
    env = {k: v for k, v in env.items() if k != 'MKL_DEBUG_CPU_TYPE'}
    env.update(ISA_CAPS[isa])
    mkl = machine.decide(env)['env'].get('MKL_DEBUG_CPU_TYPE')
    if mkl:
        env['MKL_DEBUG_CPU_TYPE'] = mkl
    return env


def setting_name(r):
    return f'allocator={r["allocator"]}, OMP_WAIT_POLICY={r.get("wait_policy", "PASSIVE")}'


def best_of(items):
    """Each framework at its own best measured setting: per framework the item (setting) with the lowest median
    step time; the ratio of those medians (and of the minima of the same settings). ``items``: {result key:
    step item}; ``picked`` names each framework's item."""
    pick = {fw: min(items, key=lambda k: items[k]['median'][fw]) for fw in FRAMEWORKS}
    med = {fw: items[pick[fw]]['median'][fw] for fw in FRAMEWORKS}
    mn = {fw: items[pick[fw]]['min'][fw] for fw in FRAMEWORKS}
    setting = {fw: setting_name(items[pick[fw]]) for fw in FRAMEWORKS}
    return item(med['paddle'], med['torch'], 's', setting=setting, picked=pick, median=med, min=mn,
                ratio_min=mn['paddle'] / mn['torch'],
                load_average=[min(r['load_average'][0] for r in items.values()),
                              max(r['load_average'][1] for r in items.values())])


def memory_at_best(results, name):
    """Peak memory of each framework under the setting at which its step was fastest (step_time_<name>_best):
    the peak_memory_* item measured in the same run as the picked step_time_* item."""
    best = results[f'step_time_{name}_best']
    value = {fw: results[best['picked'][fw].replace('step_time_', 'peak_memory_', 1)][fw] for fw in FRAMEWORKS}
    return item(value['paddle'], value['torch'], 'MiB', setting=best['setting'], measure='peak RSS growth')


# the settings of the training-step items besides the first (allocator tuned, OMP_WAIT_POLICY=PASSIVE):
# result-key suffix -> (allocator, OMP_WAIT_POLICY)
EXTRA_SETTINGS = {'glibc_default': ('default', 'PASSIVE'), 'omp_active': ('tuned', 'ACTIVE')}


def wait_env(env, policy):
    """OMP_WAIT_POLICY of both workers: PASSIVE (idle OpenMP threads sleep at once) or ACTIVE (they spin)."""
    return dict(env, OMP_WAIT_POLICY=policy)


def machine_facts():
    """The CPU and the settings paddle_impl chose for this process tree (paddle_impl/machine.py)."""
    from paddle_impl import machine as m
    return m.as_json(m.apply())


def run(quick=False, device='cpu', models=tuple(MODELS), threads=None, log=print, allocator='tuned', reps=None,
        inference=True, isa=None, wait='passive', mkl='native'):
    skey = 'quick' if quick else device
    if reps:
        if reps < 1:
            raise RuntimeError(f'--reps must be at least 1, got {reps}')
        SIZES[skey] = dict(SIZES[skey], reps=reps, warmup=min(SIZES[skey]['warmup'], 1))
    size = SIZES[skey]
    env = mkl_path.env_for(isa_env(dict(os.environ), isa), mkl)
    if threads:
        env['OMP_NUM_THREADS'] = str(threads)
    base_env = env
    env = wait_env(allocator_env(base_env, 'default' if allocator == 'default' else 'tuned'), 'PASSIVE')
    results = {}
    infos = {}
    load_before = os.getloadavg() if hasattr(os, 'getloadavg') else None
    results['gemm_peak'] = measure_gemm(size, device, log, infos, env)
    machine = {k: v for k, v in infos['torch'].items() if k not in ('versions', 'ok')}
    machine['versions'] = {**infos['paddle']['versions'], **infos['torch']['versions']}
    machine['paddle_flags'] = infos['paddle'].get('paddle_flags')
    machine['kernel_isa'] = infos['paddle'].get('kernel_isa')
    machine['kernel_openmp'] = infos['paddle'].get('kernel_openmp')
    machine['cpu_facts'] = machine_facts()
    machine['settings'] = dict(size, size_name=skey, settle_s=SETTLE_S, crop_min=CROP_MIN, momentum=MOMENTUM)
    machine['isa_cap'] = isa or 'native'
    machine['mkl_path'] = mkl or 'native'
    log(f'machine: {machine["cpu"]}, {machine["cores"]} cores, env {machine["env"]}')
    results['aug_throughput'] = measure_aug(size, log, env)
    for name in models:
        results.update(measure_model(name, skey, device, log, env))
    machine['allocator'] = 'default' if allocator == 'default' else 'tuned'
    for name in models:
        results[f'step_time_{name}'].update(allocator=machine['allocator'], wait_policy='PASSIVE')
    # the same steps again under other settings, identical on both sides (each framework's best: *_best)
    extra = {k: (alloc, policy) for k, (alloc, policy) in EXTRA_SETTINGS.items()
             if (alloc, policy) != (machine['allocator'], 'PASSIVE')
             and (allocator == 'both' or alloc == machine['allocator']) and (wait == 'both' or policy == 'PASSIVE')}
    for name in models:
        for suffix, (alloc, policy) in extra.items():
            res = measure_model(name, skey, device, log, wait_env(allocator_env(base_env, alloc), policy))
            results[f'step_time_{name}_{suffix}'] = dict(res[f'step_time_{name}'], allocator=alloc,
                                                         wait_policy=policy)
            results[f'peak_memory_{name}_{suffix}'] = dict(res[f'peak_memory_{name}'], allocator=alloc,
                                                           wait_policy=policy)
        if extra:
            steps = {k: results[k] for k in [f'step_time_{name}'] + [f'step_time_{name}_{x}' for x in extra]}
            results[f'step_time_{name}_best'] = best_of(steps)
            results[f'peak_memory_{name}_best'] = memory_at_best(results, name)
            log(f'{name}: each at its best setting: ratio {results[f"step_time_{name}_best"]["ratio"]:.3f} '
                f'({results[f"step_time_{name}_best"]["setting"]})')
    if inference and device == 'cpu' and (isa not in (None, 'native') or mkl not in (None, 'native')):
        log(f'inference latency skipped: it runs in this process, which --isa/--mkl-path do not reach')
    elif inference and device == 'cpu':  # latency per image of the exported backbone, five engines (bench/inference.py)
        from bench import inference as inf
        log('inference latency: eager Paddle, Paddle Inference (+/- oneDNN), onnxruntime, eager torch')
        results['inference_latency'] = inf.run(reps=1 if quick else 5, img_size=32 if quick else 224,
                                               vit_kwargs={'depth': 2} if quick else None)
    machine['load_average'] = {'start': load_before,
                               'end': os.getloadavg() if hasattr(os, 'getloadavg') else None}
    results['machine'] = machine
    return results


ORDER = ['step_time_vit_small_best', 'step_time_resnet50_best', 'step_time_vit_small', 'step_time_resnet50',
         'step_time_vit_small_glibc_default', 'step_time_resnet50_glibc_default',
         'step_time_vit_small_omp_active', 'step_time_resnet50_omp_active',
         'peak_memory_vit_small_best', 'peak_memory_resnet50_best', 'peak_memory_vit_small',
         'peak_memory_resnet50', 'peak_memory_vit_small_glibc_default', 'peak_memory_resnet50_glibc_default',
         'peak_memory_vit_small_omp_active', 'peak_memory_resnet50_omp_active',
         'aug_throughput', 'gflops_vit_small', 'gflops_resnet50', 'gemm_peak']


def format_table(results):
    rows = [('item', 'paddle', 'torch', 'paddle/torch', 'ratio of min', 'units', 'load avg')]
    for k in ORDER:
        if k in results:
            r = results[k]
            ratio = '-' if r['ratio'] is None else f'{r["ratio"]:.3f}'
            rmin = r.get('ratio_min', r.get('ratio_max'))
            load = r.get('load_average')
            rows.append((k, f'{r["paddle"]:.4g}', f'{r["torch"]:.4g}', ratio, '-' if rmin is None else f'{rmin:.3f}',
                         r['units'], '-' if not load else '-'.join(f'{v:.1f}' for v in load if v is not None)))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ['  '.join(c.ljust(wd) for c, wd in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, '  '.join('-' * wd for wd in widths))
    m = results.get('machine', {})
    if m:
        v = m.get('versions', {})
        facts = m.get('cpu_facts') or {}
        lines.append(f'machine: {m.get("cpu")}, {m.get("cores")} cores, ISA {"+".join(facts.get("isa", [])) or "?"}, '
                     f'OMP_NUM_THREADS={m["env"].get("OMP_NUM_THREADS")}, '
                     f'MKL_DEBUG_CPU_TYPE={m["env"].get("MKL_DEBUG_CPU_TYPE")}, our kernels {m.get("kernel_isa")}, '
                     f'paddle {v.get("paddlepaddle")}, torch {v.get("torch")}, device {m.get("device")}')
        lines.append('ratio = paddle/torch of the medians (GEMM, aug, GFLOP/s: rates, higher is better); '
                     '*_best: each framework at its own best setting; others: identical settings')
    return '\n'.join(lines)


def main(argv=None):
    import argparse
    p = argparse.ArgumentParser(description='MoCo v3: Paddle port vs PyTorch reference, ratios measured in one run.')
    p.add_argument('--quick', action='store_true', help='tiny sizes, one repetition (a smoke test)')
    p.add_argument('--device', default='cpu', choices=('cpu', 'gpu'))
    p.add_argument('--out', default=None, help='write the results as JSON here (e.g. bench/results.json)')
    p.add_argument('--models', default=','.join(MODELS), help='comma-separated, from: ' + ', '.join(MODELS))
    p.add_argument('--reps', type=int, default=None,
                   help='timed repetitions per step item (default 7 on the CPU; fewer on a busy machine)')
    p.add_argument('--threads', type=int, default=None,
                   help='OMP_NUM_THREADS of the GEMM and training-step workers (default: inherited; '
                        'paddle_impl sets all cores)')
    p.add_argument('--allocator', default='tuned', choices=('tuned', 'default', 'both'),
                   help="glibc malloc settings of both frameworks' workers: 'tuned' (paddle_impl.MALLOC_ENV: "
                        "freed memory is kept for reuse), 'default' (glibc's), 'both' (the steps with each)")
    p.add_argument('--wait-policy', default='passive', choices=('passive', 'both'),
                   help="OMP_WAIT_POLICY of both frameworks' training-step workers: 'passive' (idle OpenMP threads "
                        "sleep at once), 'both' (the steps also with ACTIVE: spinning threads; *_best then picks "
                        "each framework's faster setting)")
    p.add_argument('--no-inference', action='store_true',
                   help='skip the inference-latency item (bench/inference.py: exported backbone, five engines)')
    p.add_argument('--isa', default='native', choices=('native',) + tuple(ISA_CAPS),
                   help="'avx2': cap MKL, oneDNN, torch's ATen kernels and our kernels at AVX2/FMA in both "
                        "frameworks' workers (an AVX2 machine's code paths on a wider CPU)")
    p.add_argument('--mkl-path', default='native', choices=mkl_path.PATHS,
                   help="'intel': both frameworks' MKL take the code paths they take on an Intel CPU (a shim "
                        "preloaded into the workers answers MKL's vendor check; bench/mkl_path.py): on an AMD "
                        "CPU, the ratios an Intel CPU of the same instruction set would show for MKL's share")
    p.add_argument('--worker', choices=FRAMEWORKS, help=argparse.SUPPRESS)
    p.add_argument('--worker-role', default='model', choices=('model', 'aug'), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        serve(args.worker, args.device, args.worker_role)
        return 0
    models = [m for m in args.models.split(',') if m]
    for m in models:
        if m not in MODELS:
            p.error(f"unknown model '{m}'; known: {', '.join(MODELS)}")
    try:
        results = run(args.quick, args.device, models, args.threads, allocator=args.allocator, reps=args.reps,
                      inference=not args.no_inference, isa=args.isa, wait=args.wait_policy, mkl=args.mkl_path)
    except RuntimeError as e:
        print(f'bench failed: {e}', file=sys.stderr)
        return 1
    print(format_table(results))
    if 'inference_latency' in results:
        lat = results['inference_latency']['latency_ms_per_image']
        print('inference latency, ms per image (batch 1 / 32): ' + '; '.join(
            f"{k} {v.get('1', float('nan')):.1f} / {v.get('32', float('nan')):.1f}" for k, v in lat.items()))
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        tmp = args.out + '.tmp'
        with open(tmp, 'w') as f:
            json.dump(results, f, indent=1)
            f.write('\n')
        os.replace(tmp, args.out)
        print(f'wrote {args.out}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
