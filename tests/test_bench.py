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


def _step(allocator, paddle_med, torch_med, policy='PASSIVE'):
    return bench.item(paddle_med, torch_med, 's', allocator=allocator, wait_policy=policy,
                      median={'paddle': paddle_med, 'torch': torch_med},
                      min={'paddle': paddle_med - 0.5, 'torch': torch_med - 0.5}, load_average=[1.0, 2.0])


def test_best_of_settings():
    """Each framework's best setting is chosen on its own: the ratio can come from two different settings."""
    best = bench.best_of({'step_time_m': _step('tuned', 5.0, 6.5), 'step_time_m_glibc_default': _step('default', 5.5, 5.0),
                          'step_time_m_omp_active': _step('tuned', 6.0, 5.2, 'ACTIVE')})
    assert best['setting'] == {'paddle': 'allocator=tuned, OMP_WAIT_POLICY=PASSIVE',
                               'torch': 'allocator=default, OMP_WAIT_POLICY=PASSIVE'}
    assert best['picked'] == {'paddle': 'step_time_m', 'torch': 'step_time_m_glibc_default'}
    assert best['ratio'] == 1.0 and best['ratio_min'] == 1.0
    assert best['median'] == {'paddle': 5.0, 'torch': 5.0} and best['load_average'] == [1.0, 2.0]
    # a setting that speeds torch up is torch's best even where it slows Paddle down
    best = bench.best_of({'step_time_m': _step('tuned', 5.0, 6.5), 'step_time_m_omp_active': _step('tuned', 9.0, 4.0, 'ACTIVE')})
    assert best['setting']['torch'] == 'allocator=tuned, OMP_WAIT_POLICY=ACTIVE' and best['ratio'] == 5.0 / 4.0


def test_memory_at_each_frameworks_best_setting():
    results = {'step_time_m_best': {'setting': {}, 'picked': {'paddle': 'step_time_m', 'torch': 'step_time_m_omp_active'}},
               'peak_memory_m': bench.item(100.0, 300.0, 'MiB'),
               'peak_memory_m_glibc_default': bench.item(200.0, 150.0, 'MiB'),
               'peak_memory_m_omp_active': bench.item(50.0, 250.0, 'MiB')}
    mem = bench.memory_at_best(results, 'm')
    assert (mem['paddle'], mem['torch'], mem['ratio']) == (100.0, 250.0, 100.0 / 250.0)


def _state(pid, want=None, wait_s=5.0):
    """The process's state letter ('T': stopped); with ``want``, polled until it is that (a signal is
    delivered asynchronously) or ``wait_s`` passed."""
    import time
    deadline = time.time() + wait_s
    while True:
        with open(f'/proc/{pid}/stat') as f:
            state = f.read().rsplit(')', 1)[1].split()[0]
        if want is None or state == want or time.time() > deadline:
            return state
        time.sleep(0.01)


def test_workers_are_stopped_between_calls():
    """A held worker is stopped (SIGSTOP) except while it answers a call, so that its idle threads (spinning under
    OMP_WAIT_POLICY=ACTIVE) take nothing from the other framework's measurement; closing resumes and ends it."""
    with bench.Pair('cpu', role='aug', env=dict(os.environ, OMP_NUM_THREADS='1')) as w:
        for x in w.values():
            assert x.hold and _state(x.proc.pid, 'T') == 'T'
            assert x.call('info')['ok'] and _state(x.proc.pid, 'T') == 'T'
        procs = [x.proc for x in w.values()]
    for proc in procs:
        assert proc.wait(timeout=30) == 0
    free = bench.WorkerProcess('paddle', 'cpu', 'aug', dict(os.environ, OMP_NUM_THREADS='1'))
    try:
        assert not free.hold and _state(free.proc.pid, 'T', wait_s=0.5) != 'T'
    finally:
        free.close()


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


def test_run_measures_each_setting_and_picks_each_frameworks_best(monkeypatch):
    """run(allocator='both', wait='both'): the steps under (tuned, PASSIVE), (default, PASSIVE) and (tuned, ACTIVE),
    each with that environment on both workers; *_best and its memory from each framework's fastest run."""
    seen = []
    # (allocator, policy) -> (paddle, torch) step medians: torch fastest with ACTIVE, Paddle with PASSIVE
    times = {('tuned', 'PASSIVE'): (5.0, 6.0), ('default', 'PASSIVE'): (5.5, 6.2), ('tuned', 'ACTIVE'): (7.0, 4.0)}

    def fake_model(name, skey, device, log, env):
        key = ('default' if env.get('MOCO_MALLOC_TUNE') == '0' else 'tuned', env['OMP_WAIT_POLICY'])
        seen.append(key)
        p, t = times[key]
        return {f'step_time_{name}': _step(key[0], p, t, key[1]),
                f'peak_memory_{name}': bench.item(p * 100, t * 100, 'MiB')}

    info = {'versions': {}, 'ok': True, 'cpu': 'x', 'cores': 2, 'env': {}}
    monkeypatch.setattr(bench, 'measure_model', fake_model)
    monkeypatch.setattr(bench, 'measure_gemm', lambda size, device, log, infos, env: infos.update(paddle=info, torch=info))
    monkeypatch.setattr(bench, 'measure_aug', lambda size, log, env: bench.item(1.0, 1.0, 'images/s'))
    res = bench.run(quick=True, models=('m',), allocator='both', wait='both', inference=False, log=lambda *a: None)
    assert seen == [('tuned', 'PASSIVE'), ('default', 'PASSIVE'), ('tuned', 'ACTIVE')]
    best = res['step_time_m_best']
    assert best['picked'] == {'paddle': 'step_time_m', 'torch': 'step_time_m_omp_active'}
    assert best['ratio'] == 5.0 / 4.0
    assert (res['peak_memory_m_best']['paddle'], res['peak_memory_m_best']['torch']) == (500.0, 400.0)
    assert res['step_time_m_omp_active']['wait_policy'] == 'ACTIVE'
    seen.clear()
    res = bench.run(quick=True, models=('m',), allocator='tuned', inference=False, log=lambda *a: None)
    assert seen == [('tuned', 'PASSIVE')] and 'step_time_m_best' not in res


def test_mkl_intel_path_environment(tmp_path):
    """--mkl-path intel: a shim answering MKL's vendor check is compiled and put first in both workers'
    LD_PRELOAD (the user's preloads kept after it); it answers 1; workers run under it; 'native' changes
    nothing and an unknown path is one error."""
    import ctypes

    from bench import mkl_path
    env = {'PATH': os.environ.get('PATH', '/bin'), 'LD_PRELOAD': 'libuser.so'}
    assert mkl_path.env_for(env, 'native') is env
    with pytest.raises(RuntimeError, match='--mkl-path amd'):
        mkl_path.env_for(env, 'amd')
    out = mkl_path.env_for(env, 'intel', str(tmp_path))
    shim = out['LD_PRELOAD'].split()[0]
    assert out['LD_PRELOAD'] == shim + ' libuser.so' and env['LD_PRELOAD'] == 'libuser.so'
    assert os.path.dirname(shim) == str(tmp_path) and mkl_path.build(str(tmp_path)) == shim  # built once
    assert getattr(ctypes.CDLL(shim), mkl_path.SYMBOL)() == 1
    infos = {}
    res = bench.measure_gemm(QUICK, 'cpu', lambda *a: None, infos, mkl_path.env_for(dict(os.environ), 'intel',
                                                                                     str(tmp_path)))
    assert res['paddle'] > 0 and res['torch'] > 0
    for fw in bench.FRAMEWORKS:
        assert infos[fw]['env']['LD_PRELOAD'].split()[0] == shim


def test_mkl_path_without_a_compiler_is_one_error(tmp_path, monkeypatch):
    from bench import mkl_path
    monkeypatch.setenv('CC', str(tmp_path / 'no-such-cc'))
    with pytest.raises(RuntimeError, match='--mkl-path intel needs a C compiler'):
        mkl_path.build(str(tmp_path))
    assert os.listdir(tmp_path) == []  # nothing left behind
