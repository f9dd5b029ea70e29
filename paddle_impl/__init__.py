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


_cpu_defaults()


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
