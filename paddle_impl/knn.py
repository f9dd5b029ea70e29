"""k-nearest-neighbour monitor of a frozen encoder (the kNN curves of the MoCo v3 paper; the official code
never released one: facebookresearch/moco-v3 issue #5).

Protocol, the one of InstDisc (Wu et al. 2018) and DINO's eval_knn (Caron et al. 2021):
- features: ``models.backbone_features`` of the base encoder (ViT: the class token after the final norm;
  ResNet: the pooled features, before the projector), in eval mode (BN running statistics, no drop path),
  without gradient, on the images without augmentation (resize to img_size, ImageNet normalisation);
  the encoder's train/eval mode is restored afterwards;
- features are L2-normalised, so the dot product is the cosine similarity;
- each val image takes its k = 20 most similar train images; VOTE RULE: temperature-weighted votes,
  each neighbour adds exp(cos / T) with T = 0.07 to the score of its class, the class of highest score
  wins (ties: the lower label). ``T=None`` gives a plain majority vote (used by the digits demo before);
- train images: at most ``max_train`` of them, a deterministic STRATIFIED subset: the classes taken in
  turn (first image of every class, then the second of every class, ...) in the folder's sorted order,
  so every class keeps its share and the same run always sees the same images.

Several processes: the monitor is computed on rank 0 alone (the caller runs it there, on the unwrapped
model, and the other processes wait at the next collective); nothing here communicates, BN layers in
eval mode use their running statistics, so the result does not depend on the number of processes.
"""
import time

import numpy as np
import paddle

from . import loader as L
from .data import ImageFolder, check_split
from .models import backbone_features

__all__ = ['knn_monitor', 'knn_predict', 'knn_accuracy', 'extract_features', 'stratified_subset',
           'l2_normalize', 'eval_transform', 'DEFAULT_T']

DEFAULT_T = 0.07


def eval_transform(img_size):
    """The images as they are (resized if needed), normalised as in pre-training."""
    return L.Compose([L.Resize((img_size, img_size)), L.ToTensor(), L.Normalize(L.IMAGENET_MEAN, L.IMAGENET_STD)])


def stratified_subset(targets, max_n):
    """Indices (sorted) of at most max_n samples: rank r of every class before rank r + 1 of any class,
    classes in label order, samples of a class in their order. All indices if max_n >= len(targets)."""
    targets = np.asarray(targets)
    if max_n is None or max_n >= len(targets):
        return np.arange(len(targets))
    rank_in_class = np.empty(len(targets), dtype=np.int64)
    for c in np.unique(targets):
        idx = np.flatnonzero(targets == c)
        rank_in_class[idx] = np.arange(len(idx))
    order = np.lexsort((targets, rank_in_class))  # by rank in class, then by label
    return np.sort(order[:max_n])


@paddle.no_grad()
def extract_features(encoder, root, img_size, batch_size=64, num_workers=0, max_n=None):
    """(features [n, d] float32 numpy, labels [n] int64) of the images under root/<class>/ (a stratified
    subset of at most max_n of them if max_n is given), in eval mode; the encoder's mode is restored."""
    dataset = ImageFolder(root, eval_transform(img_size))
    if max_n is not None and max_n < len(dataset):
        dataset = paddle.io.Subset(dataset, stratified_subset(dataset.targets, max_n).tolist())
    loader = paddle.io.DataLoader(dataset, batch_size=batch_size, shuffle=False, drop_last=False,
                                  num_workers=num_workers)
    was_training = encoder.training
    encoder.eval()
    feats, labels = [], []
    try:
        for x, y in loader:
            feats.append(backbone_features(encoder, x).astype('float32').numpy())
            labels.append(np.asarray(y).reshape(-1))
    finally:
        if was_training:
            encoder.train()
    return np.concatenate(feats), np.concatenate(labels).astype(np.int64)


def l2_normalize(x, eps=1e-12):
    x = np.asarray(x, dtype=np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), eps)


def knn_predict(train_x, train_y, test_x, k=20, T=DEFAULT_T, chunk=1024):
    """Class of each test vector from its k most cosine-similar training vectors: temperature-weighted
    votes exp(cos / T) (T=None: one vote each). Ties go to the lower label."""
    train_x, test_x = l2_normalize(train_x), l2_normalize(test_x)
    train_y = np.asarray(train_y, dtype=np.int64)
    if len(train_x) == 0:
        raise ValueError('kNN: no training vectors')
    k = min(int(k), len(train_x))
    n_classes = int(train_y.max()) + 1
    preds = np.empty(len(test_x), dtype=np.int64)
    for start in range(0, len(test_x), chunk):
        sim = test_x[start:start + chunk] @ train_x.T
        nn_idx = np.argpartition(-sim, k - 1, axis=1)[:, :k]
        nn_sim = np.take_along_axis(sim, nn_idx, axis=1)
        weights = np.ones_like(nn_sim) if T is None else np.exp((nn_sim - 1.0) / T)  # exp(cos/T) up to a factor
        scores = np.zeros((len(nn_idx), n_classes))
        np.add.at(scores, (np.arange(len(nn_idx))[:, None], train_y[nn_idx]), weights)
        preds[start:start + len(nn_idx)] = scores.argmax(axis=1)
    return preds


def knn_accuracy(train_x, train_y, test_x, test_y, k=20, T=DEFAULT_T):
    return float((knn_predict(train_x, train_y, test_x, k, T) == np.asarray(test_y)).mean())


def knn_monitor(encoder, train_root, val_root, *, img_size, k=20, max_train=10000, batch_size=64, num_workers=0,
                T=DEFAULT_T):
    """kNN top-1 (a fraction in [0, 1]) of val_root's images classified by their k nearest train_root
    images in the frozen encoder's feature space (the protocol in the module docstring).

    Returns {'knn_top1': float, 'n_train': int, 'n_val': int, 'seconds': float}. train_root and val_root
    must have the same class folders (data.DataError otherwise). Single-process code: with several
    processes, call it on rank 0 only.
    """
    if int(k) < 1 or (max_train is not None and int(max_train) < 1):
        raise ValueError(f'kNN monitor: k ({k}) and max_train ({max_train}) must be positive')
    t0 = time.time()
    check_split(train_root, val_root)
    tx, ty = extract_features(encoder, train_root, img_size, batch_size, num_workers, max_n=max_train)
    vx, vy = extract_features(encoder, val_root, img_size, batch_size, num_workers)
    top1 = knn_accuracy(tx, ty, vx, vy, k=k, T=T)
    return {'knn_top1': top1, 'n_train': int(len(ty)), 'n_val': int(len(vy)), 'seconds': time.time() - t0}
