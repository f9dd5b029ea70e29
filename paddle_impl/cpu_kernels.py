"""Our CPU kernels (csrc/cpu_kernels.cc): softmax, exact GELU and LayerNorm (forward and backward), im2col /
col2im for convolutions, and the in-place momentum-encoder and LARS updates.

Paddle's CPU kernels for these run on one thread without SIMD; on the 2-core test machine they made the
MoCo v3 training step slower than torch's (bench/). The C++ file is built once per machine with the
system's C++ compiler through Paddle's custom-operator toolchain (``paddle.utils.cpp_extension``; ~15 s)
and cached under ``$MOCO_KERNEL_CACHE`` (default ``~/.cache/moco_v3_paddle``), in a folder named by a hash
of the source, the compiler flags and Paddle's version; concurrent processes (distributed launch) wait on a
file lock while one of them builds.

The kernels are compiled in three variants (AVX-512, AVX2/FMA, baseline x86-64) into one library built for
baseline x86-64, and the widest variant the CPU supports runs (checked by the CPU's own feature bits, in
C++); ``MOCO_CPU_ISA=avx2|generic`` forces a narrower one (e.g. to mimic an AVX2 machine); ``set_isa``
switches at run time (tests run every variant).

float32 convolutions can also run as oneDNN direct convolutions (the library in Paddle's wheel, opened at
run time; see ``onednn`` below and csrc/cpu_kernels.cc); ``MOCO_ONEDNN_CONV=0`` keeps them on im2col + GEMM.

The ViT's attention runs fused where it can (``attention``): each head's products by the MKL in Paddle's wheel
(cblas, opened at run time like oneDNN), read from and written to the linear layers' own layouts (no
transposes), nothing of size N x N kept for the backward; ``MOCO_CPU_ATTENTION=0`` keeps the unfused path.

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
_SOURCES = (_SRC, os.path.join(os.path.dirname(_SRC), 'kernels_impl.h'))
_state = {'module': None, 'tried': False, 'error': None, 'isa': None, 'supported': None, 'onednn': None,
          'blas': None}


OFF_VALUES = ('0', 'false', 'no', 'off')  # what turns a MOCO_* switch variable off (any case, spaces ignored)


def switched_on(value):
    """The value of a switch variable (MOCO_CPU_KERNELS, MOCO_CPU_ATTENTION, ...) read as on/off."""
    return value.strip().lower() not in OFF_VALUES


def enabled_by_env():
    return switched_on(os.environ.get('MOCO_CPU_KERNELS', '1'))


# the variants compiled into the library (csrc/cpu_kernels.cc), narrowest first; the index is the level
ISAS = ('generic', 'avx2', 'avx512')


def compile_flags():
    """-O3 with OpenMP, for baseline x86-64: the wider variants are compiled by target pragmas inside the file
    and chosen at run time, so the library runs on any x86-64 CPU (a cache folder shared by machines is safe)."""
    return ['-O3', '-fopenmp', '-fno-trapping-math', '-fno-math-errno']


def openmp_link_flags():
    """Link our OpenMP loops to the OpenMP runtime Paddle itself runs on (Intel's libiomp5 in Paddle's wheel:
    Paddle's own kernels, its MKL and its oneDNN all bind to it), so that the process has one pool of OpenMP
    threads. With GCC's libgomp beside it (``-fopenmp``) there were two pools, and the idle threads of either
    could only sleep at once (``OMP_WAIT_POLICY=PASSIVE``): spinning threads of one pool took the cores from
    the other (measured, ResNet-50 step, AVX2 cap: 4.5 s with PASSIVE, 9.5 s with ACTIVE). libiomp5 implements GCC's
    ``GOMP_*`` entry points, which is what ``-fopenmp`` code calls. Where the wheel has no libiomp5, libgomp."""
    import paddle
    libs = os.path.join(os.path.dirname(paddle.__file__), 'libs')
    if os.path.isfile(os.path.join(libs, 'libiomp5.so')):
        return [f'-L{libs}', '-l:libiomp5.so', f'-Wl,-rpath,{libs}']
    return ['-fopenmp']


def openmp_runtime():
    """The OpenMP runtime our kernel library was linked to ('libiomp5' or 'libgomp')."""
    return 'libiomp5' if '-l:libiomp5.so' in openmp_link_flags() else 'libgomp'


def cache_root():
    return os.environ.get('MOCO_KERNEL_CACHE') or os.path.join(os.path.expanduser('~'), '.cache', 'moco_v3_paddle')


def _build_name(flags):
    """A folder per (sources, flags, Paddle version, architecture, compiled ISA variants)."""
    import platform

    import paddle
    h = hashlib.sha256()
    for src in _SOURCES:
        with open(src, 'rb') as f:
            h.update(f.read())
    h.update(' '.join(flags).encode())
    h.update(paddle.__version__.encode())
    h.update(platform.machine().encode())
    return f'moco_cpu_kernels_{platform.machine()}_{"-".join(ISAS)}_{h.hexdigest()[:12]}'


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
    ldflags = openmp_link_flags() + ['-ldl']
    name = _build_name(flags + ldflags)
    root = cache_root()
    build_dir = os.path.join(root, name)
    os.makedirs(build_dir, exist_ok=True)
    with open(os.path.join(root, name + '.lock'), 'w') as lock, tempfile.TemporaryFile('w+') as log:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            with _quiet_fds(log):
                from paddle.utils.cpp_extension import load
                return load(name=name, sources=[_SRC], extra_cxx_cflags=flags, extra_ldflags=ldflags,
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
        return None
    _select_isa_from_env()
    return _state['module']


def _select_isa_from_env():
    want = os.environ.get('MOCO_CPU_ISA', '').strip().lower()
    if want and want not in ISAS:
        print(f"moco-v3 paddle: MOCO_CPU_ISA={want!r} is not one of {', '.join(ISAS)}; using the widest this CPU "
              f"supports", file=sys.stderr)
        want = ''
    got = set_isa(want or None)
    if want and got != want:
        print(f'moco-v3 paddle: MOCO_CPU_ISA={want}: this CPU supports at most {got}; using {got}', file=sys.stderr)


def set_isa(name=None):
    """Run our kernels' variant ``name`` ('generic', 'avx2', 'avx512'; None: the widest supported) from now on
    in this process; a variant wider than the CPU supports is never selected (the widest supported is).
    Returns the variant now active."""
    import paddle
    mod = _state['module']
    if mod is None:
        raise RuntimeError('our CPU kernels are not built')
    level = -1 if name is None else ISAS.index(name)
    active, supported = (int(v) for v in mod.moco_set_isa(paddle.zeros([1]), level).numpy())
    _state['isa'], _state['supported'] = ISAS[active], ISAS[supported]
    return ISAS[active]


def active_isa():
    """The variant our kernels run (None when they are not built)."""
    return _state['isa'] if get() is not None else None


def isas_up_to(widest):
    """The variants from the narrowest up to ``widest`` (None: none), narrowest first."""
    return [] if widest is None else list(ISAS[:ISAS.index(widest) + 1])


def supported_isas():
    """The compiled variants this CPU can run, narrowest first ([] when the kernels are not built)."""
    return isas_up_to(_state['supported'] if get() is not None else None)


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


def _wheel_library(variable, filename):
    """``$variable`` where set, else the library ``filename`` in Paddle's wheel (paddle/libs)."""
    import paddle
    return os.environ.get(variable) or os.path.join(os.path.dirname(paddle.__file__), 'libs', filename)


def onednn_library():
    """The oneDNN library in Paddle's wheel (``MOCO_ONEDNN_LIB`` overrides the path)."""
    return _wheel_library('MOCO_ONEDNN_LIB', 'libdnnl.so.3')


def onednn_setting():
    """``MOCO_ONEDNN_CONV``: '0' never, '1' every float32 convolution our kernels take, unset/'auto' the
    shapes where it measured faster (layers.onednn_conv_wins)."""
    v = os.environ.get('MOCO_ONEDNN_CONV', 'auto').strip().lower()
    if v in OFF_VALUES:
        return '0'
    if v in ('1', 'true', 'yes', 'on'):
        return '1'
    if v not in ('auto', '') and not _state.get('warned_onednn_setting'):
        _state['warned_onednn_setting'] = True
        print(f'moco-v3 paddle: MOCO_ONEDNN_CONV={v!r} is not one of 0, 1, auto; using auto', file=sys.stderr)
    return 'auto'


def onednn():
    """True where oneDNN convolutions can run here: our kernels built, ``MOCO_ONEDNN_CONV`` not 0 and oneDNN
    3.x opened from ``onednn_library()`` (else one warning line; the convolutions stay on im2col + GEMM)."""
    return onednn_setting() != '0' and onednn_loaded()


def onednn_loaded():
    """oneDNN opened in this process (tried once, whatever ``MOCO_ONEDNN_CONV`` says)."""
    if _state['onednn'] is None:
        _state['onednn'] = _load_onednn()
    return bool(_state['onednn'])


def _load_onednn():
    import paddle
    mod = get()
    if mod is None:
        return False
    path = onednn_library()
    if not os.path.isfile(path):
        ok, version = False, 'no such file'
    else:
        ok, major, minor, patch = (int(v) for v in mod.moco_dnnl_init(paddle.zeros([1]), path).numpy())
        version = f'version {major}.{minor}.{patch}' if major else 'not a oneDNN 3.x library'
    if not ok:
        print(f'moco-v3 paddle: oneDNN not usable from {path} ({version}); float32 convolutions use im2col + '
              f'GEMM (same results up to rounding; MOCO_ONEDNN_CONV=0 hides this)', file=sys.stderr)
    return ok


def blas_library():
    """The BLAS for the fused attention: the MKL in Paddle's wheel (``MOCO_BLAS_LIB`` overrides the path)."""
    return _wheel_library('MOCO_BLAS_LIB', 'libmklml_intel.so')


def attention_enabled_by_env():
    return switched_on(os.environ.get('MOCO_CPU_ATTENTION', '1'))


def attention(*tensors):
    """True where the fused attention (layers.fused_attention) runs: our kernels usable for ``tensors``,
    ``MOCO_CPU_ATTENTION`` not 0, and cblas_sgemm/cblas_dgemm opened from ``blas_library()`` (tried once; else
    one warning line and the unfused attention)."""
    if not attention_enabled_by_env() or not usable(*tensors):
        return False
    if _state['blas'] is None:
        _state['blas'] = _load_blas()
    return _state['blas']


def _load_blas():
    import paddle
    path = blas_library()
    exists = os.path.isfile(path)
    ok = exists and bool(int(get().moco_blas_init(paddle.zeros([1]), path).numpy()[0]))
    if not ok:
        why = 'not a library with cblas_sgemm and cblas_dgemm' if exists else 'no such file'
        print(f'moco-v3 paddle: BLAS not usable from {path} ({why}); the ViT attention runs unfused (same '
              f'results up to rounding; MOCO_CPU_ATTENTION=0 hides this)', file=sys.stderr)
    return ok
