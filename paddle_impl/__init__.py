"""MoCo v3 in PaddlePaddle. Twin of torch_ref/, file for file; never imports torch.

Importing this package first sets the CPU math defaults that Paddle reads only at its own import time
(measured, FACTS.md: Paddle's CPU GEMM is 3-5x slower with one thread and, on AMD, MKL's generic path).
A value the user already set is kept.
"""
import os
import sys


def _cpu_defaults():
    if 'paddle' in sys.modules:  # too late to matter
        return
    os.environ.setdefault('OMP_NUM_THREADS', str(len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity')
                                                 else (os.cpu_count() or 1)))
    try:
        with open('/proc/cpuinfo') as f:
            amd = 'AuthenticAMD' in f.read(4096)
    except OSError:
        amd = False
    if amd:
        os.environ.setdefault('MKL_DEBUG_CPU_TYPE', '5')


# glibc malloc: keep freed memory for reuse instead of returning it to the kernel. By default every buffer
# of 32 MiB or more (and smaller ones, by the dynamic threshold) is a fresh mmap, and first touching its
# pages costs more than the arithmetic done on it; Paddle's CPU allocator passes every tensor to malloc.
# Measured on the 2-core test VM, MoCo v3 ResNet-50 step, batch 8 at 224, both frameworks with the same
# setting: Paddle/torch 1.16 with glibc's defaults, 1.02 with these (bench/README). The same values as the
# environment variables below, which win when set (bench/ sets them for both frameworks).
MALLOC_ENV = {'MALLOC_MMAP_MAX_': '0', 'MALLOC_TRIM_THRESHOLD_': str(2 ** 31 - 1)}


def _malloc_defaults():
    if os.environ.get('MOCO_MALLOC_TUNE', '1').strip() == '0' or not sys.platform.startswith('linux'):
        return
    if any(k in os.environ for k in ('MALLOC_MMAP_MAX_', 'MALLOC_TRIM_THRESHOLD_', 'MALLOC_MMAP_THRESHOLD_')):
        return
    try:
        import ctypes
        libc = ctypes.CDLL('libc.so.6')
        libc.mallopt(-4, 0)  # M_MMAP_MAX: no mmap-backed chunks
        libc.mallopt(-1, 2 ** 31 - 1)  # M_TRIM_THRESHOLD: do not give the heap's top back
    except (OSError, AttributeError):  # not glibc: nothing to tune
        pass


_cpu_defaults()
_malloc_defaults()


def import_paddle_quietly():
    """Import paddle without its import-time notices on stderr (the OMP_NUM_THREADS advice, the ccache
    warning), so that a CLI's user error is the only line there. Anything else is passed on."""
    if 'paddle' in sys.modules:
        return
    import contextlib
    import io as _io
    import warnings
    buf = _io.StringIO()
    with warnings.catch_warnings():
        warnings.filterwarnings('ignore', message='No ccache found')
        with contextlib.redirect_stderr(buf):
            import paddle  # noqa: F401
    known = ('WARNING: OMP_NUM_THREADS set to', 'PLEASE USE OMP_NUM_THREADS WISELY')
    rest = [line for line in buf.getvalue().splitlines() if line.strip() and not line.startswith(known)]
    if rest:
        print('\n'.join(rest), file=sys.stderr)
