"""VisualDL scalars and the kNN monitor hook of the trainers: a tiny main_moco run (with --knn-every 1) and a
tiny main_lincls run write vdl/ records, read back here with visualdl's own LogReader, equal to metrics.jsonl
(as float32, what VisualDL stores); --no-vdl writes none."""
import json
import os
import shutil
import sys
import types

import numpy as np
import pytest
from visualdl import LogReader

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from test_main_moco import COMMON, TINY_VIT, make_images  # noqa: E402

from paddle_impl import engine, main_lincls, main_moco  # noqa: E402


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
    root = make_images(tmp_path_factory.mktemp('vdl-data'))
    shutil.copytree(os.path.join(root, 'train'), os.path.join(root, 'val'))  # labelled val with the same classes
    return root


def _records(out):
    with open(os.path.join(out, 'metrics.jsonl')) as f:
        return [json.loads(line) for line in f if line.strip()]


def _vdl_scalars(vdl_dir):
    """{tag: {step: value}} of every VisualDL record file under vdl_dir, read by visualdl's LogReader."""
    out = {}
    files = [n for n in os.listdir(vdl_dir) if n.startswith('vdlrecords')]
    assert files, os.listdir(vdl_dir)
    for name in files:
        reader = LogReader(file_path=os.path.join(vdl_dir, name))
        for tag in reader.get_tags().get('scalar', []):
            for rec in reader.get_data('scalar', tag):
                out.setdefault(tag, {})[rec.id] = rec.value
    return out


def _assert_same(records, scalars, expected_tags):
    """Every scalar of metrics.jsonl that VisualDL carries is there, at its step, equal as float32."""
    n = 0
    for rec in records:
        for key in engine.VDL_SCALARS.get(rec['type'], ()):
            if isinstance(rec.get(key), (int, float)):
                tag = f"{rec['type']}/{key}"
                step = int(rec.get('global_step', rec.get('epoch', 0)))
                assert tag in scalars and step in scalars[tag], (tag, step, sorted(scalars))
                assert np.float32(scalars[tag][step]) == np.float32(rec[key]), (tag, step, scalars[tag][step], rec[key])
                n += 1
    assert expected_tags <= set(scalars), sorted(scalars)
    assert n == sum(len(v) for t, v in scalars.items() if t.split('/')[0] in engine.VDL_SCALARS)
    return n


@pytest.fixture
def fake_knn(monkeypatch):
    """paddle_impl.knn's knn_monitor, recorded (a stand-in returning fixed numbers when the module is absent;
    the real one wrapped when it is there)."""
    calls = []
    try:
        from paddle_impl import knn as real
        inner = real.knn_monitor
    except ImportError:
        real = None

        def inner(encoder, train_root, val_root, img_size, k, max_train, batch_size):
            return {'knn_top1': 0.25 + 0.125 * len(calls), 'n_train': 24, 'n_val': 24, 'seconds': 0.5}
    module = real or types.ModuleType('paddle_impl.knn')

    def knn_monitor(encoder, train_root, val_root, **kw):
        calls.append((train_root, val_root, kw))
        return inner(encoder, train_root, val_root, **kw)
    monkeypatch.setattr(module, 'knn_monitor', knn_monitor, raising=False)
    if real is None:
        import paddle_impl
        monkeypatch.setitem(sys.modules, 'paddle_impl.knn', module)
        monkeypatch.setattr(paddle_impl, 'knn', module, raising=False)
    return calls


def test_moco_vdl_equals_metrics_and_knn_every_epoch(data_dir, tmp_path, fake_knn):
    out = tmp_path / 'moco'
    rc = main_moco.main([data_dir, *TINY_VIT, *COMMON, '--knn-every', '1', '--knn-max-train', '17',
                         '--output-dir', str(out)])
    assert rc == 0
    assert [(c[0], c[1], c[2]['k'], c[2]['max_train'], c[2]['img_size']) for c in fake_knn] == \
        [(os.path.join(data_dir, 'train'), os.path.join(data_dir, 'val'), 20, 17, 32)] * 2
    recs = _records(out)
    knn = [r for r in recs if r['type'] == 'knn']
    assert [r['epoch'] for r in knn] == [0, 1] and all(0 <= r['knn_top1'] <= 1 for r in knn)
    n = _assert_same(recs, _vdl_scalars(out / 'vdl'), {'step/loss', 'step/lr', 'step/m', 'step/images_per_s',
                                                       'epoch/loss_avg', 'knn/knn_top1'})
    assert n >= 6 * 4 + 2


def test_no_vdl_and_knn_off_by_default(data_dir, tmp_path, fake_knn):
    out = tmp_path / 'novdl'
    assert main_moco.main([data_dir, *TINY_VIT, *COMMON, '--epochs', '1', '--no-vdl', '--output-dir', str(out)]) == 0
    assert not os.path.exists(out / 'vdl') and fake_knn == []
    assert not [r for r in _records(out) if r['type'] == 'knn']


def test_lincls_vdl_top1_top5(data_dir, tmp_path):
    out = tmp_path / 'lin'
    rc = main_lincls.main([data_dir, '-a', 'vit_small', '--vit-patch-size', '8', '--vit-embed-dim', '32',
                           '--vit-depth', '1', '--vit-num-heads', '2', '--img-size', '32', '-b', '8', '--epochs', '2',
                           '-j', '0', '--seed', '0', '--output-dir', str(out)])
    assert rc == 0
    recs = _records(out)
    assert [r['epoch'] for r in recs] == [0, 1]
    _assert_same(recs, _vdl_scalars(out / 'vdl'), {'epoch/acc1', 'epoch/acc5', 'epoch/train_loss', 'epoch/lr'})
