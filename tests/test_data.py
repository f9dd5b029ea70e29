"""paddle_impl/data.py: ImageFolder (against torchvision's), its errors, unreadable images, seeding, and the
digits writer (against scikit-learn's load_digits itself)."""
import io
import os
import random

import numpy as np
import paddle
import pytest
from PIL import Image

from paddle_impl import loader as P
from paddle_impl.data import (CorruptImageWarning, DataError, ImageFolder, check_split,
                              write_digits_imagefolder)

COLOURS = {  # file -> solid colour, to tell which file a sample came from
    'cat/a.png': (250, 10, 10), 'cat/b.JPG': (10, 250, 10), 'cat/sub/c.png': (10, 10, 250),
    'dog/d.jpeg': (250, 250, 10), 'dog/e.bmp': (10, 250, 250),
}


def _save(path, img, fmt=None):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    img.save(path, format=fmt)


@pytest.fixture
def folder(tmp_path):
    root = tmp_path / 'train'
    for rel, colour in COLOURS.items():
        fmt = {'.png': 'PNG', '.jpg': 'JPEG', '.jpeg': 'JPEG', '.bmp': 'BMP'}[os.path.splitext(rel)[1].lower()]
        _save(str(root / rel), Image.new('RGB', (20, 14), colour), fmt)
    (root / 'cat' / 'notes.txt').write_text('not an image')
    (root / 'cat' / 'broken.png').write_bytes(b'\x89PNG\r\n\x1a\n' + os.urandom(200))
    noisy = Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    buf = io.BytesIO()
    noisy.save(buf, format='PNG')
    (root / 'dog' / 'trunc.png').write_bytes(buf.getvalue()[: len(buf.getvalue()) * 6 // 10])
    for bad in ('cat/broken.png', 'dog/trunc.png'):  # make sure PIL really fails on them
        with pytest.raises(Exception):
            Image.open(root / bad).convert('RGB')
    return root


def _which(img):
    rgb = np.asarray(img, dtype=np.float64).reshape(-1, 3).mean(0)
    return min(COLOURS, key=lambda k: np.abs(np.array(COLOURS[k]) - rgb).sum())


def test_samples_and_classes_match_torchvision(folder):
    from torchvision.datasets import ImageFolder as TorchImageFolder
    ours, ref = ImageFolder(str(folder)), TorchImageFolder(str(folder))
    assert ours.classes == ref.classes == ['cat', 'dog']
    assert ours.class_to_idx == ref.class_to_idx
    assert ours.samples == ref.samples
    assert ours.targets == ref.targets
    assert not any(p.endswith('.txt') for p, _ in ours.samples)
    assert len(ours) == 7


def test_unreadable_images_are_skipped_with_a_warning(folder):
    ds = ImageFolder(str(folder))
    names = [os.path.relpath(p, folder) for p, _ in ds.samples]
    for k, name in enumerate(names):
        if name in COLOURS:
            img, label = ds[k]
            assert _which(img) == name and label == ds.class_to_idx[name.split('/')[0]]
    assert ds.skipped == 0
    k = names.index('cat/broken.png')
    with pytest.warns(CorruptImageWarning, match='broken.png'):
        img, label = ds[k]
    assert (_which(img), label) == (names[k + 1], 0)  # the next readable file, with its own label
    assert ds.skipped == 1
    ds[k]  # known bad: no second warning, no second count
    assert ds.skipped == 1
    k = names.index('dog/trunc.png')
    assert k == len(ds) - 1
    with pytest.warns(CorruptImageWarning, match='trunc.png'):
        img, label = ds[k]
    assert (_which(img), label) == (names[0], 0)  # wraps around to the first
    assert ds.skipped == 2


def test_an_epoch_through_the_paddle_dataloader_survives_bad_files(folder):
    _, val = P.build_lincls_transforms(img_size=16)
    ds = ImageFolder(str(folder), transform=val)
    loader = paddle.io.DataLoader(ds, batch_size=3, shuffle=False, num_workers=0)
    with pytest.warns(CorruptImageWarning):
        batches = list(loader)
    assert [tuple(x.shape) for x, _ in batches] == [(3, 3, 16, 16), (3, 3, 16, 16), (1, 3, 16, 16)]
    labels = np.concatenate([y.numpy().reshape(-1) for _, y in batches])
    assert labels.tolist() == [0, 0, 0, 0, 1, 1, 0]  # broken.png -> c.png (cat), trunc.png -> a.png (cat)
    assert ds.skipped == 2


def test_every_image_bad_is_an_error(tmp_path):
    for name in ('a', 'b'):
        (tmp_path / name).mkdir()
        (tmp_path / name / 'x.jpg').write_bytes(b'garbage')
    ds = ImageFolder(str(tmp_path))
    with pytest.warns(CorruptImageWarning), pytest.raises(DataError, match='no readable image'):
        ds[0]


def test_folder_errors_name_the_problem(tmp_path):
    with pytest.raises(DataError, match='does not exist') as e:
        ImageFolder(str(tmp_path / 'nowhere'))
    assert 'nowhere' in str(e.value)
    (tmp_path / 'file.png').write_bytes(b'')
    with pytest.raises(DataError, match='is not a folder'):
        ImageFolder(str(tmp_path / 'file.png'))
    with pytest.raises(DataError, match='no class folders'):
        ImageFolder(str(tmp_path))  # only a file in it
    _save(str(tmp_path / 'full' / 'x.png'), Image.new('RGB', (4, 4)))
    (tmp_path / 'zebra').mkdir()
    (tmp_path / 'zebra' / 'readme.txt').write_text('')
    with pytest.raises(DataError, match='zebra') as e:
        ImageFolder(str(tmp_path))
    assert 'full' not in str(e.value).replace(str(tmp_path), '')
    assert issubclass(DataError, ValueError)


def test_check_split(tmp_path):
    for split, classes in (('train', 'abc'), ('val', 'abc'), ('val2', 'abd')):
        for c in classes:
            _save(str(tmp_path / split / c / 'x.png'), Image.new('RGB', (4, 4)))
    assert check_split(str(tmp_path / 'train'), str(tmp_path / 'val')) == ['a', 'b', 'c']
    with pytest.raises(DataError, match=r'missing in val: c; only in val: d'):
        check_split(str(tmp_path / 'train'), str(tmp_path / 'val2'))
    with pytest.raises(DataError, match='does not exist'):
        check_split(str(tmp_path / 'train'), str(tmp_path / 'nope'))


def test_seeded_augmentation_is_reproducible(folder):
    two = P.TwoCropsTransform(*P.build_augmentations(img_size=12))
    ds = ImageFolder(str(folder), transform=two, seed=0)
    (a1, a2), label = ds[3]
    assert a1.shape == (3, 12, 12) and label == 0
    (b1, b2), _ = ds[3]
    assert np.array_equal(a1, b1) and np.array_equal(a2, b2)
    assert not np.array_equal(a1, a2)
    resumed = ImageFolder(str(folder), transform=two, seed=0)  # e.g. after a restart
    assert np.array_equal(resumed[3][0][0], a1)
    ds.set_epoch(1)
    assert not np.array_equal(ds[3][0][0], a1)
    assert not np.array_equal(ImageFolder(str(folder), transform=two, seed=1)[3][0][0], a1)
    unseeded = ImageFolder(str(folder), transform=two)
    random.seed(0)
    c1 = unseeded[3][0][0]
    random.seed(0)
    assert np.array_equal(unseeded[3][0][0], c1)


# ------------------------------------------------------------------------------------------------ digits

@pytest.fixture(scope='module')
def digits():
    from sklearn.datasets import load_digits
    return load_digits()


@pytest.fixture(scope='module')
def digits32(tmp_path_factory, digits):
    out = tmp_path_factory.mktemp('digits') / 'd32'
    return out, write_digits_imagefolder(str(out), img_size=32, val_fraction=0.2, seed=0)


def _index_of(path):
    return int(os.path.splitext(os.path.basename(path))[0])


def test_digits_layout_and_split(digits32, digits):
    out, (train_root, val_root) = digits32
    assert check_split(train_root, val_root) == [str(d) for d in range(10)]
    train, val = ImageFolder(train_root), ImageFolder(val_root)
    idx_train = [_index_of(p) for p, _ in train.samples]
    idx_val = [_index_of(p) for p, _ in val.samples]
    assert sorted(idx_train + idx_val) == list(range(len(digits.target)))  # each image once
    for ds, idx in ((train, idx_train), (val, idx_val)):
        assert [int(ds.classes[t]) for t in ds.targets] == digits.target[idx].tolist()  # right folder
    counts = np.bincount(digits.target)
    assert np.bincount(digits.target[idx_val]).tolist() == [int(round(c * 0.2)) for c in counts]
    img, label = val[0]
    arr = np.asarray(img)
    assert img.size == (32, 32) and arr.shape == (32, 32, 3)
    assert (arr[..., 0] == arr[..., 1]).all() and (arr[..., 0] == arr[..., 2]).all()
    # upsampled, still the same digit: mean brightness follows the 8x8 source (values 0..16 -> 0..255)
    src = digits.images[idx_val[0]] * 255 / 16
    assert abs(arr[..., 0].mean() - src.mean()) < 12


def test_digits_pixels_at_native_size(tmp_path, digits):
    train_root, val_root = write_digits_imagefolder(str(tmp_path / 'd8'), img_size=8, val_fraction=0.5, seed=3)
    for root in (train_root, val_root):
        path = ImageFolder(root).samples[-1][0]
        arr = np.asarray(Image.open(path))
        want = np.rint(digits.images[_index_of(path)] * 255 / 16)
        assert np.array_equal(arr[..., 1], want) and arr.shape == (8, 8, 3)


def test_digits_split_is_deterministic_and_reused(digits32, tmp_path):
    out, (train_root, _) = digits32
    mtime = os.path.getmtime(os.path.join(train_root, '0'))
    assert write_digits_imagefolder(str(out), img_size=32, val_fraction=0.2, seed=0) == digits32[1]
    assert os.path.getmtime(os.path.join(train_root, '0')) == mtime  # reused, not rewritten
    with pytest.raises(DataError, match='not empty'):
        write_digits_imagefolder(str(out), img_size=32, val_fraction=0.2, seed=1)
    other, _ = write_digits_imagefolder(str(tmp_path / 'again'), img_size=8, seed=0)
    again = sorted(_index_of(p) for p, _ in ImageFolder(other).samples)
    assert again == sorted(_index_of(p) for p, _ in ImageFolder(train_root).samples)
    with pytest.raises(DataError, match='val_fraction'):
        write_digits_imagefolder(str(tmp_path / 'x'), val_fraction=0)
    assert not os.path.exists(tmp_path / 'x')
    assert not [n for n in os.listdir(tmp_path) if n.startswith('.digits-')]  # no temporary left behind
