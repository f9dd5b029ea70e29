"""Data augmentation of MoCo v3 for Paddle: the twin of torch_ref/loader.py (official moco-v3/moco/loader.py
and the transforms built in main_moco.py / main_lincls.py).

Built on PIL + numpy, and on RGB images our C kernels for ColorJitter and the blur (image_ops.py, loaded
with ctypes), so it runs in DataLoader worker processes without touching Paddle. Every image operation is
the one torchvision's PIL path performs (tests/test_loader.py and tests/test_image_ops.py prove it pixel for
pixel); the output of ToTensor/Normalize is a float32 CHW numpy array, which paddle.io.DataLoader batches.

Every random transform is split in two:
  get_params(rng, img) -> params   draws the random parameters, and only from `rng`;
  apply(img, params)   -> img      is deterministic.
`rng` is a `random.Random` (a numpy Generator is accepted too); None means Python's global `random`
(Paddle's DataLoader seeds it per worker). A whole pipeline can be recorded and replayed:
  out, params = t.forward(img, rng)    and    t.apply(img, params) == out.
Seeding each sample's rng from (seed, epoch, index) -- see `sample_rng` -- makes the augmentation of a
run independent of worker count and restorable on resume.
"""
import math
import numbers
import random

import numpy as np
from PIL import Image, ImageEnhance, ImageFilter, ImageOps

from . import image_ops

IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]

__all__ = [
    'IMAGENET_MEAN', 'IMAGENET_STD', 'sample_rng',
    'Transform', 'Compose', 'RandomApply', 'RandomResizedCrop', 'ColorJitter', 'RandomGrayscale',
    'GaussianBlur', 'Solarize', 'RandomHorizontalFlip', 'Resize', 'CenterCrop', 'ToTensor', 'Normalize',
    'TwoCropsTransform', 'build_augmentations', 'build_lincls_transforms',
]


# ----------------------------------------------------------------------------------------------------------
# random number sources

def sample_rng(seed, epoch, index):
    """A `random.Random` that depends only on (seed, epoch, index): same sample, same augmentation."""
    return random.Random(f'moco-v3/{int(seed)}/{int(epoch)}/{int(index)}')


class _NumpyRng:
    """The four `random.Random` methods used here, on a numpy Generator."""

    def __init__(self, gen):
        self.gen = gen

    def random(self):
        return float(self.gen.random())

    def uniform(self, a, b):
        return a + (b - a) * float(self.gen.random())

    def randint(self, a, b):  # inclusive, as random.Random.randint
        return int(self.gen.integers(a, b + 1))

    def shuffle(self, x):
        perm = self.gen.permutation(len(x))
        x[:] = [x[k] for k in perm]


def _as_rng(rng):
    if rng is None:
        return random
    if isinstance(rng, np.random.Generator):
        return _NumpyRng(rng)
    return rng


# ----------------------------------------------------------------------------------------------------------
# deterministic image operations (the ones torchvision.transforms.functional applies to PIL images)

def _check_pil(img):
    if not isinstance(img, Image.Image):
        raise TypeError(f'expected a PIL image, got {type(img).__name__}')


def crop(img, top, left, height, width):
    return img.crop((left, top, left + width, top + height))


def resize(img, size, interpolation=Image.BILINEAR):
    """size: int (the shorter edge, aspect kept, longer edge truncated) or (h, w). PIL's bilinear
    resampling is antialiased (as torchvision on PIL images)."""
    w, h = img.size
    if isinstance(size, numbers.Number) or len(size) == 1:
        short = int(size if isinstance(size, numbers.Number) else size[0])
        if w <= h:
            new_w, new_h = short, int(short * h / w)
        else:
            new_w, new_h = int(short * w / h), short
    else:
        new_h, new_w = int(size[0]), int(size[1])
    if (new_w, new_h) == (w, h):
        return img
    return img.resize((new_w, new_h), interpolation)


def resized_crop(img, top, left, height, width, size, interpolation=Image.BILINEAR):
    return resize(crop(img, top, left, height, width), size, interpolation)


def center_crop(img, size):
    crop_h, crop_w = (size, size) if isinstance(size, numbers.Number) else size
    w, h = img.size
    if crop_w > w or crop_h > h:  # pad with zeros, as torchvision does
        pad_l = (crop_w - w) // 2 if crop_w > w else 0
        pad_t = (crop_h - h) // 2 if crop_h > h else 0
        pad_r = (crop_w - w + 1) // 2 if crop_w > w else 0
        pad_b = (crop_h - h + 1) // 2 if crop_h > h else 0
        canvas = Image.new(img.mode, (w + pad_l + pad_r, h + pad_t + pad_b))
        canvas.paste(img, (pad_l, pad_t))
        img = canvas
        w, h = img.size
        if (crop_w, crop_h) == (w, h):
            return img
    top = int(round((h - crop_h) / 2.0))
    left = int(round((w - crop_w) / 2.0))
    return crop(img, top, left, crop_h, crop_w)


# The four colour operations run in our C kernels (image_ops.py) on 8-bit RGB images, with the same bytes as
# PIL's (tests/test_image_ops.py); other modes, or no kernels, take PIL's own path.
_ENHANCE = {'brightness': ImageEnhance.Brightness, 'contrast': ImageEnhance.Contrast,
            'saturation': ImageEnhance.Color}


def _hue_shift(factor):
    if not -0.5 <= factor <= 0.5:
        raise ValueError(f'hue factor {factor} is not in [-0.5, 0.5]')
    return int(factor * 255) % 256  # truncate toward zero, then wrap into uint8


def _colour_op_array(arr, op, factor):
    """One colour op in place on an RGB uint8 array with our kernels; False when they are not available."""
    if op == 'hue':
        return image_ops.hue_shift_rgb(arr, _hue_shift(factor))
    return image_ops.enhance_rgb(arr, op, factor)


def _colour_ops(img, ops):
    """Apply [(op, factor), ...] in turn: through one array with our kernels where they apply, else PIL."""
    if ops and img.mode == 'RGB' and image_ops.get() is not None:
        arr = np.array(img, dtype=np.uint8)
        for op, factor in ops:
            _colour_op_array(arr, op, factor)
        return Image.fromarray(arr, 'RGB')
    for op, factor in ops:
        img = _pil_hue(img, factor) if op == 'hue' else _ENHANCE[op](img).enhance(factor)
    return img


def adjust_brightness(img, factor):
    return _colour_ops(img, [('brightness', factor)])


def adjust_contrast(img, factor):
    return _colour_ops(img, [('contrast', factor)])


def adjust_saturation(img, factor):
    return _colour_ops(img, [('saturation', factor)])


def adjust_hue(img, factor):
    """Shift the hue by `factor` turns (in [-0.5, 0.5]) on PIL's 8-bit HSV, wrapping around."""
    return _colour_ops(img, [('hue', factor)])


def _pil_hue(img, factor):
    shift = _hue_shift(factor)
    if img.mode in ('L', '1', 'I', 'F'):
        return img
    h, s, v = img.convert('HSV').split()
    h = h.point(lambda x: (x + shift) % 256)
    return Image.merge('HSV', (h, s, v)).convert(img.mode)


def to_grayscale(img, num_output_channels=3):
    grey = img.convert('L')
    if num_output_channels == 1:
        return grey
    if num_output_channels == 3:
        return Image.merge('RGB', (grey, grey, grey))
    raise ValueError('num_output_channels must be 1 or 3')


def solarize(img, threshold=128):
    return ImageOps.solarize(img, threshold)


def hflip(img):
    return img.transpose(Image.FLIP_LEFT_RIGHT)


def to_tensor(img):
    """PIL image (8-bit modes) -> float32 numpy array, CHW, values in [0, 1]."""
    _check_pil(img)
    if img.mode == '1':
        arr = np.asarray(img, dtype=np.uint8) * np.uint8(255)
    elif img.mode in ('I', 'I;16', 'F'):
        raise TypeError(f'ToTensor: image mode {img.mode} is not supported (8-bit modes only)')
    else:
        arr = np.asarray(img, dtype=np.uint8)
    if arr.ndim == 2:
        arr = arr[:, :, None]
    return np.ascontiguousarray(arr.transpose(2, 0, 1)).astype(np.float32) / np.float32(255)


def normalize(arr, mean, std):
    mean = np.asarray(mean, dtype=np.float32).reshape(-1, 1, 1)
    std = np.asarray(std, dtype=np.float32).reshape(-1, 1, 1)
    if (std == 0).any():
        raise ValueError('std must not be zero')
    return (arr.astype(np.float32, copy=False) - mean) / std


# ----------------------------------------------------------------------------------------------------------
# transforms

class Transform:
    """A transform: get_params(rng, img) draws, apply(img, params) computes. Calling it does both."""

    def get_params(self, rng, img):
        return None

    def apply(self, img, params):
        raise NotImplementedError

    def forward(self, img, rng=None):
        """Returns (output, params) with apply(img, params) == output."""
        params = self.get_params(_as_rng(rng), img)
        return self.apply(img, params), params

    def __call__(self, img, rng=None):
        return self.forward(img, rng)[0]

    def __repr__(self):
        return f'{type(self).__name__}()'


def _forward_any(t, img, rng):
    if isinstance(t, Transform):
        return t.forward(img, rng)
    return t(img), None  # a plain callable: deterministic, nothing to record


def _apply_any(t, img, params):
    if isinstance(t, Transform):
        return t.apply(img, params)
    return t(img)


class Compose(Transform):
    """Apply transforms in turn; params is the list of each one's params."""

    def __init__(self, transforms):
        self.transforms = list(transforms)

    def forward(self, img, rng=None):
        rng = _as_rng(rng)
        params = []
        for t in self.transforms:
            img, p = _forward_any(t, img, rng)
            params.append(p)
        return img, params

    def apply(self, img, params):
        for t, p in zip(self.transforms, params, strict=True):
            img = _apply_any(t, img, p)
        return img

    def __repr__(self):
        inner = ''.join(f'\n    {t!r}' for t in self.transforms)
        return f'Compose({inner}\n)'


class RandomApply(Transform):
    """Apply `transforms` with probability p (torchvision: when a uniform draw u in [0, 1) has u <= p).
    params: None when skipped, else the list of the inner transforms' params."""

    def __init__(self, transforms, p=0.5):
        self.transforms = list(transforms)
        self.p = p

    def forward(self, img, rng=None):
        rng = _as_rng(rng)
        if self.p < rng.random():
            return img, None
        params = []
        for t in self.transforms:
            img, q = _forward_any(t, img, rng)
            params.append(q)
        return img, params

    def apply(self, img, params):
        if params is None:
            return img
        for t, q in zip(self.transforms, params, strict=True):
            img = _apply_any(t, img, q)
        return img

    def __repr__(self):
        return f'RandomApply(p={self.p}, {self.transforms!r})'


class RandomResizedCrop(Transform):
    """Crop a random area fraction in `scale` with a log-uniform aspect ratio in `ratio`, resize to `size`.
    params: (top, left, height, width) of the crop box, as torchvision's get_params."""

    def __init__(self, size, scale=(0.08, 1.0), ratio=(3. / 4., 4. / 3.), interpolation=Image.BILINEAR):
        self.size = (size, size) if isinstance(size, numbers.Number) else tuple(size)
        self.scale = scale
        self.ratio = ratio
        self.interpolation = interpolation

    def get_params(self, rng, img):
        width, height = img.size
        area = height * width
        log_lo, log_hi = math.log(self.ratio[0]), math.log(self.ratio[1])
        for _ in range(10):
            target_area = area * rng.uniform(self.scale[0], self.scale[1])
            aspect_ratio = math.exp(rng.uniform(log_lo, log_hi))
            w = int(round(math.sqrt(target_area * aspect_ratio)))
            h = int(round(math.sqrt(target_area / aspect_ratio)))
            if 0 < w <= width and 0 < h <= height:
                i = rng.randint(0, height - h)
                j = rng.randint(0, width - w)
                return i, j, h, w
        # ten misses: the central crop with the aspect ratio clamped into `ratio`
        in_ratio = width / height
        if in_ratio < min(self.ratio):
            w = width
            h = int(round(w / min(self.ratio)))
        elif in_ratio > max(self.ratio):
            h = height
            w = int(round(h * max(self.ratio)))
        else:
            w, h = width, height
        return (height - h) // 2, (width - w) // 2, h, w

    def apply(self, img, params):
        i, j, h, w = params
        return resized_crop(img, i, j, h, w, self.size, self.interpolation)

    def __repr__(self):
        return f'RandomResizedCrop(size={self.size}, scale={tuple(self.scale)}, ratio={tuple(self.ratio)})'


class ColorJitter(Transform):
    """Brightness, contrast, saturation and hue jitter in a random order (torchvision's semantics).
    params: (order, b, c, s, h): order a permutation of (0 brightness, 1 contrast, 2 saturation, 3 hue),
    then each factor (None for a disabled one)."""

    def __init__(self, brightness=0, contrast=0, saturation=0, hue=0):
        self.brightness = self._range(brightness, 'brightness')
        self.contrast = self._range(contrast, 'contrast')
        self.saturation = self._range(saturation, 'saturation')
        self.hue = self._range(hue, 'hue', center=0, bound=(-0.5, 0.5), clip_at_zero=False)
        if (self.brightness, self.contrast, self.saturation, self.hue) != (None,) * 4:
            image_ops.get()  # build our colour kernels now, in the parent, not in each DataLoader worker

    @staticmethod
    def _range(value, name, center=1, bound=(0, float('inf')), clip_at_zero=True):
        if isinstance(value, numbers.Number):
            if value < 0:
                raise ValueError(f'{name} must be non-negative, got {value}')
            lo, hi = center - float(value), center + float(value)
            if clip_at_zero:
                lo = max(lo, 0.0)
        elif isinstance(value, (tuple, list)) and len(value) == 2:
            lo, hi = float(value[0]), float(value[1])
        else:
            raise TypeError(f'{name} must be a number or a (min, max) pair')
        if not bound[0] <= lo <= hi <= bound[1]:
            raise ValueError(f'{name} range {(lo, hi)} is outside {bound}')
        return None if lo == hi == center else (lo, hi)

    def get_params(self, rng, img=None):
        order = [0, 1, 2, 3]
        rng.shuffle(order)
        factors = [None if r is None else rng.uniform(r[0], r[1])
                   for r in (self.brightness, self.contrast, self.saturation, self.hue)]
        return (tuple(order), *factors)

    def apply(self, img, params):
        order, *factors = params
        names = ('brightness', 'contrast', 'saturation', 'hue')
        return _colour_ops(img, [(names[k], factors[k]) for k in order if factors[k] is not None])

    def __repr__(self):
        return (f'ColorJitter(brightness={self.brightness}, contrast={self.contrast}, '
                f'saturation={self.saturation}, hue={self.hue})')


class RandomGrayscale(Transform):
    """Grey (kept as many channels as the input) with probability p. params: bool."""

    def __init__(self, p=0.1):
        self.p = p

    def get_params(self, rng, img=None):
        return rng.random() < self.p

    def apply(self, img, params):
        return to_grayscale(img, len(img.getbands())) if params else img

    def __repr__(self):
        return f'RandomGrayscale(p={self.p})'


class GaussianBlur(Transform):
    """PIL Gaussian blur with a radius drawn uniformly from `sigma` (SimCLR). params: the radius."""

    def __init__(self, sigma=[.1, 2.]):
        self.sigma = sigma
        image_ops.get()  # build our kernels now, in the parent, not in each DataLoader worker

    def get_params(self, rng, img=None):
        return rng.uniform(self.sigma[0], self.sigma[1])

    def apply(self, img, params):
        if img.mode == 'RGB' and image_ops.get() is not None:  # our C kernel: PIL's bytes (test_image_ops.py)
            arr = np.array(img, dtype=np.uint8)
            if image_ops.gaussian_blur_rgb(arr, params):
                return Image.fromarray(arr, 'RGB')
        return img.filter(ImageFilter.GaussianBlur(radius=params))

    def __repr__(self):
        return f'GaussianBlur(sigma={list(self.sigma)})'


class Solarize(Transform):
    """PIL solarize at threshold 128 (BYOL). No random parameters."""

    def apply(self, img, params=None):
        return solarize(img, 128)


class RandomHorizontalFlip(Transform):
    """Mirror left-right with probability p. params: bool."""

    def __init__(self, p=0.5):
        self.p = p

    def get_params(self, rng, img=None):
        return rng.random() < self.p

    def apply(self, img, params):
        return hflip(img) if params else img

    def __repr__(self):
        return f'RandomHorizontalFlip(p={self.p})'


class Resize(Transform):
    """Resize (bilinear, antialiased); an int size sets the shorter edge."""

    def __init__(self, size, interpolation=Image.BILINEAR):
        self.size = size
        self.interpolation = interpolation

    def apply(self, img, params=None):
        return resize(img, self.size, self.interpolation)

    def __repr__(self):
        return f'Resize(size={self.size})'


class CenterCrop(Transform):
    """Crop the centre (size: int or (h, w)); an image smaller than that is zero-padded first."""

    def __init__(self, size):
        self.size = (size, size) if isinstance(size, numbers.Number) else tuple(size)

    def apply(self, img, params=None):
        return center_crop(img, self.size)

    def __repr__(self):
        return f'CenterCrop(size={self.size})'


class ToTensor(Transform):
    """PIL image -> float32 CHW numpy array in [0, 1]."""

    def apply(self, img, params=None):
        return to_tensor(img)


class Normalize(Transform):
    """(x - mean) / std per channel, in float32, on a CHW array."""

    def __init__(self, mean, std):
        self.mean = list(mean)
        self.std = list(std)

    def apply(self, img, params=None):
        return normalize(img, self.mean, self.std)

    def __repr__(self):
        return f'Normalize(mean={self.mean}, std={self.std})'


class TwoCropsTransform:
    """Take two random crops of one image (one per base transform). params: [params1, params2]."""

    def __init__(self, base_transform1, base_transform2):
        self.base_transform1 = base_transform1
        self.base_transform2 = base_transform2

    def forward(self, x, rng=None):
        rng = _as_rng(rng)
        im1, p1 = _forward_any(self.base_transform1, x, rng)
        im2, p2 = _forward_any(self.base_transform2, x, rng)
        return [im1, im2], [p1, p2]

    def apply(self, x, params):
        return [_apply_any(self.base_transform1, x, params[0]), _apply_any(self.base_transform2, x, params[1])]

    def __call__(self, x, rng=None):
        return self.forward(x, rng)[0]


def build_augmentations(img_size=224, crop_min=0.08, normalize=True):
    """The two asymmetric BYOL views of main_moco.py: returns (augmentation1, augmentation2)."""
    def tail():
        t = [ToTensor()]
        if normalize:
            t.append(Normalize(mean=IMAGENET_MEAN, std=IMAGENET_STD))
        return t

    augmentation1 = [
        RandomResizedCrop(img_size, scale=(crop_min, 1.)),
        RandomApply([ColorJitter(0.4, 0.4, 0.2, 0.1)], p=0.8),  # not strengthened
        RandomGrayscale(p=0.2),
        RandomApply([GaussianBlur([.1, 2.])], p=1.0),
        RandomHorizontalFlip(),
    ] + tail()

    augmentation2 = [
        RandomResizedCrop(img_size, scale=(crop_min, 1.)),
        RandomApply([ColorJitter(0.4, 0.4, 0.2, 0.1)], p=0.8),  # not strengthened
        RandomGrayscale(p=0.2),
        RandomApply([GaussianBlur([.1, 2.])], p=0.1),
        RandomApply([Solarize()], p=0.2),
        RandomHorizontalFlip(),
    ] + tail()

    return Compose(augmentation1), Compose(augmentation2)


def build_lincls_transforms(img_size=224):
    """The linear-classification transforms of main_lincls.py: returns (train_transform, val_transform)."""
    train = Compose([
        RandomResizedCrop(img_size),
        RandomHorizontalFlip(),
        ToTensor(),
        Normalize(mean=IMAGENET_MEAN, std=IMAGENET_STD),
    ])
    val = Compose([
        Resize(int(img_size * 256 / 224)),
        CenterCrop(img_size),
        ToTensor(),
        Normalize(mean=IMAGENET_MEAN, std=IMAGENET_STD),
    ])
    return train, val
