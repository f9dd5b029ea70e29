"""Parity on Paddle's own ops (``--paddle-ops``) and on a GPU (``--device gpu``): issue 18, points 8 and 9.

On the CPU, paddle_impl replaces some of Paddle's ops by faster ones: our C++ kernels (paddle_impl/cpu_kernels.py:
softmax, GELU, LayerNorm, im2col convolutions, the momentum and LARS updates) and the fast layers of
paddle_impl/layers.py (linear with a GEMV bias gradient, GELU backward, dense transpose). A GPU runs none of
them: it runs Paddle's own ops. ``--paddle-ops`` turns every CPU-only path off (MOCO_CPU_KERNELS=0 and
MOCO_FAST_LAYERS=0) so that the parity proof covers the op set a GPU runs.

``--device gpu`` selects the GPU for the Paddle side (the torch reference stays on the CPU, in float64 exact)
and turns TF32 off: from Ampere on, cuBLAS and cuDNN may run float32 matmuls and convolutions in TF32 (a
10-bit mantissa, ~1e-3 relative per product), which Paddle allows by default; float32 parity at 1e-4 is then
not expected. Off here: ``NVIDIA_TF32_OVERRIDE=0`` (the CUDA libraries' own switch, set before the first
CUDA call), Paddle's TF32 switches for cuBLAS and cuDNN (``paddle.base.core.set_cublas_switch(False)``,
``set_cudnn_switch(False)``), and ``FLAGS_cudnn_deterministic=1`` (fixed cuDNN algorithms). Every one of these
is printed at the start of the run.
"""
import argparse
import contextlib
import os
import sys

FLAG_HELP = {
    '--paddle-ops': "every CPU-only path off (MOCO_CPU_KERNELS=0, MOCO_FAST_LAYERS=0): Paddle's own ops, as a GPU "
                    'runs them',
    '--device': "where the Paddle side runs: cpu (default) or gpu (the first visible GPU; implies --paddle-ops; "
                'TF32 off)',
}


def _parser():
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument('--paddle-ops', action='store_true', help=FLAG_HELP['--paddle-ops'])
    p.add_argument('--device', default='cpu', help=FLAG_HELP['--device'])
    return p


def setup(argv):
    """Take --paddle-ops and --device out of ``argv`` and apply them. Returns (the other arguments, None), or
    (argv, exit code) after one error line. With -h/--help, prints these two flags and leaves argv as is."""
    if '-h' in argv or '--help' in argv:
        print('GPU / Paddle-ops mode (parity/gpu_mode.py):')
        for flag, text in FLAG_HELP.items():
            print(f'  {flag:14s} {text}')
        print()
        return argv, None
    ns, rest = _parser().parse_known_args(argv)
    if ns.device not in ('cpu', 'gpu'):
        print(f"error: --device {ns.device}: use 'cpu' or 'gpu'", file=sys.stderr)
        return argv, 2
    try:
        notes = apply(paddle_ops=ns.paddle_ops, device=ns.device)
    except RuntimeError as e:
        print(f'error: --device {ns.device}: {e}', file=sys.stderr)
        return argv, 2
    for line in notes:
        print(line, flush=True)
    return rest, None


def paddle_ops_env():
    """The environment of a run on Paddle's own ops (for subprocesses, or set before paddle_impl is used)."""
    return {'MOCO_CPU_KERNELS': '0', 'MOCO_FAST_LAYERS': '0'}


@contextlib.contextmanager
def paddle_ops_only():
    """In this process, for the duration of the block: our CPU kernels and fast layers off (Paddle's own ops),
    then back as they were. Layers pick the path at each call, so models built before are covered too."""
    from paddle_impl import cpu_kernels, layers
    saved_state = dict(cpu_kernels._state)
    saved_fast = layers.set_fast_layers(False)
    cpu_kernels._state.update(module=None, tried=True)  # as after MOCO_CPU_KERNELS=0: get() returns None
    try:
        yield
    finally:
        cpu_kernels._state.clear()
        cpu_kernels._state.update(saved_state)
        layers.set_fast_layers(saved_fast)


def _turn_off_paddle_ops_paths():
    os.environ.update(paddle_ops_env())
    from paddle_impl import cpu_kernels, layers
    layers.set_fast_layers(False)
    if cpu_kernels._state['module'] is not None:  # built already in this process: forget it
        cpu_kernels._state.update(module=None, tried=True)


def gpu_available():
    """(True, description) when Paddle is built with CUDA and sees a GPU, else (False, why)."""
    import paddle
    if not paddle.device.is_compiled_with_cuda():
        return False, (f'this Paddle ({paddle.__version__}) is a CPU build; install the GPU wheel from Paddle\'s '
                       f'own index (docs/gpu.md)')
    n = paddle.device.cuda.device_count()
    if n < 1:
        return False, 'Paddle is built with CUDA but sees no GPU (check CUDA_VISIBLE_DEVICES and the driver)'
    return True, f'{n} visible GPU(s), using gpu:0 ({paddle.device.cuda.get_device_name(0)})'


def tf32_env():
    """The environment that keeps TF32 off; effective when set before paddle (and CUDA) start."""
    return {'NVIDIA_TF32_OVERRIDE': '0', 'FLAGS_cudnn_deterministic': '1'}


def tf32_off():
    """Turn TF32 off for everything that could use it; returns what was done, one item per setting."""
    done = []
    if 'paddle' not in sys.modules:
        os.environ.update(tf32_env())
    else:
        os.environ['NVIDIA_TF32_OVERRIDE'] = '0'
    done.append('NVIDIA_TF32_OVERRIDE=0')
    import paddle
    core = paddle.base.core
    for name in ('set_cublas_switch', 'set_cudnn_switch'):
        fn = getattr(core, name, None)
        if fn is not None:
            fn(False)
            done.append(f'paddle.base.core.{name}(False)')
    try:
        paddle.set_flags({'FLAGS_cudnn_deterministic': True})
        if paddle.get_flags(['FLAGS_cudnn_deterministic'])['FLAGS_cudnn_deterministic']:
            done.append('FLAGS_cudnn_deterministic=1')
    except (ValueError, RuntimeError):  # a build without the flag (CPU)
        pass
    return done


def apply(paddle_ops=False, device='cpu'):
    """Apply the mode; returns the lines that say what it is (printed at the start of the run)."""
    notes = []
    if device == 'gpu':
        if 'paddle' not in sys.modules:  # before paddle starts CUDA: the libraries read these once
            os.environ.update(tf32_env())
        import paddle_impl
        paddle_impl.import_paddle_quietly()
        ok, what = gpu_available()
        if not ok:
            raise RuntimeError(what)
        done = tf32_off()
        import paddle
        paddle.set_device('gpu:0')
        notes.append(f'device: Paddle side on the GPU, {what}; torch reference on the CPU')
        notes.append(f"TF32 off: {', '.join(done)} (TF32 rounds float32 matmul/conv inputs to a 10-bit "
                     f'mantissa; with it on, float32 agreement would be ~1e-3, not 1e-4)')
        paddle_ops = True
    if paddle_ops:
        _turn_off_paddle_ops_paths()
        notes.append("paddle ops: MOCO_CPU_KERNELS=0 and MOCO_FAST_LAYERS=0: every layer runs Paddle's own ops "
                     '(the op set a GPU runs)')
    return notes


# ------------------------------------------------------------------------------------------------------------
# Issue 18 point 7, the evidence: how many operators one training-mode synchronised BN launches (forward +
# backward), ours (utils.SyncBatchNormMixin's formula) against a fused BN kernel (what Paddle's GPU
# sync_batch_norm is: one forward op with the all-reduce inside, one fused grad op). Counted on the CPU with
# Paddle's profiler, in a mocked two-process world (the all-reduce of a sum replaced by x + x, one op standing
# for the NCCL call). `python -m parity.gpu_mode --count-sync-bn-ops`

def _profile_ops(fn):
    import collections
    import tempfile

    import paddle.profiler as profiler
    fn()  # warm-up: probes and lazy initialisation are not counted
    with tempfile.TemporaryDirectory() as d:
        p = profiler.Profiler(targets=[profiler.ProfilerTarget.CPU],
                              on_trace_ready=profiler.export_chrome_tracing(d))
        p.start()
        fn()
        p.stop()
    counts = collections.Counter()

    def walk(node):
        if node.type == profiler.TracerEventType.Operator:
            counts[node.name.replace(' dygraph', '')] += 1
        for c in node.children_node:
            walk(c)
    for root in p.profiler_result.get_data().values():
        walk(root)
    return counts


def sync_bn_op_counts(shape=(8, 64, 28, 28)):
    """{'ours': Counter, 'fused': Counter} of the operators of one BN forward + backward on ``shape``
    (float32), the leaves' gradient accumulation left out (the same for both)."""
    import paddle

    from paddle_impl import layers, utils
    saved = utils.world_size, utils.all_reduce_sum
    utils.world_size = lambda: 2
    utils.all_reduce_sum = lambda x, group=None: x + x
    try:
        paddle.seed(0)
        x = paddle.randn(list(shape))
        x.stop_gradient = False
        dy = paddle.randn(list(shape))
        ours = layers.BatchNorm2D(shape[1])
        utils.convert_sync_batchnorm(ours, group=object())
        fused = layers.BatchNorm2D(shape[1])
        ours.train()
        fused.train()

        def run_ours():
            paddle.autograd.backward([ours(x)], [dy])

        def run_fused():
            y = layers._bn_kernel(x, fused._mean, fused._variance, fused.weight, fused.bias, fused._momentum,
                                  fused._epsilon, 'NCHW')
            paddle.autograd.backward([y], [dy])
        out = {'ours': _profile_ops(run_ours), 'fused': _profile_ops(run_fused)}
    finally:
        utils.world_size, utils.all_reduce_sum = saved
    for c in out.values():
        c.pop('Global_GradNodeAccumulation', None)
    return out


if __name__ == '__main__':
    if sys.argv[1:] == ['--count-sync-bn-ops']:
        import paddle_impl
        paddle_impl.import_paddle_quietly()
        res = sync_bn_op_counts()
        for k, c in res.items():
            print(f'{k}: {sum(c.values())} operators (forward + backward): {dict(sorted(c.items()))}')
    else:
        print('usage: python -m parity.gpu_mode --count-sync-bn-ops', file=sys.stderr)
        sys.exit(2)
