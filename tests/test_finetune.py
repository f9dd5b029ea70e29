"""Fine-tuning (paddle_impl/main_finetune.py, paddle_impl/finetune_aug.py): each hand-written part of the DeiT
recipe against its definition (and against timm's implementation where timm has it), and the CLI end to end."""
import math
import random

import numpy as np
import paddle
import pytest
import torch
from PIL import Image

from paddle_impl import finetune_aug as fa
from paddle_impl import io as pio
from paddle_impl import main_finetune as mf
from paddle_impl import main_lincls as ml

from test_lincls import TINY_VIT, call_main, make_data, make_pretrain, run_cli



@pytest.fixture
def timm_aa():  # only the tests compared with timm need it (a skip there, never of the CLI tests)
    return pytest.importorskip('timm.data.auto_augment')


@pytest.fixture
def timm_mixup():
    return pytest.importorskip('timm.data.mixup')


# -------------------------------------------------------------------------------------------- Mixup / CutMix

def _batch(n=8, c=3, h=16, w=16, classes=5, seed=0):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, c, h, w)), rng.integers(0, classes, n)


def _smoothed(y, classes, s):
    off = s / classes
    t = np.full((len(y), classes), off)
    t[np.arange(len(y)), y] = 1 - s + off
    return t


def test_mixup_is_the_convex_combination_with_the_flipped_batch(timm_mixup):
    x, y = _batch()
    m = fa.Mixup(mixup_alpha=0.8, cutmix_alpha=0., label_smoothing=0.1, num_classes=5, seed=0)
    out, tgt = m(paddle.to_tensor(x), paddle.to_tensor(y))
    lam, use_cutmix, box = m.last
    assert not use_cutmix and box is None and 0 < lam < 1
    assert np.allclose(out.numpy(), lam * x + (1 - lam) * x[::-1], atol=1e-12)
    ref = lam * _smoothed(y, 5, 0.1) + (1 - lam) * _smoothed(y[::-1], 5, 0.1)
    assert np.allclose(tgt.numpy(), ref, atol=1e-12)
    assert np.allclose(tgt.numpy().sum(1), 1)
    # the same as timm's target mixing
    t_ref = timm_mixup.mixup_target(torch.from_numpy(y), 5, lam, 0.1).numpy()
    assert np.allclose(tgt.numpy(), t_ref, atol=1e-6)


def test_cutmix_pastes_the_box_and_corrects_lam_to_its_area():
    x, y = _batch(h=20, w=24)
    m = fa.Mixup(mixup_alpha=0., cutmix_alpha=1.0, label_smoothing=0.0, num_classes=5, seed=3)
    seen = 0
    for _ in range(20):
        out, tgt = m(paddle.to_tensor(x), paddle.to_tensor(y))
        lam, use_cutmix, box = m.last
        if box is None:
            continue
        seen += 1
        yl, yh, xl, xh = box
        mask = np.zeros((20, 24), bool)
        mask[yl:yh, xl:xh] = True
        o = out.numpy()
        assert np.array_equal(o[:, :, mask], x[::-1][:, :, mask]) and np.array_equal(o[:, :, ~mask], x[:, :, ~mask])
        assert math.isclose(lam, 1 - mask.sum() / mask.size)  # lam = the share of the original image
        assert np.allclose(tgt.numpy(), lam * _smoothed(y, 5, 0) + (1 - lam) * _smoothed(y[::-1], 5, 0))
    assert seen >= 15


def test_cutmix_box_equals_timm_for_the_same_centre(timm_mixup):
    for seed in range(50):
        lam = float(np.random.default_rng(seed).beta(1, 1))
        np.random.seed(seed)
        (yl, yh, xl, xh) = timm_mixup.rand_bbox((4, 3, 28, 36), lam)
        np.random.seed(seed)
        cy, cx = np.random.randint(0, 28), np.random.randint(0, 36)
        assert fa.rand_bbox((4, 3, 28, 36), lam, cy, cx) == (yl, yh, xl, xh)
    # an unclipped box covers 1 - lam of the image, up to the integer rounding of its sides
    for lam in (0.1, 0.3, 0.5, 0.9):
        yl, yh, xl, xh = fa.rand_bbox((1, 1, 100, 100), lam, 50, 50)
        side = int(100 * math.sqrt(1 - lam))
        assert (yh - yl, xh - xl) == (side, side)
        assert abs((yh - yl) * (xh - xl) / 1e4 - (1 - lam)) < 0.02


def test_mixup_draws():
    m = fa.Mixup(0.8, 1.0, prob=1.0, switch_prob=0.5, seed=0)
    draws = [m.draw() for _ in range(4000)]
    frac_cut = np.mean([c for _, c in draws])
    lams = np.array([lam for lam, _ in draws])
    assert abs(frac_cut - 0.5) < 0.03 and abs(lams.mean() - 0.5) < 0.02 and (lams >= 0).all() and (lams <= 1).all()
    off = fa.Mixup(0.8, 1.0, prob=0.0, seed=0)
    assert all(d == (1.0, False) for d in (off.draw() for _ in range(10)))
    with pytest.raises(ValueError, match='even'):
        m(paddle.zeros([3, 3, 4, 4]), paddle.to_tensor([0, 1, 2]))


# ------------------------------------------------------------------------------------------------- losses

def test_label_smoothing_cross_entropy_formula_and_timm():
    from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
    rng = np.random.default_rng(0)
    x = rng.standard_normal((16, 7)) * 3
    y = rng.integers(0, 7, 16)
    got = float(fa.label_smoothing_cross_entropy(paddle.to_tensor(x), paddle.to_tensor(y), 0.1))
    logp = x - np.log(np.exp(x).sum(1, keepdims=True))
    ref = np.mean(-(1 - 0.1) * logp[np.arange(16), y] - 0.1 * logp.mean(1))
    assert abs(got - ref) < 1e-12
    assert abs(got - LabelSmoothingCrossEntropy(0.1)(torch.from_numpy(x), torch.from_numpy(y)).item()) < 1e-12
    # = soft-target CE against the smoothed one-hot (smoothing/C off, 1 - s + s/C on)
    soft = _smoothed(y, 7, 0.1)
    got_soft = float(fa.soft_target_cross_entropy(paddle.to_tensor(x), paddle.to_tensor(soft)))
    assert abs(got_soft - ref) < 1e-12
    assert abs(got_soft - SoftTargetCrossEntropy()(torch.from_numpy(x), torch.from_numpy(soft)).item()) < 1e-12


# ---------------------------------------------------------------------------------------------- RandAugment

HPARAMS = dict(translate_pct=0.45, img_mean=fa.FILL, interpolation=Image.BICUBIC, magnitude_std=0.5)


def _image(seed=0, size=(40, 32)):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


@pytest.mark.parametrize('name', sorted(set(fa.RAND_INCREASING_OPS) | set(fa.RAND_OPS)))
def test_rand_augment_op_equals_timm(name, monkeypatch, timm_aa):
    img = _image()
    for m in (0., 3.7, 9., 10.):
        for negate in (False, True):
            # timm's _randomly_negate: -v when random.random() > 0.5
            monkeypatch.setattr(timm_aa.random, 'random', lambda: 0.9 if negate else 0.1)
            ref_args = timm_aa.LEVEL_TO_ARG[name](m, HPARAMS) if timm_aa.LEVEL_TO_ARG[name] else ()
            args = fa.level_args(name, m, negate=negate)
            assert np.allclose(args, ref_args), (name, m, args, ref_args)
            out = fa.apply_op(img, name, args)
            if 'Posterize' in name and args[0] <= 0:  # 0 bits kept: Pillow >= 10 (timm's op too) refuses it
                assert not np.asarray(out).any()
                continue
            ref = timm_aa.NAME_TO_OP[name](img, *ref_args, fillcolor=fa.FILL, resample=Image.BICUBIC)
            assert np.array_equal(np.asarray(out), np.asarray(ref)), (name, m, negate)


def test_rand_augment_config_and_draws(timm_aa):
    cfg = fa.parse_rand_augment('rand-m9-mstd0.5-inc1')
    assert cfg == dict(num_layers=2, magnitude=9.0, magnitude_std=0.5, magnitude_max=10.0, increasing=True, prob=0.5)
    assert fa.RAND_INCREASING_OPS == tuple(timm_aa._RAND_INCREASING_TRANSFORMS)
    assert fa.RAND_OPS == tuple(timm_aa._RAND_TRANSFORMS)
    with pytest.raises(ValueError):
        fa.parse_rand_augment('rand-m9-q3')
    with pytest.raises(ValueError):
        fa.parse_rand_augment('v0')
    ra = fa.RandAugment.from_config('rand-m9-mstd0.5-inc1')
    rng = random.Random(0)
    params = [ra.get_params(rng) for _ in range(3000)]
    assert all(len(p) == 2 for p in params)
    applied = [q for p in params for q in p if q is not None]
    assert abs(len(applied) / 6000 - 0.5) < 0.03  # each op applied with probability 0.5
    counts = {n: 0 for n in fa.RAND_INCREASING_OPS}
    for name, _ in applied:
        counts[name] += 1
    assert min(counts.values()) > 0.6 * len(applied) / 15  # uniform choice over the 15 ops
    mags = [ra.draw_magnitude(rng) for _ in range(5000)]
    assert abs(np.mean(mags) - 9.0) < 0.03 and abs(np.std(mags) - 0.5) < 0.03 and max(mags) <= 10.0
    img = _image(1)
    out, p = ra.forward(img, random.Random(5))
    assert np.array_equal(np.asarray(ra.apply(img, p)), np.asarray(out))  # replayable


# -------------------------------------------------------------------------------------------- RandomErasing

def test_random_erasing_region_statistics():
    re = fa.RandomErasing(probability=0.25)
    rng = random.Random(0)
    img = np.zeros((3, 64, 48), np.float32)
    erased, areas, noise = 0, [], []
    n = 2000
    for _ in range(n):
        p = re.get_params(rng, img)
        out = re.apply(img, p)
        if p:
            erased += 1
            (top, left, h, w, _), = p
            inside = out[:, top:top + h, left:left + w]
            assert (out[:, :top].sum(), out[:, top + h:].sum()) == (0, 0)
            assert not out[:, :, :left].any() and not out[:, :, left + w:].any()
            areas.append(h * w / (64 * 48))
            ar = h / w
            assert 0.3 * 0.75 <= ar <= (1 / 0.3) * 1.35  # log-uniform aspect, up to the rounding of h and w
            noise.append(inside.ravel())
        else:
            assert out is img or not out.any()
    assert abs(erased / n - 0.25) < 0.03
    assert 0.015 <= min(areas) and max(areas) <= 1 / 3 + 0.02 and abs(np.mean(areas) - (0.02 + 1 / 3) / 2) < 0.02
    noise = np.concatenate(noise)
    assert abs(noise.mean()) < 0.01 and abs(noise.std() - 1) < 0.01  # per-pixel N(0, 1)


def test_finetune_transforms_shapes_and_replay():
    train, val = fa.build_finetune_transforms(32)
    img = _image(2, (50, 40))
    out, params = train.forward(img, random.Random(1))
    assert out.shape == (3, 32, 32) and out.dtype == np.float32
    assert np.array_equal(train.apply(img, params), out)
    v = val(img)
    assert v.shape == (3, 32, 32) and np.array_equal(v, val(img))
    names = [type(t).__name__ for t in train.transforms]
    assert names == ['RandomResizedCrop', 'RandomHorizontalFlip', 'RandAugment', 'ToTensor', 'Normalize',
                     'RandomErasing']
    assert train.transforms[0].interpolation == Image.BICUBIC and val.transforms[0].size == 36
    train2, _ = fa.build_finetune_transforms(32, auto_augment='none', reprob=0)
    assert [type(t).__name__ for t in train2.transforms][2] == 'ColorJitter'


# ------------------------------------------------------------------------------------ schedule / optimizer

def test_deit_lr_equals_timm_cosine_scheduler():
    from timm.scheduler import CosineLRScheduler
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=2e-3)
    sched = CosineLRScheduler(opt, t_initial=30, lr_min=1e-5, warmup_lr_init=1e-6, warmup_t=5, cycle_limit=1,
                              t_in_epochs=True)
    for e in range(32):
        sched.step(e)
        assert math.isclose(mf.deit_lr(e, 2e-3, 30, 5, 1e-6, 1e-5), opt.param_groups[0]['lr'], rel_tol=1e-12), e


def test_weight_decay_exemptions():
    from paddle_impl import models
    model = models.encoder_factory('vit_small', img_size=32, **TINY_VIT)(num_classes=4)
    skip = mf.no_decay_names(model)
    assert {'pos_embed', 'cls_token', 'head.bias', 'norm.weight', 'blocks.0.attn.qkv.bias'} <= skip
    assert not {'head.weight', 'blocks.0.attn.qkv.weight', 'patch_embed.proj.weight'} & skip


# ---------------------------------------------------------------------------------------------------- CLI

@pytest.fixture(scope='module')
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp('finetune')
    data = make_data(root / 'data')
    pre = root / 'pretrain.pdparams'
    backbone = make_pretrain(pre)
    return {'root': root, 'data': data, 'pretrain': str(pre), 'backbone': backbone}


def test_cli_finetune_resume_eval(world):
    out = world['root'] / 'ft'
    common = [world['data'], '-a', 'vit_small', '--finetune', world['pretrain'], '-b', 8, '-j', 0, '--lr', 1e-3,
              '--warmup-epochs', 1, '--output-dir', out]
    r = run_cli('paddle_impl.main_finetune', common + ['--epochs', 2])
    assert r.returncode == 0, r.stderr[-2000:]
    assert (out / 'checkpoint.pdparams').exists() and (out / 'model_best.pdparams').exists()
    ck = pio.load_checkpoint(str(out / 'checkpoint.pdparams'))
    assert ck['epoch'] == 2 and ck['kind'] == 'finetune' and ck['num_classes'] == 3 and ck['vit_kwargs'] == TINY_VIT
    # end to end: the backbone moved away from the pre-trained weights (fine-tuning, not a linear probe)
    moved = [k for k, v in world['backbone'].items() if not np.array_equal(ck['model'][k], v)]
    assert 'blocks.0.attn.qkv.weight' in moved and 'pos_embed' in moved

    r = run_cli('paddle_impl.main_finetune', common + ['--epochs', 3, '--resume', out / 'checkpoint.pdparams'])
    assert r.returncode == 0, r.stderr[-2000:]
    assert '(epoch 2, best acc@1' in r.stdout and 'epoch 2:' in r.stdout and 'epoch 1:' not in r.stdout
    assert pio.load_checkpoint(str(out / 'checkpoint.pdparams'))['epoch'] == 3

    r = run_cli('paddle_impl.main_finetune', [world['data'], '-a', 'vit_small', '--eval', '--resume',
                                              out / 'model_best.pdparams', '-b', 8, '-j', 0])
    assert r.returncode == 0, r.stderr[-2000:]
    assert '* Acc@1' in r.stdout and '12 images' in r.stdout


def test_resume_continues_exactly(world, tmp_path):
    """2 epochs in one run == 1 epoch, then --resume for the second (weights bit for bit)."""
    base = [world['data'], '-a', 'vit_small', '--finetune', world['pretrain'], '-b', 8, '-j', 0, '--lr', 1e-3,
            '--warmup-epochs', 1, '--seed', 3]
    a = mf.run(mf.get_parser().parse_args([str(v) for v in base + ['--epochs', 2, '--output-dir', tmp_path / 'a']]))
    mf.run(mf.get_parser().parse_args([str(v) for v in base + ['--epochs', 1, '--output-dir', tmp_path / 'b']]))
    b = mf.run(mf.get_parser().parse_args([str(v) for v in base + [
        '--epochs', 2, '--output-dir', tmp_path / 'b', '--resume', tmp_path / 'b' / 'checkpoint.pdparams']]))
    sa, sb = a['model'].state_dict(), b['model'].state_dict()
    assert all(np.array_equal(sa[k].numpy(), sb[k].numpy()) for k in sa)


def test_bad_inputs(world, tmp_path, capsys):
    data, pre = world['data'], world['pretrain']
    base = ['-a', 'vit_small', '-j', 0, '-b', 8, '--epochs', 1, '--output-dir', tmp_path / 'o']

    def err_of(argv):
        rc, err = call_main(mf.main, argv, capsys)
        assert rc == 2 and len(err) == 1 and err[0].startswith('error: '), (rc, err)
        return err[0]

    assert 'pass it as --finetune' in err_of([data, '--resume', pre] + base)
    assert 'holds a vit_small, not a resnet50' in err_of([data, '--finetune', pre, '-a', 'resnet50', '-j', 0])
    assert 'even batch' in err_of([data, '--finetune', pre, '-a', 'vit_small', '-b', 7, '-j', 0])
    assert '--aa' in err_of([data, '--aa', 'augmix-m5'] + base)
    assert 'does not exist' in err_of([tmp_path / 'none', '--finetune', pre] + base)
    assert '--smoothing' in err_of([data, '--smoothing', 1.5] + base)
    rc, _ = call_main(ml.main, [data, '--pretrained', pre, '-a', 'vit_small', '-j', 0, '-b', 8, '--epochs', 1,
                                '--output-dir', tmp_path / 'lin'], capsys)
    assert rc == 0
    msg = err_of([data, '--finetune', tmp_path / 'lin' / 'checkpoint.pdparams'] + base)
    assert 'linear-classification' in msg
    assert 'linear-classification' in err_of([data, '--resume', tmp_path / 'lin' / 'checkpoint.pdparams'] + base)
