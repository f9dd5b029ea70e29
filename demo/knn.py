"""Frozen-feature evaluation of a pre-trained encoder: k-nearest-neighbour (cosine) and a linear probe.

extract_features runs the backbone (models.backbone_features: the ViT class token after the final norm,
the pooled ResNet features) in eval mode without augmentation; knn_accuracy classifies each test vector by a
majority vote of its k nearest training vectors under cosine similarity (features L2-normalised, ties to
the lower label).
"""
import numpy as np
import paddle

from paddle_impl import loader as L
from paddle_impl.data import ImageFolder
from paddle_impl.models import backbone_features


def eval_transform(img_size):
    """The images as they are (resized if needed), normalised as in pre-training."""
    return L.Compose([L.Resize((img_size, img_size)), L.ToTensor(), L.Normalize(L.IMAGENET_MEAN, L.IMAGENET_STD)])


@paddle.no_grad()
def extract_features(encoder, root, img_size, batch_size=256, num_workers=0):
    """(features [n, d] float32 numpy, labels [n] int64) of every image under root/<class>/."""
    dataset = ImageFolder(root, eval_transform(img_size))
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


def knn_predict(train_x, train_y, test_x, k=20):
    """Majority vote of the k training vectors most cosine-similar to each test vector."""
    train_x, test_x = l2_normalize(train_x), l2_normalize(test_x)
    train_y = np.asarray(train_y)
    k = min(k, len(train_x))
    n_classes = int(train_y.max()) + 1
    preds = np.empty(len(test_x), dtype=np.int64)
    for start in range(0, len(test_x), 1024):
        sim = test_x[start:start + 1024] @ train_x.T
        nn_idx = np.argpartition(-sim, k - 1, axis=1)[:, :k]
        for row, idx in enumerate(nn_idx):
            preds[start + row] = np.bincount(train_y[idx], minlength=n_classes).argmax()
    return preds


def knn_accuracy(train_x, train_y, test_x, test_y, k=20):
    return float((knn_predict(train_x, train_y, test_x, k) == np.asarray(test_y)).mean())


def linear_probe_accuracy(train_x, train_y, test_x, test_y, seed=0):
    """Logistic regression on standardised features (scikit-learn); None if scikit-learn is missing."""
    try:
        from sklearn.linear_model import LogisticRegression
        from sklearn.preprocessing import StandardScaler
    except ImportError:
        return None
    scaler = StandardScaler().fit(train_x)
    clf = LogisticRegression(max_iter=2000, random_state=seed)
    clf.fit(scaler.transform(train_x), train_y)
    return float(clf.score(scaler.transform(test_x), test_y))
