import os
import sys
import warnings

# Paddle reads these only at import time (see paddle_impl/__init__.py).
os.environ.setdefault('OMP_NUM_THREADS', '2')
os.environ.setdefault('MKL_DEBUG_CPU_TYPE', '5')
# torch and paddle share these processes: idle OpenMP threads must sleep, not spin (measured: 63 s -> 1.9 s)
os.environ.setdefault('OMP_WAIT_POLICY', 'PASSIVE')
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import paddle_impl  # noqa: E402,F401
warnings.filterwarnings('ignore', category=UserWarning)
