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
