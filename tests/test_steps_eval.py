"""The product's linear-classification and fine-tuning steps (engine.lincls_step / engine.finetune_step, with
main_lincls' SGD and schedule, main_finetune's AdamW groups, label smoothing and schedule) against the torch
references for K steps in float64 (parity/steps_eval.py), and planted bugs that the comparison must catch."""
import math

import paddle
import pytest

from paddle_impl import main_finetune, main_lincls
from parity import steps_eval
from parity.compare import format_table


def _check(rows):
    print('\n' + format_table(rows))
    assert rows and all(r.passed for r in rows), [r.check for r in rows if not r.passed]
    assert all(r.tol is not None and math.isfinite(r.rel_l2) for r in rows)  # every row judged, none NaN


def test_lincls_steps_float64():
    rows = steps_eval.run_lincls_steps(steps=6)
    _check(rows)
    assert {r.check.split(': ')[1] for r in rows} >= {'loss of each of 6 steps', 'SGD momentum buffers',
                                                       'parameters after the last step'}


def test_finetune_steps_float64():
    rows = steps_eval.run_finetune_steps(steps=6)
    _check(rows)
    assert any('AdamW exp_avg_sq' in r.check for r in rows)


def _failed(rows):
    return [r.check for r in rows if not r.passed]


def test_planted_sgd_without_weight_decay_fails(monkeypatch):
    real = main_lincls.SGD.step

    def step_without_wd(self):
        wd, self.weight_decay = self.weight_decay, 0.
        try:
            real(self)
        finally:
            self.weight_decay = wd
    monkeypatch.setattr(main_lincls.SGD, 'step', step_without_wd)
    failed = _failed(steps_eval.run_lincls_steps(steps=4))
    assert any('parameters after the last step' in c for c in failed), failed


def test_planted_weight_decay_on_biases_fails(monkeypatch):
    monkeypatch.setattr(main_finetune, 'no_decay_names', lambda model: set())
    failed = _failed(steps_eval.run_finetune_steps(steps=4))
    assert any('parameters after the last step' in c for c in failed), failed


def test_planted_loss_without_label_smoothing_fails(monkeypatch):
    real = main_finetune.build_criterion
    monkeypatch.setattr(main_finetune, 'build_criterion',
                        lambda args, *a: (real(args, *a)[0], paddle.nn.CrossEntropyLoss()))
    failed = _failed(steps_eval.run_finetune_steps(steps=2))
    assert any('loss of each' in c for c in failed), failed


@pytest.mark.parametrize('where', ['loss', 'param'])
def test_nan_in_the_product_fails(where, monkeypatch):
    """A NaN in one tensor of the product fails its row (whatever compare's own NaN rule)."""
    real = steps_eval._paddle_named if where == 'param' else None
    if where == 'param':
        def poisoned(pmodel, trainable=True):
            d = real(pmodel, trainable)
            if trainable:
                k = sorted(d)[0]
                d[k] = d[k].copy()
                d[k].flat[0] = float('nan')
            return d
        monkeypatch.setattr(steps_eval, '_paddle_named', poisoned)
    else:
        real_step = steps_eval.engine.lincls_step

        def nan_loss(*a, **k):
            r = real_step(*a, **k)
            return r._replace(loss=float('nan'))
        monkeypatch.setattr(steps_eval.engine, 'lincls_step', nan_loss)
    failed = _failed(steps_eval.run_lincls_steps(steps=2))
    assert failed, 'a NaN passed'
