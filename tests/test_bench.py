"""Smoke test of bench/bench.py: every code path at tiny sizes (the numbers themselves are not judged)."""
import json
import math
import os

import numpy as np
import pytest

from bench import bench

QUICK = bench.SIZES['quick']


@pytest.mark.parametrize('model', list(bench.MODELS))
def test_training_steps_and_flops(model):
    """One complete MoCo step per framework (official optimizer of the recipe), and the FLOP count."""
    for cls in (bench.PaddleStep, bench.TorchStep):
        step = cls(model, QUICK)
        losses = [step() for _ in range(2)]
        assert all(math.isfinite(x) for x in losses), (cls.__name__, losses)
    flops = step.count_flops()  # torch
    assert flops > 0


def test_aug_workers_protocol(tmp_path):
    """Two worker processes (paddle_impl.loader, torchvision), the JSON-lines protocol, the JPEG maker."""
    paths = bench.make_jpegs(str(tmp_path), 2, (64, 48))
    from PIL import Image
    assert Image.open(paths[0]).size == (64, 48)
    with bench.Pair('cpu', role='aug', env=dict(os.environ, OMP_NUM_THREADS='1')) as w:
        for x in w.values():
            x.call('aug_setup', paths=paths, img_size=32, crop_min=bench.CROP_MIN)
        res = bench.alternate(w, 'aug', warmup=0, reps=2, settle=0)
        with pytest.raises(RuntimeError, match='unknown_op'):
            w['paddle'].call('unknown_op')
    for fw in bench.FRAMEWORKS:
        assert len(res[fw]) == 2 and all(r['time'] > 0 for r in res[fw])
        assert res[fw][0]['shape'] == [3, 32, 32]


def test_table_and_json_layout():
    results = {k: bench.item(2.0, 4.0, 's') for k in bench.ORDER}
    results['machine'] = {'cpu': 'x', 'cores': 2, 'env': {'OMP_NUM_THREADS': '2'}, 'device': 'cpu',
                          'versions': {'paddlepaddle': '3', 'torch': '2'}}
    table = bench.format_table(results)
    for k in bench.ORDER:
        assert k in table
    assert '0.500' in table
    assert bench.item(1.0, 0.0, 's')['ratio'] is None
    json.dumps(results)
