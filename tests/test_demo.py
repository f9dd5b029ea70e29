"""The digits demo end to end, shrunk to run in seconds: a one-block ViT of width 48, one epoch of
batch 256 (5 steps), then 20-NN of frozen features before and after. Checks the plumbing, not accuracy
(`make demo` runs the real thing)."""
import json
import os

import numpy as np

from demo import knn, run_demo


def test_knn_majority_vote_cosine():
    train = np.array([[1, 0], [0.9, 0.1], [0, 1], [0.1, 0.9], [0.2, 1.0]])
    labels = np.array([0, 0, 1, 1, 1])
    test = np.array([[10, 1], [0, 5]])  # scale does not matter: cosine
    assert knn.knn_predict(train, labels, test, k=2).tolist() == [0, 1]
    assert knn.knn_accuracy(train, labels, test, np.array([0, 1]), k=3) == 1.0


def test_demo_quick(tmp_path, capsys):
    out = tmp_path / 'demo'
    code = run_demo.main(['--out', str(out), '--epochs', '1', '-b', '256', '--width', '48', '--depth', '1',
                          '--heads', '3', '--lincls-epochs', '1'])
    assert code == 0
    text = capsys.readouterr().out
    assert 'random init (same seed)' in text and 'pre-trained' in text and 'main_lincls (1 ep)' in text
    with open(out / 'results.json') as f:
        res = json.load(f)
    assert res['steps'] == 1438 // 256
    for key in ('random_init', 'pretrained'):
        assert 0.0 < res[key]['knn'] <= 1.0 and res[key]['n_val'] == 359 and res[key]['n_train'] == 1438
        assert 0.0 <= res[key]['lincls'] <= 1.0  # main_lincls top-1 on the val digits
    run = out / 'pretrain'
    for name in ('checkpoint_0000.pdparams', 'metrics.jsonl', 'curves.png', 'log.txt'):
        assert (run / name).exists(), name
    assert os.path.isdir(out / 'digits' / 'train' / '9')
