"""MoCo v3 in PaddlePaddle. Twin of torch_ref/, file for file; never imports torch.

Importing this package first sets the CPU math defaults that Paddle reads only at its own import time
(threads, MKL's code path on AMD CPUs, glibc malloc tuning), decided per machine by paddle_impl/machine.py
(``python -m paddle_impl.machine`` shows the decisions and why). A value the user already set is kept.
"""
import sys
import warnings

# `python -m paddle_impl.machine` runs the module that this package has just imported: runpy's notice about
# that is expected here
warnings.filterwarnings('ignore', message="'paddle_impl.machine' found in sys.modules", category=RuntimeWarning)
from . import machine  # noqa: E402

# glibc malloc settings that keep freed memory for reuse (machine.py: applied with mallopt on CPU runs, where
# measured to help Paddle); bench/ passes the same values as environment variables to both frameworks.
MALLOC_ENV = machine.MALLOC_ENV

# threads, MKL's code path on AMD CPUs, malloc: decided for this machine, each only where not set already
machine.apply()


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
