"""main_finetune.build_optimizer: which parameters get weight decay. The rule (DeiT via timm's
create_optimizer / param_groups_weight_decay): every 1-D parameter, every bias, and pos_embed / cls_token are
exempt, every other trainable parameter is decayed; frozen ones (stop_gradient) are not in the optimizer.

The expected sets are computed here from the model's structured names and shapes alone (not with
main_finetune's helpers), then compared with (a) what the optimizer holds and what its decay function says
for each parameter's tensor name, and (b) what one real AdamW step does to each parameter when every
gradient is zero (the Adam update is then 0, so a decayed parameter becomes p * (1 - lr * wd) and an
exempt one stays bit-identical)."""
import numpy as np
import paddle
import pytest

from paddle_impl import main_finetune as mf
from paddle_impl import models

SMALL_VIT = dict(patch_size=8, embed_dim=32, depth=2, num_heads=2)
LR, WD = 0.1, 0.5


def _expected(model):
    """structured name -> True (decayed) / False (exempt), for the trainable parameters."""
    out = {}
    for name, p in model.named_parameters():
        if p.stop_gradient:
            continue
        leaf = name.split('.')[-1]
        exempt = len(p.shape) == 1 or leaf == 'bias' or name in ('pos_embed', 'cls_token')
        out[name] = not exempt
    return out


def _build(arch, fixed_pos_embed):
    paddle.seed(0)
    if arch == 'resnet50':
        model = models.encoder_factory(arch, img_size=32)(num_classes=5)
    else:
        model = models.encoder_factory(arch, img_size=16, drop_path_rate=0.1, **SMALL_VIT)(num_classes=5)
        model.pos_embed.stop_gradient = fixed_pos_embed  # what main_finetune does with --fixed-pos-embed
    return model


CASES = [('vit_small', True), ('vit_small', False), ('resnet50', True)]


@pytest.mark.parametrize('arch,fixed', CASES)
def test_decay_groups_match_structured_names(arch, fixed):
    model = _build(arch, fixed)
    expected = _expected(model)
    by_name = dict(model.named_parameters())
    # the hand-picked facts the rule must give
    if arch == 'vit_small':
        assert expected['cls_token'] is False and expected['blocks.0.attn.qkv.weight'] is True
        assert expected['blocks.1.norm2.weight'] is False and expected['head.bias'] is False
        assert expected['patch_embed.proj.weight'] is True and expected['head.weight'] is True
        assert ('pos_embed' in expected) == (not fixed)
        if not fixed:
            assert expected['pos_embed'] is False  # 3-D, exempt by name
    else:
        assert expected['conv1.weight'] is True and expected['bn1.weight'] is False
        assert expected['fc.weight'] is True and expected['fc.bias'] is False
        assert not any(n.endswith(('_mean', '_variance')) for n in expected)  # BN statistics are not trained

    opt = mf.build_optimizer(model, LR, WD)
    held = opt._parameter_list
    ids = [id(p) for p in held]
    assert len(ids) == len(set(ids)), 'a parameter is in the optimizer twice'
    names_of = {id(p): n for n, p in by_name.items()}
    assert sorted(names_of[i] for i in ids) == sorted(expected), 'the optimizer holds other parameters'
    decide = opt._apply_decay_param_fun
    got = {names_of[id(p)]: bool(decide(p.name)) for p in held}
    wrong = {n: (got[n], expected[n]) for n in expected if got[n] != expected[n]}
    assert not wrong, f'(decayed?, should be) differ for {wrong}'
    assert any(expected.values()) and not all(expected.values())


@pytest.mark.parametrize('arch,fixed', CASES)
def test_one_step_with_zero_gradients_decays_exactly_the_decay_group(arch, fixed):
    model = _build(arch, fixed)
    expected = _expected(model)
    model.train()
    opt = mf.build_optimizer(model, LR, WD)
    size = 32 if arch == 'resnet50' else 16
    before = {n: p.numpy().copy() for n, p in model.named_parameters()}
    out = model(paddle.randn([2, 3, size, size]))
    (out.sum() * 0.0).backward()  # every trained parameter gets a gradient of exactly zero
    assert all(p.grad is not None for n, p in model.named_parameters() if n in expected)
    opt.step()
    after = {n: p.numpy() for n, p in model.named_parameters()}
    for n, decayed in expected.items():
        if decayed:
            np.testing.assert_allclose(after[n], before[n] * (1 - LR * WD), rtol=1e-6, atol=0, err_msg=n)
            assert np.abs(before[n]).max() > 0, n
        else:
            np.testing.assert_array_equal(after[n], before[n], err_msg=n)
    frozen = [n for n, p in model.named_parameters() if p.stop_gradient and not n.endswith(('_mean', '_variance'))]
    for n in frozen:  # e.g. the fixed pos_embed: never touched
        np.testing.assert_array_equal(after[n], before[n], err_msg=n)
