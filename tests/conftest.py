import os
import sys
import warnings

# Paddle reads these only at import time (see paddle_impl/__init__.py).
os.environ.setdefault('OMP_NUM_THREADS', '2')
os.environ.setdefault('MKL_DEBUG_CPU_TYPE', '5')
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import paddle_impl  # noqa: E402,F401
warnings.filterwarnings('ignore', category=UserWarning)
