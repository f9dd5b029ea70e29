"""Data augmentation of the official MoCo v3 (moco-v3/moco/loader.py and the transforms of main_moco.py /
main_lincls.py), on torchvision. The reference that paddle_impl/loader.py is tested against.

Randomness follows the official code: torchvision's transforms draw from torch's global generator, the
blur radius from Python's global `random` module.
"""
import random

from PIL import ImageFilter, ImageOps
import torchvision.transforms as transforms

IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]


class TwoCropsTransform:
    """Take two random crops of one image (one per base transform)."""

    def __init__(self, base_transform1, base_transform2):
        self.base_transform1 = base_transform1
        self.base_transform2 = base_transform2

    def __call__(self, x):
        im1 = self.base_transform1(x)
        im2 = self.base_transform2(x)
        return [im1, im2]


class GaussianBlur:
    """PIL Gaussian blur with a radius drawn uniformly from `sigma` (SimCLR, https://arxiv.org/abs/2002.05709)."""

    def __init__(self, sigma=[.1, 2.]):
        self.sigma = sigma

    def __call__(self, x):
        sigma = random.uniform(self.sigma[0], self.sigma[1])
        return x.filter(ImageFilter.GaussianBlur(radius=sigma))


class Solarize:
    """PIL solarize: invert every pixel value at or above 128 (BYOL, https://arxiv.org/abs/2006.07733)."""

    def __call__(self, x):
        return ImageOps.solarize(x)


def build_augmentations(img_size=224, crop_min=0.08, normalize=True):
    """The two asymmetric BYOL views of main_moco.py: returns (augmentation1, augmentation2)."""
    tail = [transforms.ToTensor()]
    if normalize:
        tail.append(transforms.Normalize(mean=IMAGENET_MEAN, std=IMAGENET_STD))

    augmentation1 = [
        transforms.RandomResizedCrop(img_size, scale=(crop_min, 1.)),
        transforms.RandomApply([transforms.ColorJitter(0.4, 0.4, 0.2, 0.1)], p=0.8),  # not strengthened
        transforms.RandomGrayscale(p=0.2),
        transforms.RandomApply([GaussianBlur([.1, 2.])], p=1.0),
        transforms.RandomHorizontalFlip(),
    ] + tail

    augmentation2 = [
        transforms.RandomResizedCrop(img_size, scale=(crop_min, 1.)),
        transforms.RandomApply([transforms.ColorJitter(0.4, 0.4, 0.2, 0.1)], p=0.8),  # not strengthened
        transforms.RandomGrayscale(p=0.2),
        transforms.RandomApply([GaussianBlur([.1, 2.])], p=0.1),
        transforms.RandomApply([Solarize()], p=0.2),
        transforms.RandomHorizontalFlip(),
    ] + list(tail)

    return transforms.Compose(augmentation1), transforms.Compose(augmentation2)


def build_lincls_transforms(img_size=224):
    """The linear-classification transforms of main_lincls.py: returns (train_transform, val_transform)."""
    normalize = transforms.Normalize(mean=IMAGENET_MEAN, std=IMAGENET_STD)
    train = transforms.Compose([
        transforms.RandomResizedCrop(img_size),
        transforms.RandomHorizontalFlip(),
        transforms.ToTensor(),
        normalize,
    ])
    val = transforms.Compose([
        transforms.Resize(int(img_size * 256 / 224)),
        transforms.CenterCrop(img_size),
        transforms.ToTensor(),
        normalize,
    ])
    return train, val
