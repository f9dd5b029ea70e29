"""The augmentation and losses of the DeiT fine-tuning recipe (used by MoCo v3 for end-to-end fine-tuning),
written for Paddle from their definitions (DeiT main.py, timm 0.3-1.0's data/ and loss/ modules):

- RandAugment 'rand-m9-mstd0.5-inc1' on PIL images: 2 ops drawn uniformly with replacement from timm's
  "increasing" set of 15, each applied with probability 0.5, magnitude ~ N(9, 0.5) clipped to [0, 10];
  op semantics, level->argument maps, fill colour (ImageNet mean) and bicubic resampling as timm's.
- RandomErasing (Zhong et al.) on the normalised CHW array: probability 0.25, area 2%..1/3, log-uniform aspect
  in [0.3, 1/0.3], 10 attempts, the box filled with per-pixel N(0, 1) noise ('pixel' mode).
- Mixup / CutMix per batch: with probability `prob`, CutMix (Beta(1, 1)) with probability `switch_prob`
  else Mixup (Beta(0.8, 0.8)); mixed = lam * x + (1 - lam) * x.flip(0), or the box of x.flip(0) pasted in
  with lam corrected to the box's true area; targets mixed alike from label-smoothed one-hots.
- Label-smoothing cross-entropy and soft-target cross-entropy.
- build_finetune_transforms: DeiT's train transform (RandomResizedCrop bicubic, flip, RandAugment, ToTensor,
  Normalize, RandomErasing) and eval transform (Resize(256/224 * size) bicubic, CenterCrop).

Randomness follows paddle_impl/loader.py: every transform draws only from the `rng` it is given (a
`random.Random`, or None for Python's global one), so an image's augmentation is a function of
(seed, epoch, index) when ImageFolder gets a seed. The draws are those of timm in distribution, not draw for
draw (timm mixes Python's `random` and numpy's global generator). Mixup draws from its own numpy Generator.

Differences from timm, on purpose: no 'Cutout' ops or weighted op choice ('w' in the config string); only
RandomErasing's 'pixel' mode; Mixup's 'batch' mode only (not 'pair' / 'elem'); no cutmix_minmax.
"""
import math
import random

import numpy as np
from PIL import Image, ImageEnhance, ImageOps

from . import loader as L

__all__ = ['RAND_INCREASING_OPS', 'parse_rand_augment', 'level_args', 'apply_op', 'RandAugment', 'RandomErasing',
           'Mixup', 'rand_bbox', 'cutmix_bbox_and_lam', 'one_hot', 'mixup_target', 'label_smoothing_cross_entropy',
           'soft_target_cross_entropy', 'build_finetune_transforms']

MAX_LEVEL = 10.
FILL = tuple(int(round(255 * m)) for m in L.IMAGENET_MEAN)  # (124, 116, 104), timm's img_mean hparam
TRANSLATE_PCT = 0.45

# timm's _RAND_INCREASING_TRANSFORMS (the 'inc1' set), in its order
RAND_INCREASING_OPS = (
    'AutoContrast', 'Equalize', 'Invert', 'Rotate', 'PosterizeIncreasing', 'SolarizeIncreasing', 'SolarizeAdd',
    'ColorIncreasing', 'ContrastIncreasing', 'BrightnessIncreasing', 'SharpnessIncreasing', 'ShearX', 'ShearY',
    'TranslateXRel', 'TranslateYRel',
)
# timm's _RAND_TRANSFORMS (inc0)
RAND_OPS = (
    'AutoContrast', 'Equalize', 'Invert', 'Rotate', 'Posterize', 'Solarize', 'SolarizeAdd', 'Color', 'Contrast',
    'Brightness', 'Sharpness', 'ShearX', 'ShearY', 'TranslateXRel', 'TranslateYRel',
)


# ------------------------------------------------------------------------------------------ random helpers

def _rng(rng):
    return L._as_rng(rng)


def _gauss(rng, mu, sigma):
    if hasattr(rng, 'gauss'):
        return rng.gauss(mu, sigma)
    u1, u2 = max(rng.random(), 1e-300), rng.random()  # Box-Muller for generators without gauss
    return mu + sigma * math.sqrt(-2.0 * math.log(u1)) * math.cos(2.0 * math.pi * u2)


def _negate(rng, v):
    """timm's _randomly_negate: -v with probability 1/2."""
    return -v if rng.random() > 0.5 else v


# ---------------------------------------------------------------------------------------------- RandAugment

def level_args(name, magnitude, rng=None, negate=None):
    """timm's level -> argument map of op ``name`` at ``magnitude`` (0..10). Signed ops draw their sign from
    ``rng`` unless ``negate`` (bool) is given. Returns the tuple of arguments of apply_op."""
    m = float(magnitude)

    def sign(v):
        if negate is None:
            return _negate(_rng(rng), v)
        return -v if negate else v

    if name in ('AutoContrast', 'Equalize', 'Invert'):
        return ()
    if name == 'Rotate':
        return (sign(m / MAX_LEVEL * 30.),)
    if name in ('ShearX', 'ShearY'):
        return (sign(m / MAX_LEVEL * 0.3),)
    if name in ('TranslateXRel', 'TranslateYRel'):
        return (sign(m / MAX_LEVEL * TRANSLATE_PCT),)
    if name == 'Posterize':
        return (int(m / MAX_LEVEL * 4),)
    if name == 'PosterizeIncreasing':
        return (4 - int(m / MAX_LEVEL * 4),)
    if name == 'Solarize':
        return (int(m / MAX_LEVEL * 256),)
    if name == 'SolarizeIncreasing':
        return (256 - int(m / MAX_LEVEL * 256),)
    if name == 'SolarizeAdd':
        return (int(m / MAX_LEVEL * 110),)
    if name in ('Color', 'Contrast', 'Brightness', 'Sharpness'):
        return (m / MAX_LEVEL * 1.8 + 0.1,)
    if name in ('ColorIncreasing', 'ContrastIncreasing', 'BrightnessIncreasing', 'SharpnessIncreasing'):
        return (1.0 + sign(m / MAX_LEVEL * .9),)
    raise ValueError(f'unknown RandAugment op {name!r}')


def _affine(img, matrix, fill, resample):
    return img.transform(img.size, Image.AFFINE, matrix, resample=resample, fillcolor=fill)


def _solarize_add(img, add, thresh=128):
    lut = [min(255, i + add) if i < thresh else i for i in range(256)]
    if img.mode in ('L', 'RGB'):
        if img.mode == 'RGB' and len(lut) == 256:
            lut = lut + lut + lut
        return img.point(lut)
    return img


def apply_op(img, name, args, fill=FILL, resample=Image.BICUBIC):
    """Apply op ``name`` with the arguments ``level_args`` gave (timm's op functions, on PIL)."""
    if img.mode == 'L' and isinstance(fill, tuple):
        fill = fill[0]
    if name == 'AutoContrast':
        return ImageOps.autocontrast(img)
    if name == 'Equalize':
        return ImageOps.equalize(img)
    if name == 'Invert':
        return ImageOps.invert(img)
    if name == 'Rotate':
        return img.rotate(args[0], resample=resample, fillcolor=fill)
    if name in ('Posterize', 'PosterizeIncreasing'):
        bits = args[0]
        if bits >= 8:
            return img
        if bits <= 0:  # keep 0 bits: black, as PIL < 10 computed it (Pillow >= 10 refuses bits = 0)
            return img.point([0] * 256 * len(img.getbands()))
        return ImageOps.posterize(img, bits)
    if name in ('Solarize', 'SolarizeIncreasing'):
        return ImageOps.solarize(img, args[0])
    if name == 'SolarizeAdd':
        return _solarize_add(img, args[0])
    if name in ('Color', 'ColorIncreasing'):
        return ImageEnhance.Color(img).enhance(args[0])
    if name in ('Contrast', 'ContrastIncreasing'):
        return ImageEnhance.Contrast(img).enhance(args[0])
    if name in ('Brightness', 'BrightnessIncreasing'):
        return ImageEnhance.Brightness(img).enhance(args[0])
    if name in ('Sharpness', 'SharpnessIncreasing'):
        return ImageEnhance.Sharpness(img).enhance(args[0])
    if name == 'ShearX':
        return _affine(img, (1, args[0], 0, 0, 1, 0), fill, resample)
    if name == 'ShearY':
        return _affine(img, (1, 0, 0, args[0], 1, 0), fill, resample)
    if name == 'TranslateXRel':
        return _affine(img, (1, 0, args[0] * img.size[0], 0, 1, 0), fill, resample)
    if name == 'TranslateYRel':
        return _affine(img, (1, 0, 0, 0, 1, args[0] * img.size[1]), fill, resample)
    raise ValueError(f'unknown RandAugment op {name!r}')


def parse_rand_augment(config):
    """'rand-m9-mstd0.5-inc1' -> dict(num_layers=2, magnitude=9, magnitude_std=0.5, magnitude_max=10,
    increasing=True, prob=0.5). Keys as timm: m (magnitude), n (ops per image), mstd, mmax, inc, p."""
    parts = str(config).split('-')
    if parts[0] != 'rand':
        raise ValueError(f"auto-augment policy {config!r}: only RandAugment ('rand-...') is supported")
    out = dict(num_layers=2, magnitude=10., magnitude_std=0., magnitude_max=MAX_LEVEL, increasing=False, prob=0.5)
    for c in parts[1:]:
        for key, field, conv in (('mstd', 'magnitude_std', float), ('mmax', 'magnitude_max', float),
                                 ('inc', 'increasing', lambda v: bool(int(v))), ('m', 'magnitude', float),
                                 ('n', 'num_layers', int), ('p', 'prob', float)):
            if c.startswith(key):
                try:
                    out[field] = conv(c[len(key):])
                except ValueError:
                    raise ValueError(f'auto-augment policy {config!r}: bad value in {c!r}') from None
                break
        else:
            raise ValueError(f"auto-augment policy {config!r}: unknown part {c!r} (known: m, n, mstd, mmax, inc, p)")
    return out


class RandAugment(L.Transform):
    """timm's RandAugment on a PIL image. params: a list (one per layer) of None (op skipped by its
    probability) or (op name, argument tuple)."""

    def __init__(self, num_layers=2, magnitude=9., magnitude_std=0.5, magnitude_max=MAX_LEVEL, increasing=True,
                 prob=0.5, fill=FILL, resample=Image.BICUBIC):
        self.num_layers = int(num_layers)
        self.magnitude = float(magnitude)
        self.magnitude_std = float(magnitude_std)
        self.magnitude_max = float(magnitude_max)
        self.ops = RAND_INCREASING_OPS if increasing else RAND_OPS
        self.prob = float(prob)
        self.fill = fill
        self.resample = resample

    @classmethod
    def from_config(cls, config, **kw):
        return cls(**parse_rand_augment(config), **kw)

    def draw_magnitude(self, rng):
        m = self.magnitude
        if self.magnitude_std == float('inf'):
            m = rng.uniform(0, m)
        elif self.magnitude_std > 0:
            m = _gauss(rng, m, self.magnitude_std)
        return max(0., min(m, self.magnitude_max))

    def get_params(self, rng, img=None):
        rng = _rng(rng)
        names = [self.ops[rng.randint(0, len(self.ops) - 1)] for _ in range(self.num_layers)]
        params = []
        for name in names:
            if self.prob < 1.0 and rng.random() > self.prob:
                params.append(None)
                continue
            params.append((name, level_args(name, self.draw_magnitude(rng), rng)))
        return params

    def apply(self, img, params):
        for p in params:
            if p is not None:
                img = apply_op(img, p[0], p[1], self.fill, self.resample)
        return img

    def __repr__(self):
        return (f'RandAugment(n={self.num_layers}, m={self.magnitude}, mstd={self.magnitude_std}, '
                f'ops={len(self.ops)}, p={self.prob})')


# --------------------------------------------------------------------------------------------- RandomErasing

class RandomErasing(L.Transform):
    """Random erasing on a normalised CHW float array ('pixel' mode: per-pixel N(0, 1) noise).
    params: None (not erased) or a list of (top, left, h, w, noise_seed) boxes."""

    def __init__(self, probability=0.25, min_area=0.02, max_area=1 / 3, min_aspect=0.3, max_aspect=None,
                 mode='pixel', min_count=1, max_count=None):
        if mode != 'pixel':
            raise ValueError(f"RandomErasing mode {mode!r}: only 'pixel' is supported")
        self.probability = float(probability)
        self.min_area, self.max_area = float(min_area), float(max_area)
        max_aspect = max_aspect or 1 / min_aspect
        self.log_aspect_ratio = (math.log(min_aspect), math.log(max_aspect))
        self.min_count = int(min_count)
        self.max_count = int(max_count or min_count)

    def get_params(self, rng, img):
        rng = _rng(rng)
        if rng.random() > self.probability:
            return None
        _, img_h, img_w = np.shape(img)
        area = img_h * img_w
        count = self.min_count if self.min_count == self.max_count else rng.randint(self.min_count, self.max_count)
        boxes = []
        for _ in range(count):
            for _attempt in range(10):
                target_area = rng.uniform(self.min_area, self.max_area) * area / count
                aspect_ratio = math.exp(rng.uniform(*self.log_aspect_ratio))
                h = int(round(math.sqrt(target_area * aspect_ratio)))
                w = int(round(math.sqrt(target_area / aspect_ratio)))
                if w < img_w and h < img_h:
                    top = rng.randint(0, img_h - h)
                    left = rng.randint(0, img_w - w)
                    boxes.append((top, left, h, w, rng.randint(0, 2 ** 62)))
                    break
        return boxes

    def apply(self, img, params):
        if not params:
            return img
        out = np.array(img, copy=True)
        for top, left, h, w, seed in params:
            noise = np.random.default_rng(seed).standard_normal((out.shape[0], h, w))
            out[:, top:top + h, left:left + w] = noise.astype(out.dtype)
        return out

    def __repr__(self):
        return f'RandomErasing(p={self.probability}, area=({self.min_area}, {self.max_area:.4g}))'


# --------------------------------------------------------------------------------------------- Mixup / CutMix

def rand_bbox(img_shape, lam, cy, cx):
    """The CutMix box (yl, yh, xl, xh) of sides int(H * sqrt(1 - lam)) x int(W * sqrt(1 - lam)) centred at
    (cy, cx), clipped to the image (timm 1.0; timm 0.3's box lost a row/column for odd sides)."""
    img_h, img_w = int(img_shape[-2]), int(img_shape[-1])
    ratio = math.sqrt(1 - lam)
    cut_h, cut_w = int(img_h * ratio), int(img_w * ratio)
    yl = int(np.clip(cy - cut_h // 2, 0, img_h))
    yh = int(np.clip(cy + (cut_h + 1) // 2, 0, img_h))
    xl = int(np.clip(cx - cut_w // 2, 0, img_w))
    xh = int(np.clip(cx + (cut_w + 1) // 2, 0, img_w))
    return yl, yh, xl, xh


def cutmix_bbox_and_lam(img_shape, lam, gen, correct_lam=True):
    """A random box for ``lam`` (centre uniform over the image, from numpy Generator ``gen``) and lam corrected
    to 1 - box area / image area (the clipped box's true share)."""
    img_h, img_w = int(img_shape[-2]), int(img_shape[-1])
    cy, cx = int(gen.integers(0, img_h)), int(gen.integers(0, img_w))
    yl, yh, xl, xh = rand_bbox(img_shape, lam, cy, cx)
    if correct_lam:
        lam = 1. - (yh - yl) * (xh - xl) / float(img_h * img_w)
    return (yl, yh, xl, xh), lam


def one_hot(target, num_classes, on_value=1., off_value=0.):
    import paddle
    t = paddle.nn.functional.one_hot(target.reshape([-1]).astype('int64'), num_classes)
    return t * (on_value - off_value) + off_value


def mixup_target(target, num_classes, lam=1., smoothing=0.0):
    """lam * smoothed_one_hot(target) + (1 - lam) * smoothed_one_hot(target.flip(0)); smoothing puts
    smoothing / C on every class and 1 - smoothing + smoothing / C on the true one."""
    import paddle
    off_value = smoothing / num_classes
    on_value = 1. - smoothing + off_value
    y1 = one_hot(target, num_classes, on_value, off_value)
    y2 = one_hot(paddle.flip(target.reshape([-1]), [0]), num_classes, on_value, off_value)
    return y1 * lam + y2 * (1. - lam)


class Mixup:
    """Per-batch Mixup / CutMix with label smoothing (DeiT: mixup 0.8, cutmix 1.0, prob 1.0, switch 0.5,
    smoothing 0.1). Call with a Paddle batch (N even) and int labels -> (mixed batch, soft targets)."""

    def __init__(self, mixup_alpha=0.8, cutmix_alpha=1.0, prob=1.0, switch_prob=0.5, label_smoothing=0.1,
                 num_classes=1000, correct_lam=True, seed=None):
        self.mixup_alpha = float(mixup_alpha)
        self.cutmix_alpha = float(cutmix_alpha)
        self.mix_prob = float(prob)
        self.switch_prob = float(switch_prob)
        self.label_smoothing = float(label_smoothing)
        self.num_classes = int(num_classes)
        self.correct_lam = correct_lam
        self.gen = np.random.default_rng(seed)
        self.last = None  # (lam, use_cutmix, box) of the last call

    @property
    def active(self):
        return self.mixup_alpha > 0 or self.cutmix_alpha > 0

    def draw(self):
        """(lam, use_cutmix) of one batch."""
        lam, use_cutmix = 1., False
        if self.active and self.gen.random() < self.mix_prob:
            if self.mixup_alpha > 0 and self.cutmix_alpha > 0:
                use_cutmix = bool(self.gen.random() < self.switch_prob)
                alpha = self.cutmix_alpha if use_cutmix else self.mixup_alpha
                lam = float(self.gen.beta(alpha, alpha))
            elif self.mixup_alpha > 0:
                lam = float(self.gen.beta(self.mixup_alpha, self.mixup_alpha))
            else:
                use_cutmix = True
                lam = float(self.gen.beta(self.cutmix_alpha, self.cutmix_alpha))
        return lam, use_cutmix

    def mix(self, x, lam, use_cutmix):
        """(mixed x, lam as used, box or None) for given draws."""
        import paddle
        if lam == 1.:
            return x, 1., None
        flipped = paddle.flip(x, [0])
        if use_cutmix:
            box, lam = cutmix_bbox_and_lam(x.shape, lam, self.gen, self.correct_lam)
            yl, yh, xl, xh = box
            out = x.clone()
            if yh > yl and xh > xl:
                out[:, :, yl:yh, xl:xh] = flipped[:, :, yl:yh, xl:xh]
            return out, lam, box
        return x * lam + flipped * (1. - lam), lam, None

    def __call__(self, x, target):
        if x.shape[0] % 2 != 0:
            raise ValueError(f'Mixup needs an even batch size, got {x.shape[0]}')
        lam, use_cutmix = self.draw()
        x, lam, box = self.mix(x, lam, use_cutmix)
        self.last = (lam, use_cutmix, box)
        return x, mixup_target(target, self.num_classes, lam, self.label_smoothing).astype(x.dtype)

    def state_dict(self):
        return {'bit_generator': self.gen.bit_generator.state}

    def set_state_dict(self, state):
        self.gen.bit_generator.state = state['bit_generator']


# ------------------------------------------------------------------------------------------------- losses

def label_smoothing_cross_entropy(logits, target, smoothing=0.1):
    """mean over the batch of (1 - s) * NLL(target) + s * mean_c(-log softmax(x)_c)."""
    import paddle
    import paddle.nn.functional as F
    logprobs = F.log_softmax(logits, axis=-1)
    nll = -paddle.take_along_axis(logprobs, target.reshape([-1, 1]).astype('int64'), axis=-1).squeeze(-1)
    smooth = -logprobs.mean(axis=-1)
    return ((1. - smoothing) * nll + smoothing * smooth).mean()


def soft_target_cross_entropy(logits, target):
    """mean over the batch of sum_c -target_c * log softmax(x)_c."""
    import paddle.nn.functional as F
    return (-target * F.log_softmax(logits, axis=-1)).sum(axis=-1).mean()


# --------------------------------------------------------------------------------------------- transforms

def build_finetune_transforms(img_size=224, auto_augment='rand-m9-mstd0.5-inc1', reprob=0.25, color_jitter=0.4,
                              remode='pixel', recount=1, interpolation=Image.BICUBIC):
    """DeiT's (train, eval) transforms. auto_augment None/'' /'none' disables RandAugment, and then the
    colour jitter (brightness, contrast, saturation = color_jitter) is used instead, as timm does."""
    train = [L.RandomResizedCrop(img_size, scale=(0.08, 1.0), interpolation=interpolation),
             L.RandomHorizontalFlip(0.5)]
    if auto_augment and str(auto_augment).lower() != 'none':
        train.append(RandAugment.from_config(auto_augment, resample=interpolation))
    elif color_jitter:
        train.append(L.ColorJitter(color_jitter, color_jitter, color_jitter))
    train += [L.ToTensor(), L.Normalize(L.IMAGENET_MEAN, L.IMAGENET_STD)]
    if reprob > 0:
        train.append(RandomErasing(reprob, mode=remode, max_count=recount))
    val = L.Compose([L.Resize(int((256 / 224) * img_size), interpolation), L.CenterCrop(img_size),
                     L.ToTensor(), L.Normalize(L.IMAGENET_MEAN, L.IMAGENET_STD)])
    return L.Compose(train), val


def _self_check():  # pragma: no cover - quick manual look: python -m paddle_impl.finetune_aug
    img = Image.new('RGB', (32, 32), (200, 30, 60))
    t, v = build_finetune_transforms(32)
    out, params = t.forward(img, random.Random(0))
    print(t, params, out.shape, v(img).shape)


if __name__ == '__main__':  # pragma: no cover
    _self_check()
