"""C kernels for the data pipeline (csrc/image_ops.c), loaded with ctypes: no Paddle, no Python headers.

The four ops of ColorJitter and the Gaussian blur on 8-bit RGB images, each byte for byte what the PIL
path gives (tests/test_image_ops.py compares every one of the 2^24 colours; the loader's tests compare with
torchvision): ``hue_shift_rgb``: Pillow's RGB -> HSV conversion, H += shift (mod 256), Pillow's HSV -> RGB
conversion, with Pillow's own float/double arithmetic; ``enhance_rgb``: ImageEnhance's Brightness, Contrast
and Color (saturation) blends, in Pillow's float arithmetic; ``gaussian_blur_rgb``: ImageFilter.GaussianBlur
(three box passes along x, then three along y, with Pillow's fixed-point weights). Measured on a 2-core AMD
EPYC (AVX-512), one thread, the two BYOL views of 500x375 JPEGs with PIL alone: ColorJitter took 43% of the
time, the blur 20%.

The C file is compiled once per machine with the system C compiler (``$CC``, default ``cc``; ~1 s) into
``$MOCO_KERNEL_CACHE`` (default ``~/.cache/moco_v3_paddle``), named by a hash of the source, the flags, the
compiler and the architecture; a file lock and an atomic rename make concurrent builders safe. The loader
builds it in the parent process when a ColorJitter or GaussianBlur is created, so DataLoader workers
(forked or spawned) only load the cached library.

Three variants are compiled into one library for baseline x86-64 (AVX-512, AVX2, generic) and the widest the
CPU supports runs; ``MOCO_CPU_ISA=avx2|generic`` (as for cpu_kernels.py) forces a narrower one; ``set_isa``
switches at run time (tests run every variant).

``MOCO_IMAGE_KERNELS=0`` turns the kernels off (unset: they follow ``MOCO_CPU_KERNELS``); where the build
fails (no compiler, say) one warning line is printed and PIL runs instead, with the same pixels. Other image
modes than RGB always take PIL's path.
"""
import ctypes
import hashlib
import os
import platform
import shlex
import subprocess
import sys
import tempfile

# the variant names and order, and the cache folder, of our Paddle kernels (cpu_kernels imports Paddle only
# inside functions)
from .cpu_kernels import ISAS, cache_root, isas_up_to
from .cpu_kernels import switched_on as _on

_SRC = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'csrc', 'image_ops.c')
FLAGS = ('-O3', '-shared', '-fPIC', '-ffp-contract=off', '-fno-math-errno', '-fno-trapping-math')
_state = {'lib': None, 'tried': False, 'error': None, 'isa': None, 'supported': None}


def enabled_by_env(env=None):
    """MOCO_IMAGE_KERNELS when set, else MOCO_CPU_KERNELS; on by default."""
    env = os.environ if env is None else env
    own = env.get('MOCO_IMAGE_KERNELS', '').strip()
    return _on(own) if own else _on(env.get('MOCO_CPU_KERNELS', '1'))


def compiler():
    """The C compiler command: $CC (may carry options), else `cc`."""
    return shlex.split(os.environ.get('CC', '').strip() or 'cc')


def library_path(cc=None):
    """Where the library built from this source with these flags and this compiler lives."""
    cc = compiler() if cc is None else cc
    h = hashlib.sha256()
    with open(_SRC, 'rb') as f:
        h.update(f.read())
    h.update('\0'.join(list(FLAGS) + cc).encode())
    h.update(platform.machine().encode())
    return os.path.join(cache_root(), f'moco_image_ops_{platform.machine()}_{h.hexdigest()[:12]}.so')


def _compile(cc, path):
    """Compile into a temporary file next to `path`, then rename it into place (atomic)."""
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix='.build_', suffix='.so')
    os.close(fd)
    try:
        try:
            r = subprocess.run(cc + list(FLAGS) + ['-o', tmp, _SRC, '-lm'], capture_output=True, text=True,
                               timeout=300)
        except (OSError, subprocess.SubprocessError) as e:
            raise RuntimeError(f'compiler {" ".join(cc)!r} could not run: {type(e).__name__}: {e}') from e
        if r.returncode != 0:
            lines = (r.stderr or r.stdout).splitlines()
            first = next((ln.strip() for ln in lines if 'error' in ln.lower()), lines[0] if lines else '')
            raise RuntimeError(f'compiling {_SRC} failed (exit {r.returncode}): {first[:200]}')
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _build():
    """The loaded library, compiled first where the cache has none (one process at a time)."""
    import fcntl
    cc = compiler()
    path = library_path(cc)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    if not os.path.exists(path):
        with open(path[:-3] + '.lock', 'w') as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                if not os.path.exists(path):  # another process may have built it while we waited
                    _compile(cc, path)
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)
    lib = ctypes.CDLL(path)
    lib.moco_image_isa_supported.argtypes = []
    lib.moco_image_isa_supported.restype = ctypes.c_int
    lib.moco_hue_shift_rgb.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_int]
    lib.moco_hue_shift_rgb.restype = ctypes.c_int
    lib.moco_gaussian_blur_rgb.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_double,
                                           ctypes.c_int]
    lib.moco_gaussian_blur_rgb.restype = ctypes.c_int
    for name in ('moco_brightness_rgb', 'moco_contrast_rgb', 'moco_saturation_rgb'):
        fn = getattr(lib, name)
        fn.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_double, ctypes.c_int]
        fn.restype = ctypes.c_int
    return lib


def get():
    """The loaded kernel library, or None (turned off, or the build failed: one warning on stderr)."""
    if _state['tried']:
        return _state['lib']
    _state['tried'] = True
    if not enabled_by_env():
        return None
    try:
        lib = _build()
    except Exception as e:  # noqa: BLE001 - any build or load failure means: use PIL
        _state['error'] = str(e)
        first = str(e).splitlines()[0][:400] if str(e) else type(e).__name__
        print(f'moco-v3 paddle: image kernels not built ({first}); using PIL for colour jitter and blur '
              f'(same pixels, slower; MOCO_IMAGE_KERNELS=0 hides this)', file=sys.stderr)
        return None
    _state['lib'] = lib
    _state['supported'] = ISAS[lib.moco_image_isa_supported()]
    _select_isa_from_env()
    return lib


def _select_isa_from_env():
    want = os.environ.get('MOCO_CPU_ISA', '').strip().lower()
    if want and want not in ISAS:  # cpu_kernels.py reports a bad value; here: the widest supported
        want = ''
    set_isa(want or None)


def set_isa(name=None):
    """Run variant `name` ('generic', 'avx2', 'avx512'; None: the widest this CPU supports) from now on; never
    one wider than the CPU supports. Returns the variant now active."""
    if _state['lib'] is None:
        raise RuntimeError('the image kernels are not built')
    best = ISAS.index(_state['supported'])
    level = best if name is None else min(ISAS.index(name), best)
    _state['isa'] = ISAS[level]
    return _state['isa']


def active_isa():
    return _state['isa'] if get() is not None else None


def supported_isas():
    """The compiled variants this CPU can run, narrowest first ([] when the kernels are not built)."""
    return isas_up_to(_state['supported'] if get() is not None else None)


def _check(arr, what):
    if arr.dtype.name != 'uint8' or arr.ndim != 3 or arr.shape[2] != 3 or not arr.flags.c_contiguous \
            or not arr.flags.writeable:
        raise ValueError(f'{what}: expected a writable C-contiguous uint8 HxWx3 array, got {arr.dtype} {arr.shape}')
    return arr.ctypes.data, arr.shape[0] * arr.shape[1]


def hue_shift_rgb(arr, shift):
    """Shift the hue of `arr` (uint8, H x W x 3, C-contiguous, writable) in place by `shift` (mod 256) as PIL's
    HSV round trip does. Returns False (and leaves `arr` alone) when the kernels are not available."""
    lib = get()
    if lib is None:
        return False
    ptr, npix = _check(arr, 'hue_shift_rgb')
    lib.moco_hue_shift_rgb(ptr, ptr, npix, int(shift) % 256, ISAS.index(_state['isa']))
    return True


def enhance_rgb(arr, op, factor):
    """PIL's ImageEnhance `op` ('brightness', 'contrast' or 'saturation' = ImageEnhance.Color) with `factor`,
    in place on `arr` (as hue_shift_rgb), byte for byte. Returns False when the kernels are not available."""
    lib = get()
    if lib is None:
        return False
    fn = {'brightness': lib.moco_brightness_rgb, 'contrast': lib.moco_contrast_rgb,
          'saturation': lib.moco_saturation_rgb}[op]
    ptr, npix = _check(arr, f'enhance_rgb({op!r})')
    fn(ptr, npix, float(factor), ISAS.index(_state['isa']))
    return True


def gaussian_blur_rgb(arr, sigma):
    """PIL's ImageFilter.GaussianBlur(radius=sigma) in place on `arr` (as hue_shift_rgb), byte for byte.
    Returns False (and leaves `arr` alone) when the kernels are not available or the radius is not finite."""
    lib = get()
    if lib is None:
        return False
    ptr, _ = _check(arr, 'gaussian_blur_rgb')
    return lib.moco_gaussian_blur_rgb(ptr, arr.shape[0], arr.shape[1], float(sigma), ISAS.index(_state['isa'])) >= 0
