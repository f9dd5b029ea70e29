"""The momentum encoder (official builder: ``param_m.data.copy_(param_b.data); param_m.requires_grad = False``):
for every arch, at small shapes, Paddle's starts as an exact copy of the base encoder (every parameter and
buffer, bit for bit, in its own memory), and gets no gradient: after a real training step of the product
(engine.moco_step with its optimizer, momentum m = 1 so the EMA leaves it as it is) it is unchanged while the
base encoder moved. (The parity harness loads both encoders from torch, so it cannot see this.)"""
import numpy as np
import paddle
import pytest

from paddle_impl import engine, models
from paddle_impl.layers import model_parameters

# every arch at small shapes: the conv stem needs patch 16; ResNet-50 has no small variant (img 32)
SMALL_VIT = dict(img_size=16, patch_size=8, embed_dim=32, depth=2, num_heads=2)
CASES = {
    'vit_small': SMALL_VIT, 'vit_base': SMALL_VIT, 'vit_large': SMALL_VIT,
    'vit_huge': dict(SMALL_VIT, patch_size=4, img_size=8),
    'vit_conv_small': dict(SMALL_VIT, patch_size=16, img_size=32),
    'vit_conv_base': dict(SMALL_VIT, patch_size=16, img_size=32),
    'resnet50': dict(img_size=32),
}
assert set(CASES) == set(models.ARCHS), 'a new arch needs a case here'


def _build(arch, seed=0):
    paddle.seed(seed)
    return models.build_moco(arch, dim=8, mlp_dim=16, T=0.2, **CASES[arch])


def _state(layer):
    return {k: v.numpy().copy() for k, v in layer.state_dict().items()}


@pytest.mark.parametrize('arch', sorted(CASES))
def test_momentum_encoder_starts_as_exact_copy(arch):
    model = _build(arch)
    base, mom = model.base_encoder.state_dict(), model.momentum_encoder.state_dict()
    assert list(base) == list(mom)
    n_params = len(model_parameters(model.base_encoder))
    assert n_params > 0 and len(base) >= n_params  # parameters, and buffers (BN statistics, pos_embed)
    for k in base:
        assert base[k].dtype == mom[k].dtype and tuple(base[k].shape) == tuple(mom[k].shape), k
        np.testing.assert_array_equal(base[k].numpy(), mom[k].numpy(), err_msg=k)
    # the copy is a copy: not the base encoder's memory (else the EMA would be a no-op)
    for pb, pm in zip(model_parameters(model.base_encoder), model_parameters(model.momentum_encoder)):
        assert pm is not pb
        assert pm.stop_gradient, f'momentum-encoder parameter {pm.name} would get a gradient'
    # a different seed gives another base encoder, so the equality above is the copy, not two identical draws
    other = model_parameters(_build(arch, seed=1).base_encoder)
    assert any(not np.array_equal(a.numpy(), b.numpy())
               for a, b in zip(model_parameters(model.base_encoder), other) if a.numpy().std() > 0)
    p = model_parameters(model.base_encoder)[0]
    before = model_parameters(model.momentum_encoder)[0].numpy().copy()
    p.set_value(p + 1.0)
    np.testing.assert_array_equal(model_parameters(model.momentum_encoder)[0].numpy(), before)


@pytest.mark.parametrize('arch,opt', [('vit_small', 'adamw'), ('vit_conv_small', 'adamw'), ('resnet50', 'lars')])
def test_momentum_encoder_gets_no_gradient(arch, opt):
    model = _build(arch)
    model.train()
    optimizer, scaler, lr = engine.moco_training_setup(model, opt, base_lr=0.5, batch_size=4, weight_decay=0.1)
    base0, mom0 = _state(model.base_encoder), _state(model.momentum_encoder)
    seen = {}

    def check_grads(_):
        seen['mom'] = [p.name for p in model.momentum_encoder.parameters() if p.grad is not None]
        seen['base'] = [p.name for p in model_parameters(model.base_encoder) if p.grad is not None]
    size = CASES[arch]['img_size']
    x1, x2 = paddle.randn([4, 3, size, size]), paddle.randn([4, 3, size, size])
    res = engine.moco_step(model, x1, x2, optimizer, scaler, e=0.5, lr=lr, epochs=2, warmup_epochs=0,
                           moco_m=1.0, moco_m_cos=False, before_update=check_grads)
    assert res.finite and res.m == 1.0
    assert seen['mom'] == [], f'momentum-encoder parameters got a gradient: {seen["mom"][:3]}'
    assert len(seen['base']) > 0
    mom1 = _state(model.momentum_encoder)
    base_moved = [k for k, v in _state(model.base_encoder).items() if not np.array_equal(v, base0[k])]
    assert len(base_moved) > 0, 'the step did not train the base encoder'
    for k, v in mom1.items():  # no gradient, no weight decay, and m = 1: untouched (BN statistics aside)
        if k.endswith(('_mean', '_variance')):
            continue
        np.testing.assert_array_equal(v, mom0[k], err_msg=k)
