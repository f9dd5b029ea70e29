"""The kNN monitor (paddle_impl.knn): the vote rule on hand-made features whose answer is worked out by hand,
the stratified train subset, and knn_monitor end to end on tiny image folders (a colour-mean encoder whose
accuracy is known exactly, and a small ViT of the product)."""
import os

import numpy as np
import paddle
import pytest
from PIL import Image

from paddle_impl import knn, models
from paddle_impl.data import DataError


# ------------------------------------------------------------------ vote rule on hand-made features

def test_cosine_not_euclidean():
    train = np.array([[1, 0], [0.9, 0.1], [0, 1], [0.1, 0.9], [0.2, 1.0]])
    labels = np.array([0, 0, 1, 1, 1])
    test = np.array([[10, 1], [0, 5]])  # far from every train vector in L2, close in angle
    for T in (None, 0.07):
        assert knn.knn_predict(train, labels, test, k=2, T=T).tolist() == [0, 1]
        assert knn.knn_accuracy(train, labels, test, np.array([0, 1]), k=3, T=T) == 1.0


def _angle_vectors(degrees):
    a = np.deg2rad(np.asarray(degrees, dtype=np.float64))
    return np.stack([np.cos(a), np.sin(a)], axis=1)


def test_weighted_vote_differs_from_majority():
    # test vector at 0 degrees; one class-0 neighbour at 8 degrees (cos 0.990), two class-1 neighbours at
    # 37 degrees (cos 0.799): majority 2 : 1 for class 1; weighted exp(0.990/0.07) = 1.4e6 against
    # 2 exp(0.799/0.07) = 1.8e5 for class 0
    train = _angle_vectors([8, 37, -37, 120])
    labels = np.array([0, 1, 1, 0])
    test = _angle_vectors([0])
    assert knn.knn_predict(train, labels, test, k=3, T=None).tolist() == [1]
    assert knn.knn_predict(train, labels, test, k=3, T=0.07).tolist() == [0]
    # a very soft temperature turns the weights nearly equal: the majority again
    assert knn.knn_predict(train, labels, test, k=3, T=100.0).tolist() == [1]
    # k = 1: the nearest alone
    assert knn.knn_predict(train, labels, test, k=1, T=None).tolist() == [0]


def test_k_larger_than_train_and_ties_to_lower_label():
    train = _angle_vectors([10, -10])
    labels = np.array([3, 1])
    test = _angle_vectors([0])
    # equal similarity, one vote each: the tie goes to the lower label
    assert knn.knn_predict(train, labels, test, k=20, T=None).tolist() == [1]
    assert knn.knn_predict(train, labels, test, k=20, T=0.07).tolist() == [1]


def test_only_k_nearest_vote():
    # three far class-1 vectors must not outvote the two near class-0 ones when k = 2
    train = _angle_vectors([1, 2, 80, 85, 90])
    labels = np.array([0, 0, 1, 1, 1])
    test = _angle_vectors([0])
    assert knn.knn_predict(train, labels, test, k=2, T=None).tolist() == [0]
    assert knn.knn_predict(train, labels, test, k=5, T=None).tolist() == [1]


def test_stratified_subset():
    targets = [0, 0, 0, 1, 1, 2]
    # rank 0 of classes 0, 1, 2 (indices 0, 3, 5), then rank 1 of class 0 (index 1)
    assert knn.stratified_subset(targets, 4).tolist() == [0, 1, 3, 5]
    assert knn.stratified_subset(targets, 2).tolist() == [0, 3]
    assert knn.stratified_subset(targets, 6).tolist() == [0, 1, 2, 3, 4, 5]
    assert knn.stratified_subset(targets, 100).tolist() == [0, 1, 2, 3, 4, 5]


# ------------------------------------------------------------------ knn_monitor on tiny image folders

def _write_folder(root, spec, size=8, seed=0):
    """spec: {class: [rgb, ...]} -> root/class/NN.png, solid colours with a little noise."""
    rng = np.random.default_rng(seed)
    for cls, colours in spec.items():
        os.makedirs(os.path.join(root, cls), exist_ok=True)
        for i, rgb in enumerate(colours):
            img = np.clip(np.array(rgb, dtype=np.float64) + rng.uniform(-8, 8, (size, size, 3)), 0, 255)
            Image.fromarray(img.astype(np.uint8), 'RGB').save(os.path.join(root, cls, f'{i:02d}.png'))


class ColourMean(paddle.nn.Layer):
    """forward_features(x) -> [N, 1, 3]: the mean of each channel (so the 'class token' is the mean colour);
    a BatchNorm and Dropout make its train and eval modes differ."""

    def __init__(self):
        super().__init__()
        self.bn = paddle.nn.BatchNorm2D(3)
        self.drop = paddle.nn.Dropout(0.5)
        self.modes_seen = []

    def forward_features(self, x):
        self.modes_seen.append(self.training)
        return x.mean(axis=[2, 3])[:, None, :]


RED, GREEN, BLUE = (220, 30, 30), (30, 220, 30), (30, 30, 220)


@pytest.fixture(scope='module')
def colour_folders(tmp_path_factory):
    root = tmp_path_factory.mktemp('colours')
    train = {'a_red': [RED] * 6, 'b_green': [GREEN] * 6, 'c_blue': [BLUE] * 6}
    # val: 4 reds, 3 greens and one BLUE image filed under b_green, 2 blues -> exactly 9 of 10 right
    val = {'a_red': [RED] * 4, 'b_green': [GREEN] * 3 + [BLUE], 'c_blue': [BLUE] * 2}
    _write_folder(root / 'train', train, seed=1)
    _write_folder(root / 'val', val, seed=2)
    return str(root / 'train'), str(root / 'val')


def test_monitor_known_accuracy(colour_folders):
    train, val = colour_folders
    enc = ColourMean()
    enc.train()
    res = knn.knn_monitor(enc, train, val, img_size=8, k=5, batch_size=4)
    assert set(res) == {'knn_top1', 'n_train', 'n_val', 'seconds'}
    assert res['knn_top1'] == pytest.approx(9 / 10)
    assert (res['n_train'], res['n_val']) == (18, 10)
    assert res['seconds'] >= 0
    assert enc.modes_seen and not any(enc.modes_seen), 'features must be computed in eval mode'
    assert enc.training, 'the train mode must be restored'
    enc.eval()
    knn.knn_monitor(enc, train, val, img_size=8, k=5)
    assert not enc.training, 'an encoder in eval mode stays in eval mode'


def test_monitor_max_train_is_stratified(colour_folders):
    train, val = colour_folders
    # 3 train images: one per class (stratified), so each colour still has its neighbour: 9/10
    res = knn.knn_monitor(ColourMean(), train, val, img_size=8, k=1, max_train=3)
    assert res['n_train'] == 3 and res['n_val'] == 10
    assert res['knn_top1'] == pytest.approx(9 / 10)
    # a first-N subset would hold red images only and get 4/10; stratified keeps every class
    res = knn.knn_monitor(ColourMean(), train, val, img_size=8, k=1, max_train=6)
    assert res['n_train'] == 6 and res['knn_top1'] == pytest.approx(9 / 10)


def test_monitor_rejects_mismatched_classes_and_bad_k(colour_folders, tmp_path):
    train, _ = colour_folders
    _write_folder(str(tmp_path / 'val'), {'a_red': [RED], 'z_other': [GREEN]})
    with pytest.raises(DataError, match='class folders'):
        knn.knn_monitor(ColourMean(), train, str(tmp_path / 'val'), img_size=8)
    with pytest.raises(ValueError, match='positive'):
        knn.knn_monitor(ColourMean(), train, train, img_size=8, k=0)


def test_monitor_small_vit(colour_folders):
    """The product's ViT (class token after the final norm) through the same path."""
    train, val = colour_folders
    paddle.seed(0)
    moco = models.build_moco('vit_small', dim=16, mlp_dim=32, T=0.2, img_size=8, patch_size=4, embed_dim=32,
                             depth=1, num_heads=2)
    enc = moco.base_encoder
    enc.train()
    before = {k: v.numpy().copy() for k, v in enc.state_dict().items()}
    res = knn.knn_monitor(enc, train, val, img_size=8, k=5)
    assert 0.0 <= res['knn_top1'] <= 1.0 and (res['n_train'], res['n_val']) == (18, 10)
    assert enc.training
    after = enc.state_dict()
    assert all(np.array_equal(before[k], after[k].numpy()) for k in before), 'the monitor changed the encoder'
    # the features it classifies are backbone_features in eval mode: recompute them by hand
    fx, fy = knn.extract_features(enc, val, img_size=8)
    enc.eval()
    img = Image.open(os.path.join(val, 'a_red', '00.png')).convert('RGB')
    x = paddle.to_tensor(np.stack([np.asarray(knn.eval_transform(8)(img))]))
    ref = models.backbone_features(enc, x).numpy()
    enc.train()
    np.testing.assert_allclose(fx[0], ref[0], rtol=1e-5, atol=1e-6)
    assert fy.tolist() == [0, 0, 0, 0, 1, 1, 1, 1, 2, 2]
