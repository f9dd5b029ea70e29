"""The image kernels (paddle_impl/image_ops.py, csrc/image_ops.c) against PIL, the path they replace.

Each kernel must give PIL's bytes -- the path torchvision takes on PIL images, and the loader's fallback:
the hue shift PIL's own round trip (img.convert('HSV'), H + shift mod 256, convert('RGB')), checked on every
one of the 2^24 RGB colours (a 4096 x 4096 image) for the shifts 0, 1, 127, 128, 255 and 231 (= the factor
-0.1: int(-25.5) = -25, wrapped); brightness, contrast and saturation ImageEnhance's blends, on every colour
for three factors and on small images for many; the Gaussian blur on random images for many radii; each in
every variant (AVX-512, AVX2, generic) this CPU runs. Then the loader's ColorJitter and blur with the kernels
on and off, the fallback when no compiler is found (one
warning, same pixels), the opt-out, and concurrent first builds.
"""
import hashlib
import io
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image, ImageEnhance, ImageFilter

from paddle_impl import image_ops
from paddle_impl import loader as P

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHIFTS = [0, 1, 127, 128, 255, int(-0.1 * 255) % 256]
WARNING = 'image kernels not built'


@pytest.fixture(scope='module')
def lib():
    got = image_ops.get()
    assert got is not None, f'the image kernels did not build: {image_ops._state["error"]}'
    yield got
    image_ops.set_isa(None)


@pytest.fixture(scope='module')
def cube():
    """Every RGB colour once (4096 x 4096 x 3), and PIL's HSV of it."""
    k = np.arange(1 << 24, dtype=np.uint32)
    rgb = np.empty((1 << 24, 3), np.uint8)
    rgb[:, 0], rgb[:, 1], rgb[:, 2] = k >> 16, (k >> 8) & 255, k & 255
    rgb = rgb.reshape(4096, 4096, 3)
    hsv = np.array(Image.fromarray(rgb, 'RGB').convert('HSV'))
    return rgb, hsv


def _pil_shift(hsv, shift):
    """PIL's HSV -> RGB after adding `shift` to H (uint8 arithmetic wraps mod 256)."""
    moved = hsv.copy()
    moved[..., 0] += np.uint8(shift)
    return np.asarray(Image.fromarray(moved, 'HSV').convert('RGB'))


def _kernel(rgb, shift):
    out = rgb.copy()
    assert image_ops.hue_shift_rgb(out, shift)
    return out


def _describe(out, ref, rgb):
    bad = np.argwhere((out != ref).any(-1))
    y, x = bad[0]
    return f'{len(bad)} colours differ, e.g. RGB {rgb[y, x]} -> kernel {out[y, x]}, PIL {ref[y, x]}'


@pytest.mark.parametrize('shift', SHIFTS)
def test_hue_shift_matches_pil_on_every_colour(shift, lib, cube):
    rgb, hsv = cube
    ref = _pil_shift(hsv, shift)
    for isa in image_ops.supported_isas():
        assert image_ops.set_isa(isa) == isa
        out = _kernel(rgb, shift)
        assert np.array_equal(out, ref), f'{isa}, shift {shift}: {_describe(out, ref, rgb)}'
    image_ops.set_isa(None)


def test_a_wrong_shift_or_a_skipped_round_trip_is_caught(lib, cube):
    """The comparison above can fail: the kernel's output for shift s+1 differs from PIL's for s, and PIL's
    round trip is not the identity (so a kernel that returned its input would be caught at shift 0)."""
    rgb, hsv = cube
    sample = np.random.default_rng(0).choice(1 << 24, 1 << 20, replace=False)
    rgb_s = np.ascontiguousarray(rgb.reshape(-1, 3)[sample]).reshape(1024, 1024, 3)
    hsv_s = np.ascontiguousarray(hsv.reshape(-1, 3)[sample]).reshape(1024, 1024, 3)
    for shift in (0, 127, 255):
        ref = _pil_shift(hsv_s, shift)
        wrong = _kernel(rgb_s, shift + 1)
        assert (wrong != ref).any(-1).mean() > 0.5, shift
    assert (_pil_shift(hsv_s, 0) != rgb_s).any(-1).mean() > 0.01


ENHANCE = {'brightness': ImageEnhance.Brightness, 'contrast': ImageEnhance.Contrast,
           'saturation': ImageEnhance.Color}


def _small_images():
    g = np.random.default_rng(3)
    return [g.integers(0, 256, (61, 47, 3), dtype=np.uint8), g.integers(0, 40, (30, 20, 3), dtype=np.uint8),
            g.integers(200, 256, (9, 70, 3), dtype=np.uint8), np.full((3, 5, 3), 7, np.uint8),
            np.zeros((1, 1, 3), np.uint8)]


@pytest.mark.parametrize('op', sorted(ENHANCE))
def test_enhance_matches_pil(op, lib, cube):
    """Brightness, contrast, saturation (ImageEnhance.Color) against PIL: every colour for three factors (the
    ColorJitter ranges' ends and one inside), then small images (other contrast means) for many factors,
    extrapolation (> 1, clipped) and 0 and 1 included; in every variant this CPU runs."""
    rgb = cube[0]
    factors = [0.0, 1.0, 0.6000001, 1.3999999, 2.5] + list(np.random.default_rng(4).uniform(0.5, 1.5, 12))
    cases = [(rgb, f) for f in (0.6, 0.93, 1.4)] + [(a, f) for a in _small_images() for f in factors]
    refs = [np.asarray(ENHANCE[op](Image.fromarray(a, 'RGB')).enhance(f)) for a, f in cases]
    for isa in image_ops.supported_isas():
        image_ops.set_isa(isa)
        for (a, f), ref in zip(cases, refs):
            out = a.copy()
            assert image_ops.enhance_rgb(out, op, f)
            assert np.array_equal(out, ref), f'{op} {isa} factor {f} on {a.shape}: ' + _describe(out, ref, a)
    image_ops.set_isa(None)


BLUR_SHAPES = [(224, 224), (224, 97), (1, 1), (2, 5), (7, 3), (3, 300)]


def test_gaussian_blur_matches_pil(lib):
    """ImageFilter.GaussianBlur against PIL on random images (the SimCLR range 0.1-2 and beyond; images narrower
    than the box, so the clamped edges meet), in every variant this CPU runs."""
    g = np.random.default_rng(6)
    sigmas = [0.1, 2.0, 0.5, 1.0, 1.5, 0.10001, 1.99999, 5.0, 12.3] + [float(x) for x in g.uniform(0.1, 2.0, 12)]
    images = [g.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in BLUR_SHAPES]
    refs = {(k, s): np.asarray(Image.fromarray(a, 'RGB').filter(ImageFilter.GaussianBlur(radius=s)))
            for k, a in enumerate(images) for s in sigmas}
    for isa in image_ops.supported_isas():
        image_ops.set_isa(isa)
        for (k, s), ref in refs.items():
            out = images[k].copy()
            assert image_ops.gaussian_blur_rgb(out, s)
            assert np.array_equal(out, ref), f'{isa} sigma {s} on {out.shape}: ' + _describe(out, ref, images[k])
    image_ops.set_isa(None)


def test_a_wrong_factor_is_caught(lib):
    a = _small_images()[0]
    for op in ENHANCE:
        out = a.copy()
        image_ops.enhance_rgb(out, op, 1.25)
        ref = np.asarray(ENHANCE[op](Image.fromarray(a, 'RGB')).enhance(1.26))
        assert (out != ref).mean() > 0.05, op
    out = a.copy()
    image_ops.gaussian_blur_rgb(out, 1.0)
    ref = np.asarray(Image.fromarray(a, 'RGB').filter(ImageFilter.GaussianBlur(radius=1.05)))
    assert (out != ref).mean() > 0.05


def test_set_isa_never_exceeds_the_cpu(lib):
    supported = image_ops.supported_isas()
    assert supported[0] == 'generic' and supported == list(image_ops.ISAS[:len(supported)])
    assert image_ops.set_isa('avx512') == supported[-1]
    assert image_ops.set_isa('generic') == 'generic'
    assert image_ops.set_isa(None) == supported[-1]


def test_hue_shift_rejects_other_arrays(lib):
    read_only = np.zeros((4, 4, 3), np.uint8)
    read_only.flags.writeable = False
    for bad in (np.zeros((4, 4, 4), np.uint8), np.zeros((4, 4, 3), np.float32), np.zeros((4, 8, 3), np.uint8)[:, ::2],
                read_only):
        with pytest.raises(ValueError, match='uint8 HxWx3'):
            image_ops.hue_shift_rgb(bad, 3)
        with pytest.raises(ValueError, match='uint8 HxWx3'):
            image_ops.enhance_rgb(bad, 'contrast', 1.1)


def _jpeg_images():
    """Decoded JPEGs of smooth coloured structure plus noise (what the loader sees), odd sizes included."""
    out = []
    for seed, (w, h) in enumerate([(224, 224), (97, 131), (1, 1), (300, 7)]):
        g = np.random.default_rng(seed)
        y, x = np.mgrid[0:h, 0:w].astype(np.float64)
        arr = np.stack([255 * x / max(w - 1, 1), 128 + 127 * np.sin(y / 5.0 + seed), 255 * (x + y) % 256], -1)
        arr = np.clip(arr + g.normal(0, 25, arr.shape), 0, 255).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(arr, 'RGB').save(buf, format='JPEG', quality=75)
        buf.seek(0)
        out.append(Image.open(buf).convert('RGB'))
    return out


def _kernels_off(monkeypatch):
    """As after MOCO_IMAGE_KERNELS=0 in this process: get() returns None."""
    monkeypatch.setitem(image_ops._state, 'lib', None)
    monkeypatch.setitem(image_ops._state, 'tried', True)


def test_colour_jitter_and_blur_are_the_same_with_the_kernels_on_and_off(lib, monkeypatch):
    images = _jpeg_images()
    jitter, blur = P.ColorJitter(0.4, 0.4, 0.2, 0.1), P.GaussianBlur([.1, 2.])
    cases = []
    for k, img in enumerate(images):
        for r in range(6):
            params = jitter.get_params(P.sample_rng(0, k, r), img)
            cases.append((img, params, jitter.apply(img, params)))
        for factor in (-0.5, -0.1, -0.004, 0.0, 0.004, 0.1, 0.5):
            cases.append((img, ('hue', factor), P.adjust_hue(img, factor)))
        for op in ('brightness', 'contrast', 'saturation'):
            for factor in (0.6, 1.0, 1.37):
                cases.append((img, (op, factor), getattr(P, f'adjust_{op}')(img, factor)))
        for sigma in (0.1, 0.77, 2.0):
            cases.append((img, ('blur', sigma), blur.apply(img, sigma)))
    _kernels_off(monkeypatch)
    for img, params, on in cases:
        if params[0] == 'blur':
            off = blur.apply(img, params[1])
        elif isinstance(params[0], str):
            off = getattr(P, f'adjust_{params[0]}')(img, params[1])
        else:
            off = jitter.apply(img, params)
        assert on.mode == off.mode == 'RGB' and on.size == off.size
        assert np.array_equal(np.asarray(on), np.asarray(off)), params


def test_adjust_hue_other_modes_take_pil(lib):
    img = _jpeg_images()[0]
    rgba = img.convert('RGBA')
    out = P.adjust_hue(rgba, 0.2)
    assert out.mode == 'RGBA'
    assert np.array_equal(np.asarray(out.convert('RGB')), np.asarray(P.adjust_hue(img, 0.2)))
    grey = img.convert('L')
    assert P.adjust_hue(grey, 0.2) is grey


_CHILD = r'''
import hashlib, io, sys
import numpy as np
sys.path.insert(0, '.')
from tests.test_image_ops import _jpeg_images
from paddle_impl import image_ops, loader
imgs = _jpeg_images()
loader.ColorJitter(0.4, 0.4, 0.2, 0.1)  # builds the kernel, as the loader does
h = hashlib.sha256()
for img in imgs:
    for f in (-0.5, -0.1, 0.0, 0.1, 0.5):
        h.update(np.asarray(loader.adjust_hue(img, f)).tobytes())
print('built' if image_ops.get() is not None else 'pil', h.hexdigest())
'''


def _digest_here():
    h = hashlib.sha256()
    for img in _jpeg_images():
        for f in (-0.5, -0.1, 0.0, 0.1, 0.5):
            h.update(np.asarray(P.adjust_hue(img, f)).tobytes())
    return h.hexdigest()


def _child(tmp_path, **env):
    full = dict(os.environ, PYTHONPATH=ROOT, MOCO_KERNEL_CACHE=str(tmp_path), **env)
    return subprocess.Popen([sys.executable, '-c', _CHILD], env=full, cwd=ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _finish(proc):
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-2000:]
    return out.split()[-2:], err


def test_no_compiler_warns_once_and_gives_the_same_pixels(lib, tmp_path):
    (mode, digest), err = _finish(_child(tmp_path, CC='/nonexistent/cc', MOCO_IMAGE_KERNELS='1'))
    assert mode == 'pil'
    warnings = [line for line in err.splitlines() if WARNING in line]
    assert len(warnings) == 1 and '/nonexistent/cc' in warnings[0], err[-2000:]
    assert digest == _digest_here()
    assert not [p for p in os.listdir(tmp_path) if p.endswith('.so')]


def test_turned_off_is_silent_and_gives_the_same_pixels(lib, tmp_path):
    for env in ({'MOCO_IMAGE_KERNELS': '0'}, {'MOCO_IMAGE_KERNELS': '', 'MOCO_CPU_KERNELS': '0'}):
        (mode, digest), err = _finish(_child(tmp_path, **env))
        assert mode == 'pil' and WARNING not in err, (env, err[-2000:])
        assert digest == _digest_here()
    assert os.listdir(tmp_path) == []


def test_concurrent_first_builds_share_one_library(lib, tmp_path):
    procs = [_child(tmp_path, MOCO_IMAGE_KERNELS='1') for _ in range(3)]
    results = [_finish(p) for p in procs]
    want = _digest_here()
    for (mode, digest), err in results:
        assert mode == 'built' and WARNING not in err and digest == want, err[-2000:]
    files = sorted(os.listdir(tmp_path))
    assert len(files) == 2 and files[0].endswith('.lock') and files[1].endswith('.so'), files
