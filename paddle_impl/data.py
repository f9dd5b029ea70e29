"""Image folders for Paddle: torchvision-style ImageFolder (same classes, same order, same labels) with
clear errors, tolerance of unreadable images, seeded per-sample augmentation, and the digits demo set.

Layout: root/<class>/**/<image>; classes are the sorted sub-folder names, labels their positions.
"""
import json
import os
import shutil
import tempfile
import warnings

import numpy as np
from PIL import Image
import paddle

from .loader import sample_rng

IMG_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.ppm', '.bmp', '.pgm', '.tif', '.tiff', '.webp')

__all__ = ['IMG_EXTENSIONS', 'DataError', 'CorruptImageWarning', 'find_classes', 'make_dataset', 'pil_loader',
           'ImageFolder', 'check_split', 'write_digits_imagefolder']


class DataError(ValueError):
    """A data folder cannot be used as it is; the message names the path and what to change."""


class CorruptImageWarning(UserWarning):
    """An image file could not be decoded and was skipped."""


def find_classes(root):
    """(classes, class_to_idx): the sorted sub-folder names of `root`, each mapped to its position."""
    if not os.path.isdir(root):
        what = 'is not a folder' if os.path.exists(root) else 'does not exist'
        raise DataError(f'data folder {root} {what}: expected {root}/<class>/<image files>')
    classes = sorted(entry.name for entry in os.scandir(root) if entry.is_dir())
    if not classes:
        raise DataError(f'no class folders in {root}: expected one sub-folder per class, '
                        f'{root}/<class>/<image files>')
    return classes, {name: k for k, name in enumerate(classes)}


def make_dataset(root, class_to_idx, extensions=IMG_EXTENSIONS):
    """[(path, label)] for every file under root/<class>/ (recursively, sorted) whose name ends in one of
    `extensions` (case-insensitive); other files are ignored. A class without any image is an error."""
    extensions = tuple(e.lower() for e in extensions)
    samples, empty = [], []
    for name in sorted(class_to_idx):
        folder = os.path.join(root, name)
        found = []
        for dirpath, _, filenames in sorted(os.walk(folder, followlinks=True)):
            for fname in sorted(filenames):
                if fname.lower().endswith(extensions):
                    found.append((os.path.join(dirpath, fname), class_to_idx[name]))
        if not found:
            empty.append(name)
        samples.extend(found)
    if empty:
        shown = ', '.join(os.path.join(root, name) for name in empty[:5]) + (' ...' if len(empty) > 5 else '')
        raise DataError(f'{len(empty)} class folder(s) without any image: {shown}; add images '
                        f'({", ".join(extensions)}) or remove the folder(s)')
    return samples


def pil_loader(path):
    """Open and fully decode an image as RGB (a truncated file fails here, not later)."""
    with open(path, 'rb') as f:
        img = Image.open(f)
        return img.convert('RGB')


class ImageFolder(paddle.io.Dataset):
    """root/<class>/<image> -> (transform(image), label).

    Unreadable images are skipped with a CorruptImageWarning naming the file, counted in `skipped`
    (per process: each DataLoader worker keeps its own count), and replaced by the next readable image
    (with that image's label), so an epoch never stops half-way. If no image can be read, DataError.

    seed: None -> the transform draws from its default source (Python's `random`, which Paddle's
    DataLoader seeds per worker). An int -> the transform is called as transform(img, rng) with
    rng = loader.sample_rng(seed, epoch, index): the augmentation of sample `index` in epoch `epoch` is
    reproducible whatever the worker count, and a resumed run redraws exactly what it would have drawn.
    Call set_epoch(epoch) before iterating each epoch (workers copy the dataset at each epoch start).
    """

    def __init__(self, root, transform=None, target_transform=None, seed=None, loader=pil_loader,
                 extensions=IMG_EXTENSIONS):
        super().__init__()
        self.root = root
        self.transform = transform
        self.target_transform = target_transform
        self.seed = seed
        self.epoch = 0
        self.loader = loader
        self.classes, self.class_to_idx = find_classes(root)
        self.samples = make_dataset(root, self.class_to_idx, extensions)
        self.targets = [label for _, label in self.samples]
        self.skipped = 0
        self._bad = set()

    def set_epoch(self, epoch):
        self.epoch = int(epoch)

    def __len__(self):
        return len(self.samples)

    def _read(self, index):
        """(image, label, index actually read), stepping past unreadable files."""
        n = len(self.samples)
        first_error = None
        for step in range(n):
            k = (index + step) % n
            if k in self._bad:
                continue
            path, label = self.samples[k]
            try:
                return self.loader(path), label, k
            except Exception as err:  # any decoding failure of this one file
                self._bad.add(k)
                self.skipped += 1
                first_error = first_error or f'{path}: {err}'
                warnings.warn(f'skipping unreadable image {path} ({type(err).__name__}: {err}); '
                              f'using the next readable one', CorruptImageWarning, stacklevel=2)
        raise DataError(f'no readable image among the {n} files under {self.root} '
                        f'(first failure: {first_error}); check the files or the folder')

    def __getitem__(self, index):
        if not 0 <= index < len(self.samples):
            raise IndexError(f'index {index} out of range for {len(self.samples)} samples')
        img, label, _ = self._read(index)
        if self.transform is not None:
            if self.seed is None:
                img = self.transform(img)
            else:
                img = self.transform(img, sample_rng(self.seed, self.epoch, index))
        if self.target_transform is not None:
            label = self.target_transform(label)
        return img, label

    def __repr__(self):
        return (f'ImageFolder(root={self.root!r}, {len(self.samples)} images, {len(self.classes)} classes, '
                f'skipped={self.skipped})')


def check_split(train_root, val_root):
    """Raise DataError unless val_root has exactly the class folders of train_root (else the labels of the
    two would not mean the same classes). Returns the class list."""
    train_classes, _ = find_classes(train_root)
    val_classes, _ = find_classes(val_root)
    if train_classes != val_classes:
        missing = sorted(set(train_classes) - set(val_classes))
        extra = sorted(set(val_classes) - set(train_classes))

        def show(names):
            return ', '.join(names[:10]) + (' ...' if len(names) > 10 else '') if names else 'none'
        raise DataError(f'class folders of {val_root} differ from {train_root}: missing in val: {show(missing)}; '
                        f'only in val: {show(extra)}; labels are positions in the sorted class list, so both '
                        f'splits need the same class folders')
    return train_classes


_DIGITS_STAMP = 'digits.json'


def write_digits_imagefolder(out_dir, img_size=32, val_fraction=0.2, seed=0):
    """Write scikit-learn's digits (1797 grey 8x8 images, values 0..16, 10 classes) as RGB PNGs of
    img_size x img_size (values scaled to 0..255, bilinear upsampling, grey repeated in R, G and B) into
    out_dir/train/<digit>/<NNNN>.png and out_dir/val/<digit>/<NNNN>.png, NNNN the index in load_digits.

    The split is stratified and deterministic: per class, a permutation from numpy's default_rng(seed)
    puts round(count * val_fraction) images in val. The folder is written under a temporary name and
    renamed into place; a folder already written with the same settings is reused as it is.
    Returns (train_root, val_root).
    """
    if not 0 < val_fraction < 1:
        raise DataError(f'val_fraction must be in (0, 1), got {val_fraction}')
    if int(img_size) < 1:
        raise DataError(f'img_size must be positive, got {img_size}')
    out_dir = os.path.abspath(out_dir)
    train_root, val_root = os.path.join(out_dir, 'train'), os.path.join(out_dir, 'val')
    settings = {'source': 'sklearn.datasets.load_digits', 'img_size': int(img_size),
                'val_fraction': float(val_fraction), 'seed': int(seed)}

    if os.path.isdir(out_dir) and os.listdir(out_dir):
        try:
            with open(os.path.join(out_dir, _DIGITS_STAMP)) as f:
                stamp = json.load(f)
        except (OSError, ValueError):
            stamp = None
        if stamp is not None and stamp.get('settings') == settings:
            return train_root, val_root
        raise DataError(f'{out_dir} is not empty and was not written by write_digits_imagefolder with '
                        f'these settings ({settings}); choose another folder or remove it')

    from sklearn.datasets import load_digits  # only this helper needs scikit-learn
    digits = load_digits()
    images = np.rint(digits.images * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)
    labels = digits.target.astype(int)

    rng = np.random.default_rng(seed)
    split = {}
    for c in sorted(set(labels.tolist())):
        idx = rng.permutation(np.flatnonzero(labels == c))
        n_val = int(round(len(idx) * val_fraction))
        for k in idx[:n_val]:
            split[int(k)] = 'val'
        for k in idx[n_val:]:
            split[int(k)] = 'train'

    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix='.digits-', dir=parent)
    try:
        for k in range(len(images)):
            folder = os.path.join(tmp, split[k], str(labels[k]))
            os.makedirs(folder, exist_ok=True)
            img = Image.fromarray(images[k], 'L')
            if img.size != (img_size, img_size):
                img = img.resize((int(img_size), int(img_size)), Image.BILINEAR)
            img.convert('RGB').save(os.path.join(folder, f'{k:04d}.png'))
        counts = {'train': sum(v == 'train' for v in split.values()),
                  'val': sum(v == 'val' for v in split.values())}
        with open(os.path.join(tmp, _DIGITS_STAMP), 'w') as f:
            json.dump({'settings': settings, 'counts': counts}, f, indent=1)
        if os.path.isdir(out_dir):
            os.rmdir(out_dir)  # empty (checked above)
        os.rename(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return train_root, val_root
