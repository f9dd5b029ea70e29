import os
import sys
import warnings

# Threads and MKL's code path are decided per machine when paddle_impl is imported below (before paddle:
# Paddle reads them only at its import; paddle_impl/machine.py). Tests share 2 cores at most.
if 'OMP_NUM_THREADS' not in os.environ:
    os.environ['OMP_NUM_THREADS'] = str(min(2, len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity')
                                            else (os.cpu_count() or 1)))
# torch and paddle share these processes: idle OpenMP threads must sleep, not spin (measured: 63 s -> 1.9 s)
os.environ.setdefault('OMP_WAIT_POLICY', 'PASSIVE')
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import paddle_impl  # noqa: E402,F401
warnings.filterwarnings('ignore', category=UserWarning)
