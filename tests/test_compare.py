"""The comparison rules themselves (parity/compare.py) and that a non-finite value fails every kind of row.

Issue 17: a NaN used to pass (NaN > x is False), to_json turned it into None and the summary dropped it;
``atol`` rescued any tensor whose abs error was small, however large the reference. Each test below fails
on that old behaviour.
"""
import json
import math

import numpy as np
import paddle
import pytest
import torch

from parity import distributed as D
from parity import scenarios, summary
from parity.compare import ATOL, compare, format_table, to_json
from parity.steps import run_steps

NONFINITE = [('nan', math.nan), ('+inf', math.inf), ('-inf', -math.inf)]


def _ref():
    rng = np.random.default_rng(0)
    return {'a': rng.standard_normal((4, 5)), 'b': rng.standard_normal(7), 'c': np.zeros(3)}


@pytest.mark.parametrize('side', ['paddle', 'torch'])
@pytest.mark.parametrize('what,val', NONFINITE)
@pytest.mark.parametrize('tol', [1e-10, None])
def test_nonfinite_fails_and_is_named(side, what, val, tol):
    ref = _ref()
    got = {k: v.copy() for k, v in ref.items()}
    planted = got if side == 'paddle' else ref
    planted['b'][3] = val
    row = compare('x', got, ref, tol, atol=ATOL['float64'])
    assert not row.passed, format_table([row])
    assert 'NON-FINITE' in row.worst and 'b (' in row.worst and side in row.worst
    assert 'FAIL' in format_table([row])


def test_all_nan_against_finite_fails():
    """The case of the read-through: an all-NaN Paddle dict against a finite reference."""
    ref = _ref()
    row = compare('grads', {k: np.full_like(v, np.nan) for k, v in ref.items()}, ref, 1e-10)
    assert not row.passed and math.isnan(row.rel_l2)
    row = compare('loss', {'loss': np.array(np.nan)}, {'loss': np.array(2.0)}, 1e-10)
    assert not row.passed


def test_same_nan_on_both_sides_still_fails():
    row = compare('x', {'t': np.array([1.0, np.nan])}, {'t': np.array([1.0, np.nan])}, 1e-10)
    assert not row.passed


def test_atol_only_at_the_noise_floor():
    """A small-but-wrong gradient (reference ~1e-5, 5% off, abs error 5e-7 < float32 atol 1e-6) fails;
    a cancellation zero (reference ~1e-8) with the same-size error passes by atol; the note says the rule."""
    rng = np.random.default_rng(1)
    small = rng.uniform(-1, 1, 64) * 1e-5
    wrong = small * 1.05
    assert np.max(np.abs(wrong - small)) <= ATOL['float32']
    row = compare('grad: every trainable parameter', {'g': wrong}, {'g': small}, 1e-3, atol=ATOL['float32'])
    assert not row.passed and row.worst == 'g', format_table([row])
    zero = rng.standard_normal(64) * 1e-8
    row = compare('grad: every trainable parameter', {'g': zero + 5e-7}, {'g': zero}, 1e-3, atol=ATOL['float32'])
    assert row.passed and 'noise floor' in row.note and '1 tensor' in row.note, format_table([row])


def test_json_keeps_nonfinite_and_summary_fails(tmp_path):
    ref = _ref()
    got = {k: v.copy() for k, v in ref.items()}
    got['a'][0, 0] = np.nan
    rows = [compare('grad: every trainable parameter', got, ref, 1e-10),
            compare('loss: MoCo', {'l': np.array(1.0)}, {'l': np.array(1.0)}, 1e-10)]
    for r in rows:
        r.detail = {'title': 'planted', 'dtype': 'float64'}
    path = tmp_path / 'r.json'
    to_json(rows, str(path))
    data = json.loads(path.read_text())  # strict JSON (no bare NaN token)
    assert data['rows'][0]['rel_l2'] == 'nan' and data['rows'][0]['passed'] is False
    text, failed = summary.summarize([str(path)])
    assert failed == 1 and '| nan |' in text and 'FAIL: grad: every trainable parameter' in text, text
    assert summary.main([str(path)]) == 1


def test_summary_separates_reported_rows(tmp_path):
    """Reported-only rows (tol None) are never counted as passed checks."""
    ref = _ref()
    rows = [compare('loss at each of 2 steps', ref, ref, None), compare('final params: base_encoder', ref, ref, None),
            compare('final params: predictor', ref, ref, 1e-9)]
    for r in rows:
        r.detail = {'title': 'f32 run', 'dtype': 'float32'}
    to_json(rows, str(tmp_path / 'r.json'))
    text, failed = summary.summarize([str(tmp_path / 'r.json')])
    assert failed == 0
    assert '| 1/1 | 2 | PASS |' in text, text
    assert 'judged checks passed' in text and 'reported only' in text


# ------------------------------------------------------------------ a planted NaN / inf in each scenario kind
SMALL = dict(img_size=32, dim=16, mlp_dim=32, depth=1)


def _set_paddle(pmod, name, val):
    p = dict(pmod.named_parameters())[name]
    a = np.asarray(p.numpy()).copy()
    a.flat[0] = val
    p.set_value(a)


def _set_torch(tmod, name, val):
    with torch.no_grad():
        dict(tmod.named_parameters())[name].view(-1)[0] = val


def _failed(rows):
    return {r.check: r.worst for r in rows if not r.passed}


@pytest.mark.parametrize('side,val', [('paddle', math.nan), ('torch', math.inf)])
def test_forward_loss_grads_fail_on_nonfinite_weight(side, val):
    tmod, pmod = scenarios.build_pair('vit_small', 'float64', **SMALL)
    name = 'predictor.3.weight'  # the predictor's last Linear: features are finite, its output is not
    (_set_paddle(pmod, name, val) if side == 'paddle' else _set_torch(tmod, name, val))
    rows = scenarios.run_forward_backward('vit_small', 'float64', batch=4, pair=(tmod, pmod), **SMALL)
    failed = _failed(rows)
    assert 'forward: backbone features' not in failed, format_table(rows)
    for check in ('forward: predictor output', 'loss: MoCo contrastive (q1,k2)+(q2,k1)',
                  'grad: every trainable parameter'):
        assert check in failed and 'NON-FINITE' in failed[check], format_table(rows)


@pytest.mark.parametrize('side,val', [('paddle', math.nan), ('torch', math.inf)])
def test_init_rows_fail_on_nonfinite_weight(monkeypatch, side, val):
    from paddle_impl import models as pm
    from torch_ref import models as tm
    mod, setter = (pm, _set_paddle) if side == 'paddle' else (tm, _set_torch)
    real = mod.build_moco

    def planted(*a, **k):
        m = real(*a, **k)
        setter(m, 'base_encoder.blocks.0.norm1.weight', val)  # a 'norm weights: 1' constant
        setter(m, 'base_encoder.blocks.0.mlp.fc1.weight', val)  # a xavier-uniform family
        return m
    monkeypatch.setattr(mod, 'build_moco', planted)
    rows = scenarios.init_rows('vit_small', **SMALL)
    failed = _failed(rows)
    assert f'init {side}: norm weights: 1' in failed and f'init {side}: vit Linear: xavier uniform' in failed, \
        format_table(rows)
    assert all('NON-FINITE' in w for w in failed.values())


@pytest.mark.parametrize('side,val', [('paddle', math.nan), ('torch', -math.inf)])
def test_steps_fail_on_nonfinite_weight(side, val):
    tmod, pmod = scenarios.build_pair('vit_small', 'float64', img_size=32, dim=16, mlp_dim=32, depth=1, T=1.0)
    name = 'predictor.3.weight'
    (_set_paddle(pmod, name, val) if side == 'paddle' else _set_torch(tmod, name, val))
    rows = run_steps('vit_small', 'adamw', steps=2, dtype='float64', batch=4, per_step=True, pair=(tmod, pmod),
                     **SMALL)
    failed = _failed(rows)
    assert 'loss at each of 2 steps' in failed and 'NON-FINITE' in failed['loss at each of 2 steps'], \
        format_table(rows)
    assert 'final params: predictor' in failed


def test_distributed_rows_fail_on_nonfinite():
    rng = np.random.default_rng(0)
    rec = {'loss_mean': rng.standard_normal(3), 'grad0/w': rng.standard_normal((3, 4)),
           'bn0/x._mean': rng.standard_normal(4), 'bn/x._mean': rng.standard_normal(4),
           'param/w': rng.standard_normal((3, 4))}
    assert all(r.passed for r in D.compare_records('a vs b', rec, rec, 'case'))
    for key, val in (('grad0/w', np.nan), ('param/w', np.inf), ('loss_mean', np.nan), ('bn/x._mean', -np.inf)):
        bad = {k: v.copy() for k, v in rec.items()}
        bad[key].flat[1] = val
        rows = D.compare_records('a vs b', bad, rec, 'case')
        failed = _failed(rows)
        assert len(failed) == 1 and 'NON-FINITE' in next(iter(failed.values())), format_table(rows)
    spread = {'spread_params': np.array(np.nan), 'spread_grads_step0': np.array(0.0)}
    assert not D.rank_rows('2p', spread, 'case')[0].passed
