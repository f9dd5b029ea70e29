"""Frozen-feature evaluation of a pre-trained encoder for the demo: the k-NN monitor of the product
(paddle_impl.knn: features, cosine, temperature-weighted 20-NN, T=0.07) and a logistic-regression probe."""
from paddle_impl.knn import (DEFAULT_T, eval_transform, extract_features, knn_accuracy, knn_monitor,  # noqa: F401
                             knn_predict, l2_normalize)


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
