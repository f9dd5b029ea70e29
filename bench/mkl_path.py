"""MKL's Intel code paths on an AMD CPU, in both frameworks' bench workers (``python -m bench.bench --mkl-path intel``).

Why: torch's and Paddle's MKL ask whether they run on an Intel CPU (``mkl_serv_intel_cpu_true``, exported by
torch's ``libtorch_cpu.so`` and by Paddle's ``libmklml_intel.so``) and on any other CPU take slower code
paths. Paddle's old MKL (2019) honours ``MKL_DEBUG_CPU_TYPE``, which paddle_impl.machine sets on AMD CPUs;
torch's MKL (2024) ignores it. On an AMD CPU torch's matrix products therefore run at a fraction of the
speed they have on an Intel Xeon, and a Paddle/torch ratio measured there flatters Paddle wherever the
work is GEMM. With this shim preloaded into both workers, MKL is told "Intel": both frameworks' MKL take
the paths they take on an Intel CPU of the same instruction set, which is the closest this project can
come to its Intel machines' numbers on an AMD one (oneDNN, ATen and our kernels choose by instruction set,
not vendor, and are unchanged).

Measured on the 2-core AMD EPYC VM (AVX-512), 2048² fp32 GEMM, 2 threads: torch 213 -> 514 GFLOP/s with the
shim; Paddle (MKL_DEBUG_CPU_TYPE=7) 381 without it and 366-375 with it, 369-383 under the shim with the
variable unset (what paddle_impl decides on an Intel CPU): Paddle's MKL already ran its AVX-512 path. On an
Intel CPU the shim changes nothing: MKL's answer there is already yes.

Bench-only: nothing in paddle_impl preloads it, and it affects only the worker processes it is given to.
"""
import hashlib
import os
import subprocess
import tempfile

from paddle_impl.image_ops import compiler  # $CC (may carry options), else cc

SYMBOL = 'mkl_serv_intel_cpu_true'
SOURCE = f'/* bench/mkl_path.py: MKL is told it runs on an Intel CPU */\nint {SYMBOL}(void) {{ return 1; }}\n'
PATHS = ('native', 'intel')


def build(folder=None):
    """Compile the shim (once per source; into ``folder`` or a temporary folder) and return the .so path."""
    folder = folder or tempfile.gettempdir()
    out = os.path.join(folder, f'moco_bench_mkl_intel_{hashlib.sha256(SOURCE.encode()).hexdigest()[:12]}.so')
    if os.path.exists(out):
        return out
    src = out[:-3] + f'.{os.getpid()}.c'
    tmp = out + f'.{os.getpid()}.tmp'
    try:
        with open(src, 'w') as f:
            f.write(SOURCE)
        try:
            r = subprocess.run(compiler() + ['-shared', '-fPIC', '-O2', '-o', tmp, src], capture_output=True, text=True)
        except OSError as e:
            raise RuntimeError(f'--mkl-path intel needs a C compiler ({" ".join(compiler())}: {e}); install gcc or '
                               f'run without --mkl-path') from None
        if r.returncode != 0:
            raise RuntimeError(f'--mkl-path intel: compiling the shim failed ({" ".join(compiler())}): '
                               f'{(r.stderr or r.stdout).strip()[-500:]}')
        os.replace(tmp, out)
    finally:
        for p in (src, tmp):
            if os.path.exists(p):
                os.remove(p)
    return out


def env_for(env, path, folder=None):
    """The workers' environment for MKL code path ``path``: 'native' (unchanged) or 'intel' (the shim first in
    LD_PRELOAD, the user's preloads kept after it)."""
    if not path or path == 'native':
        return env
    if path not in PATHS:
        raise RuntimeError(f"--mkl-path {path}: unknown; choose from {', '.join(PATHS)}")
    shim = build(folder)
    pre = env.get('LD_PRELOAD', '').strip()
    return dict(env, LD_PRELOAD=shim + (' ' + pre if pre else ''))
