"""The run core (paddle_impl/engine.py): device selection with a mocked GPU build, the AMP overflow rule
(skip, count, log, stop after N in a row) with an injected overflow on the CPU, the MoCo loss in float32
under AMP, and the one-line error of every trainer for these cases."""
import json
import os
import sys

import numpy as np
import paddle
import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from test_main_moco import COMMON, TINY_VIT, make_images  # noqa: E402

from paddle_impl import builder, engine, main_finetune, main_lincls, main_moco, models  # noqa: E402


def _main(main, argv, capsys):
    rc = main([str(a) for a in argv])
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    return rc, err


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
    return make_images(tmp_path_factory.mktemp('engine-data'))


# ------------------------------------------------------------------------------------------------ device

def _fake_gpu_build(monkeypatch, count, bf16=True):
    monkeypatch.setattr(paddle.device, 'is_compiled_with_cuda', lambda: True)
    monkeypatch.setattr(paddle.device.cuda, 'device_count', lambda: count)
    monkeypatch.setattr(paddle.amp, 'is_bfloat16_supported', lambda *a, **k: bf16)


def test_gpu_build_without_gpu_is_one_line(monkeypatch, capsys, tmp_path):
    """A CUDA build of Paddle that sees no GPU: the default device (gpu) and --device gpu fail with one line,
    before set_device could raise a traceback; --device cpu still resolves."""
    _fake_gpu_build(monkeypatch, 0)
    with pytest.raises(engine.RunError, match='sees no GPU'):
        engine.resolve_device(None)
    assert engine.resolve_device('cpu') == ('cpu', False)
    for main in (main_moco.main, main_lincls.main, main_finetune.main):
        rc, err = _main(main, [tmp_path, '--device', 'gpu', '-a', 'vit_small'], capsys)
        assert rc == 2 and len(err) == 1 and 'sees no GPU' in err[0] and '--device cpu' in err[0], err


def test_gpu_present_resolves_and_amp_defaults_on(monkeypatch):
    _fake_gpu_build(monkeypatch, 2)
    assert engine.resolve_device(None) == ('gpu', True)
    assert engine.resolve_device('gpu', False) == ('gpu', False)


def test_bfloat16_on_a_gpu_without_it_is_one_line(monkeypatch, capsys, tmp_path):
    _fake_gpu_build(monkeypatch, 1, bf16=False)
    with pytest.raises(engine.RunError, match='does not support bfloat16'):
        engine.resolve_device('gpu', True, 'bfloat16')
    assert engine.resolve_device('gpu', True, 'float16') == ('gpu', True)
    assert engine.resolve_device('gpu', False, 'bfloat16') == ('gpu', False)  # no AMP: nothing to refuse
    rc, err = _main(main_moco.main, [tmp_path, '--amp-dtype', 'bfloat16', '-a', 'vit_small'], capsys)
    assert rc == 2 and len(err) == 1 and 'bfloat16' in err[0] and '--amp-dtype float16' in err[0], err


def test_no_cuda_build_refuses_gpu(monkeypatch):
    monkeypatch.setattr(paddle.device, 'is_compiled_with_cuda', lambda: False)
    with pytest.raises(engine.RunError, match='no CUDA support'):
        engine.resolve_device('gpu')
    assert engine.resolve_device(None) == ('cpu', False)


# ----------------------------------------------------------------------------------------- overflow guard

class _Log:
    def __init__(self):
        self.lines = []

    def warning(self, msg):
        self.lines.append(msg)


def test_overflow_guard_counts_and_stops_after_n_in_a_row():
    log = _Log()
    g = engine.OverflowGuard(True, log, limit=3)
    assert g.check(True, 1.0, 'a') is True
    assert g.check(False, float('inf'), 'b') is False and g.check(False, float('nan'), 'c') is False
    assert g.check(True, 1.0, 'd') is True and g.in_a_row == 0 and g.total == 2  # a good step resets the run
    assert g.check(False, float('inf'), 'e') is False and g.check(False, float('inf'), 'f') is False
    with pytest.raises(engine.Diverged, match=r'loss is inf at g \(3 steps in a row skipped'):
        g.check(False, float('inf'), 'g')
    assert len(log.lines) == 4 and 'step skipped' in log.lines[0]
    off = engine.OverflowGuard(False, log)  # without float16 AMP a NaN stops at once
    with pytest.raises(engine.Diverged, match='loss is nan at h; stopped'):
        off.check(False, float('nan'), 'h')
    assert engine.OverflowGuard(True, log).limit == engine.AMP_MAX_CONSECUTIVE_SKIPS == 20


def _overflowing_build(monkeypatch, at_calls):
    """models.build_moco whose model's loss is +inf at the given forward calls (1-based): an fp16 overflow."""
    real, calls = models.build_moco, []

    def build(*a, **k):
        model = real(*a, **k)
        forward = model.forward

        def overflowing(x1, x2, m):
            calls.append(1)
            loss = forward(x1, x2, m)
            return loss * float('inf') if len(calls) in at_calls else loss
        model.forward = overflowing
        return model
    monkeypatch.setattr(models, 'build_moco', build)
    return calls


def _records(out, kind):
    with open(os.path.join(out, 'metrics.jsonl')) as f:
        return [r for r in map(json.loads, f) if r['type'] == kind]


def test_amp_overflow_once_is_skipped_and_training_goes_on(data_dir, tmp_path, capsys, monkeypatch):
    """--amp (float16) with an inf loss at step 2: the step is skipped (weights untouched by it), counted in
    metrics.jsonl and logged, and the run finishes with exit 0 and finite weights."""
    _overflowing_build(monkeypatch, {2})
    out = tmp_path / 'out'
    rc, err = _main(main_moco.main, [data_dir, *TINY_VIT, *COMMON, '--epochs', '1', '--amp', '--no-vdl',
                                     '--output-dir', out], capsys)
    assert rc == 0, err
    skips = _records(out, 'amp_skip')
    assert [(r['global_step'], r['skipped_in_a_row'], r['skipped_total']) for r in skips] == [(2, 1, 1)]
    assert [r['global_step'] for r in _records(out, 'step')] == [1, 3]  # step 2 made no update and is not logged
    with open(out / 'log.txt') as f:
        assert 'step skipped (float16 overflow, 1 in a row' in f.read()
    ck = main_moco.pio.load_checkpoint(str(out / 'checkpoint_0000.pdparams'))
    assert all(np.isfinite(v).all() for v in ck['state_dict'].values())


def test_amp_overflow_n_in_a_row_stops_with_exit_3(data_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(engine, 'AMP_MAX_CONSECUTIVE_SKIPS', 2)
    _overflowing_build(monkeypatch, {2, 3})
    out = tmp_path / 'out'
    rc, err = _main(main_moco.main, [data_dir, *TINY_VIT, *COMMON, '--amp', '--no-vdl', '--output-dir', out], capsys)
    assert rc == 3 and len(err) == 1, err
    assert err[0].startswith('error: loss is inf at epoch 0, iteration 3/3 (global step 3) (2 steps in a row'), err
    assert not os.path.exists(out / 'checkpoint_0000.pdparams')


def test_without_amp_an_overflow_stops_at_once(data_dir, tmp_path, capsys, monkeypatch):
    _overflowing_build(monkeypatch, {2})
    rc, err = _main(main_moco.main, [data_dir, *TINY_VIT, *COMMON, '--no-vdl', '--output-dir', tmp_path / 'o'], capsys)
    assert rc == 3 and len(err) == 1 and err[0].startswith('error: loss is inf at epoch 0, iteration 2/3'), err


def test_finetune_step_skips_a_non_finite_loss_without_update():
    """engine.finetune_step on an inf loss: no backward, no optimizer step (parameters unchanged)."""
    paddle.seed(0)
    model = paddle.nn.Linear(4, 3)
    opt = paddle.optimizer.SGD(learning_rate=0.1, parameters=model.parameters())
    before = model.weight.numpy().copy()
    x, y = paddle.randn([2, 4]), paddle.to_tensor([0, 2])
    res = main_finetune.engine.finetune_step(model, x, y, opt, lambda o, t: paddle.nn.functional.cross_entropy(
        o, t) * float('inf'))
    assert not res.finite and np.array_equal(model.weight.numpy(), before) and model.weight.grad is None
    res = engine.finetune_step(model, x, y, opt, paddle.nn.functional.cross_entropy)
    assert res.finite and not np.array_equal(model.weight.numpy(), before)


def test_moco_step_releases_the_gradients_after_the_update():
    """The gradients are there for before_update (the harness reads them there) and gone after the step, so
    they do not sit through the next forward; the update itself used them (the parameters moved)."""
    paddle.seed(0)
    model = models.build_moco('resnet50', 16, 32, 0.2, 32, False)
    model.train()
    opt, scaler, lr = engine.moco_training_setup(model, 'lars', 0.6, 8, 1e-6)
    trainable = [p for p in model.parameters() if not p.stop_gradient]
    before = trainable[0].numpy().copy()
    seen = {}
    x1, x2 = paddle.randn([8, 3, 32, 32]), paddle.randn([8, 3, 32, 32])
    res = engine.moco_step(model, x1, x2, opt, scaler, e=0.5, lr=lr, epochs=1, warmup_epochs=0, moco_m=0.99,
                           moco_m_cos=False, before_update=lambda o: seen.update(
                               n=sum(p.grad is not None for p in trainable)))
    assert res.finite and seen['n'] == len(trainable)
    assert all(p.grad is None for p in model.parameters())
    assert not np.array_equal(trainable[0].numpy(), before)


# --------------------------------------------------------------------------------------- MoCo loss dtype

@pytest.mark.parametrize('dtype', ['float16', 'bfloat16'])
def test_moco_loss_takes_float32_logits_under_amp(dtype, monkeypatch):
    """AMP hands the loss half-precision features; the logits go to cross_entropy in float32 (the CPU has no
    half-precision p_norm/einsum kernels, so those two run in float32 and cast back here, as a GPU returns them)."""
    model = models.build_moco('vit_small', dim=8, mlp_dim=16, T=0.2, img_size=32, patch_size=8, embed_dim=32,
                              depth=1, num_heads=2)
    seen, real_ce, real_norm, real_einsum = [], builder.F.cross_entropy, builder.F.normalize, paddle.einsum
    monkeypatch.setattr(builder.F, 'cross_entropy', lambda x, y, *a, **k: (seen.append(x.dtype), real_ce(x, y))[1])
    monkeypatch.setattr(builder.F, 'normalize', lambda x, axis=1: real_norm(x.astype('float32'), axis=axis).astype(
        x.dtype))
    monkeypatch.setattr(paddle, 'einsum', lambda eq, a, b: real_einsum(eq, a.astype('float32'), b.astype(
        'float32')).astype(a.dtype))
    paddle.seed(0)
    q, k = paddle.randn([4, 8]), paddle.randn([4, 8])
    loss = model.contrastive_loss(q.astype(dtype), k.astype(dtype))
    assert seen == [paddle.float32] and loss.dtype == paddle.float32
    ref = model.contrastive_loss(q.astype(dtype).astype('float32'), k.astype(dtype).astype('float32'))
    assert abs(float(loss) - float(ref)) < 2e-2 * abs(float(ref))


def test_data_seed_and_check_args():
    assert engine.data_seed(None, 7) == 7 and engine.data_seed(np.int64(3), 7) == 3
    assert isinstance(engine.data_seed(None, None), int)
    args = main_lincls.get_parser().parse_args(['d', '-a', 'vit_small', '--vit-depth', '0'])
    with pytest.raises(engine.RunError, match='--vit-depth must be positive, got 0'):
        engine.check_common_args(args)


def test_finetune_amp_overflow_once_is_skipped(data_dir, tmp_path, capsys, monkeypatch):
    """main_finetune --amp (float16) with an inf output at the 2nd training step: skipped, counted, logged; the
    run finishes (exit 0) with finite weights."""
    import shutil
    data = tmp_path / 'tv'
    shutil.copytree(os.path.join(data_dir, 'train'), data / 'train')
    shutil.copytree(os.path.join(data_dir, 'train'), data / 'val')
    real, calls = models.encoder_factory, []

    def factory(*a, **k):
        build = real(*a, **k)

        def build_overflowing(**kw):
            model = build(**kw)
            forward = model.forward

            def overflowing(x):
                out = forward(x)
                if model.training:
                    calls.append(1)
                    if len(calls) == 2:
                        return out * float('inf')
                return out
            model.forward = overflowing
            return model
        return build_overflowing
    monkeypatch.setattr(models, 'encoder_factory', factory)
    out = tmp_path / 'ft'
    rc, err = _main(main_finetune.main, [data, '-a', 'vit_small', '--vit-patch-size', 8, '--vit-embed-dim', 32,
                                         '--vit-depth', 1, '--vit-num-heads', 2, '--img-size', 32, '-b', 8, '--epochs',
                                         1, '-j', 0, '--amp', '--no-vdl', '--aa', 'none', '--reprob', 0, '--mixup', 0,
                                         '--cutmix', 0, '--output-dir', out], capsys)
    assert rc == 0, err
    assert len(calls) == 3
    assert [(r['global_step'], r['skipped_in_a_row'], r['skipped_total']) for r in _records(out, 'amp_skip')] == \
        [(1, 1, 1)]
    from paddle_impl import io as pio
    ck = pio.load_checkpoint(str(out / 'checkpoint.pdparams'))
    assert all(np.isfinite(v).all() for v in ck['model'].values())
