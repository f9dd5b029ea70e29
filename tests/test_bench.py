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
    results = {k: bench.item(2.0, 4.0, 's', ratio_min=0.25, load_average=[1.5, 2.5]) for k in bench.ORDER}
    results['machine'] = {'cpu': 'x', 'cores': 2, 'env': {'OMP_NUM_THREADS': '2'}, 'device': 'cpu',
                          'versions': {'paddlepaddle': '3', 'torch': '2'}, 'kernel_isa': 'avx2',
                          'cpu_facts': bench.machine_facts()}
    table = bench.format_table(results)
    for k in bench.ORDER:
        assert k in table
    assert '0.500' in table and '0.250' in table and '1.5-2.5' in table
    assert bench.item(1.0, 0.0, 's')['ratio'] is None
    facts = results['machine']['cpu_facts']
    assert {'vendor', 'model', 'isa', 'set', 'kept', 'reasons', 'malloc_tune'} <= set(facts)
    json.dumps(results)


def test_best_of_settings():
    """Each framework's best setting is chosen on its own: the ratio can come from two different settings."""
    def step(allocator, paddle_med, torch_med):
        return bench.item(paddle_med, torch_med, 's', allocator=allocator,
                          median={'paddle': paddle_med, 'torch': torch_med}, min={'paddle': paddle_med - 0.5, 'torch': torch_med - 0.5}, load_average=[1.0, 2.0])
    best = bench.best_of([step('tuned', 5.0, 6.5), step('default', 5.5, 5.0)])
    assert best['setting'] == {'paddle': 'allocator=tuned', 'torch': 'allocator=default'}
    assert best['ratio'] == 1.0 and best['ratio_min'] == 1.0
    assert best['median'] == {'paddle': 5.0, 'torch': 5.0} and best['load_average'] == [1.0, 2.0]


def test_memory_at_each_frameworks_best_setting():
    results = {'step_time_m_best': {'setting': {'paddle': 'allocator=tuned', 'torch': 'allocator=default'}},
               'peak_memory_m': bench.item(100.0, 300.0, 'MiB'),
               'peak_memory_m_glibc_default': bench.item(200.0, 150.0, 'MiB')}
    mem = bench.memory_at_best(results, 'm')
    assert (mem['paddle'], mem['torch'], mem['ratio']) == (100.0, 150.0, 100.0 / 150.0)


def test_isa_cap_environment():
    """--isa avx2 caps MKL, oneDNN, ATen and our kernels in the workers' environment; MKL's AMD code path is
    decided again (never the AVX-512 path '7' under an AVX2 cap); an unknown or absent ISA is one error."""
    from paddle_impl import machine
    env = {'PATH': '/bin', 'MKL_DEBUG_CPU_TYPE': '7'}
    assert bench.isa_env(env, 'native') is env
    with pytest.raises(RuntimeError, match='--isa avx9'):
        bench.isa_env(env, 'avx9')
    if 'avx2' not in machine.cpu_facts()['isa']:
        with pytest.raises(RuntimeError, match='does not have avx2'):
            bench.isa_env(env, 'avx2')
        return
    capped = bench.isa_env(env, 'avx2')
    for k, v in bench.ISA_CAPS['avx2'].items():
        assert capped[k] == v
    vendor = machine.cpu_facts()['vendor']
    assert capped.get('MKL_DEBUG_CPU_TYPE') == ('5' if vendor == 'amd' else None)
    assert env['MKL_DEBUG_CPU_TYPE'] == '7'  # the caller's dict is not changed
