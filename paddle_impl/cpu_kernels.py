"""Our CPU kernels (csrc/cpu_kernels.cc): softmax, exact GELU and LayerNorm (forward and backward), im2col /
col2im for convolutions, and the in-place momentum-encoder and LARS updates.

Paddle's CPU kernels for these run on one thread without SIMD; on the 2-core test machine they made the
MoCo v3 training step slower than torch's (bench/). The C++ file is built once per machine with the
system's C++ compiler through Paddle's custom-operator toolchain (``paddle.utils.cpp_extension``; ~15 s)
and cached under ``$MOCO_KERNEL_CACHE`` (default ``~/.cache/moco_v3_paddle``), in a folder named by a hash
of the source, the compiler flags and Paddle's version; concurrent processes (distributed launch) wait on a
file lock while one of them builds.

``MOCO_CPU_KERNELS=0`` turns them off; where the build fails (no compiler, say), one warning line is
printed and Paddle's own ops are used, with the same results up to rounding. Float64 parity runs through
these kernels whenever they are on.
"""
import contextlib
import hashlib
import os
import sys
import warnings

_SRC = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'csrc', 'cpu_kernels.cc')
_state = {'module': None, 'tried': False, 'error': None}


def enabled_by_env():
    return os.environ.get('MOCO_CPU_KERNELS', '1').strip().lower() not in ('0', 'false', 'no', 'off')


def _cpu_flags():
    try:
        with open('/proc/cpuinfo') as f:
            for line in f:
                if line.startswith('flags'):
                    return set(line.split(':', 1)[1].split())
    except OSError:
        pass
    return set()


def compile_flags():
    """-O3 with OpenMP; AVX2/FMA code only where this CPU has them (the cache folder name includes the
    flags, so a home folder shared by different machines keeps one build per instruction set)."""
    flags = ['-O3', '-fopenmp', '-fno-trapping-math']
    cpu = _cpu_flags()
    if {'avx2', 'fma'} <= cpu:
        flags += ['-mavx2', '-mfma']
    elif 'sse4_1' in cpu:
        flags += ['-msse4.1']
    return flags


def cache_root():
    return os.environ.get('MOCO_KERNEL_CACHE') or os.path.join(os.path.expanduser('~'), '.cache', 'moco_v3_paddle')


def _build_name(flags):
    import paddle
    h = hashlib.sha256()
    with open(_SRC, 'rb') as f:
        h.update(f.read())
    h.update(' '.join(flags).encode())
    h.update(paddle.__version__.encode())
    return 'moco_cpu_kernels_' + h.hexdigest()[:12]


@contextlib.contextmanager
def _quiet_fds(log):
    """Send everything written to stdout/stderr (this process's Python and C++ writers, loggers holding the
    old streams, and the compiler subprocesses Paddle starts) to the file ``log``."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    try:
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
        with warnings.catch_warnings():
            warnings.simplefilter('ignore')
            yield
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        os.close(saved[0])
        os.close(saved[1])


def _build():
    import fcntl
    import tempfile
    flags = compile_flags()
    name = _build_name(flags)
    root = cache_root()
    build_dir = os.path.join(root, name)
    os.makedirs(build_dir, exist_ok=True)
    with open(os.path.join(root, name + '.lock'), 'w') as lock, tempfile.TemporaryFile('w+') as log:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            with _quiet_fds(log):
                from paddle.utils.cpp_extension import load
                return load(name=name, sources=[_SRC], extra_cxx_cflags=flags, extra_ldflags=['-fopenmp'],
                            build_directory=build_dir, verbose=False)
        except Exception as e:  # noqa: BLE001 - any build failure means: use Paddle's own ops
            log.seek(0)
            errors = [line.strip() for line in log.read().splitlines() if 'error' in line.lower()]
            first = errors[0][:200] if errors else f'{type(e).__name__}: {str(e)[:200]}'
            raise RuntimeError(f'building {_SRC} failed: {first}') from e
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def get():
    """The built kernel module, or None (turned off, or the build failed: one warning on stderr)."""
    if _state['tried']:
        return _state['module']
    _state['tried'] = True
    if not enabled_by_env():
        return None
    try:
        _state['module'] = _build()
    except Exception as e:  # noqa: BLE001
        _state['error'] = str(e)
        first = str(e).splitlines()[0][:400] if str(e) else type(e).__name__
        print(f'moco-v3 paddle: CPU kernels not built ({first}); using Paddle\'s own CPU ops '
              f'(same results, slower; MOCO_CPU_KERNELS=0 hides this)', file=sys.stderr)
    return _state['module']


def usable(*tensors):
    """True where our kernels apply: kernels built, every tensor on the CPU in float32/float64."""
    import paddle
    if not paddle.in_dynamic_mode():  # a traced program (paddle.jit.save) keeps Paddle's own ops
        return False
    for t in tensors:
        if t is None or not t.place.is_cpu_place() or t.dtype not in (paddle.float32, paddle.float64):
            return False
    return get() is not None


def run_inplace(op, leaf, *args):
    """``op(leaf, *args)`` for one of our in-place ops on a parameter: Paddle refuses an in-place custom op on
    a leaf that takes gradients, so ``stop_gradient`` is lifted for the call and restored."""
    stop = leaf.stop_gradient
    leaf.stop_gradient = True
    try:
        op(leaf, *args)
    finally:
        leaf.stop_gradient = stop


def contiguous(t):
    return t if t.is_contiguous() else t.contiguous()
