"""LARS and AdamW on both sides: hand computations, torch parity in float64, GradScaler, resume."""
import contextlib
from unittest import mock

import numpy as np
import paddle
import paddle.amp.grad_scaler as grad_scaler
import pytest
import torch
from paddle.utils import unique_name

from paddle_impl import models as pm
from paddle_impl import optimizer as popt
from paddle_impl import schedules as psched
from parity.scenarios import paddle_dtype
from test_cpu_kernels import _rel
from torch_ref import models as tm
from torch_ref import optimizer as topt
from torch_ref import schedules as tsched

# ------------------------------------------------------------------------------------------ LARS by hand
# lr 10, wd 0.5, tc 0.003, momentum 0.9; constant gradients for two steps.
# W0 = diag(3, 4) (|W0| = 5), grad G = 0.1 W0:
#   step 1: g = G + 0.5 W0 = 0.6 W0, |g| = 3, q = 0.003*5/3 -> g = 0.003 W0 = mu; W1 = W0 - 10 mu = 0.97 W0
#   step 2: g = 0.1 W0 + 0.485 W0 = 0.585 W0, |g| = 2.925, |W1| = 4.85, q*g = 0.00291 W0;
#           mu = 0.9*0.003 W0 + 0.00291 W0 = 0.00561 W0; W2 = 0.97 W0 - 0.0561 W0 = 0.9139 W0
# b0 = (1, -2), 1-D, grad (0.5, 0.25): no decay, no scaling:
#   mu1 = (0.5, 0.25), b1 = (-4, -4.5); mu2 = (0.95, 0.475), b2 = (-13.5, -9.25)
# Z0 = 0 (2x2), grad [[1, 0], [0, 0]]: |Z0| = 0 -> q = 1: mu1 = [[1,0],[0,0]], Z1 = [[-10,0],[0,0]];
#   step 2: g = [[1-5, 0], ..] = [[-4,0],..], |g| = 4, |Z1| = 10, q = 0.0075 -> [[-0.03,0],..];
#           mu2 = [[0.87,0],..], Z2 = [[-18.7,0],..]
# F (2x2, frozen) and U (2x2, trainable but unused by the loss) stay as they are: no weight decay.
W0 = np.diag([3.0, 4.0])
B0 = np.array([1.0, -2.0])
EXPECT_LARS = {
    1: {'W': 0.97 * W0, 'b': np.array([-4.0, -4.5]), 'Z': np.array([[-10.0, 0], [0, 0]])},
    2: {'W': 0.9139 * W0, 'b': np.array([-13.5, -9.25]), 'Z': np.array([[-18.7, 0], [0, 0]])},
}
EXPECT_MU2 = {'W': 0.00561 * W0, 'b': np.array([0.95, 0.475]), 'Z': np.array([[0.87, 0], [0, 0]])}
GRADS = {'W': 0.1 * W0, 'b': np.array([0.5, 0.25]), 'Z': np.array([[1.0, 0], [0, 0]])}
INIT = {'W': W0, 'b': B0, 'Z': np.zeros((2, 2)), 'F': np.full((2, 2), 2.0), 'U': np.full((2, 2), 3.0)}


def _torch_tiny():
    ps = {k: torch.nn.Parameter(torch.tensor(v, dtype=torch.float64), requires_grad=(k != 'F'))
          for k, v in INIT.items()}
    loss = lambda: sum((torch.from_numpy(GRADS[k]) * ps[k]).sum() for k in GRADS) + ps['F'].sum()
    return ps, loss


def _paddle_tiny():
    ps = {}
    for k, v in INIT.items():
        p = paddle.create_parameter(list(v.shape), 'float64')
        p.set_value(v)
        p.stop_gradient = k == 'F'
        ps[k] = p
    loss = lambda: sum((paddle.to_tensor(GRADS[k]) * ps[k]).sum() for k in GRADS) + ps['F'].sum()
    return ps, loss


def test_lars_by_hand_torch():
    ps, loss = _torch_tiny()
    opt = topt.LARS(list(ps.values()), lr=10.0, weight_decay=0.5, momentum=0.9, trust_coefficient=0.003)
    for step in (1, 2):
        opt.zero_grad()
        loss().backward()
        opt.step()
        for k, want in EXPECT_LARS[step].items():
            np.testing.assert_allclose(ps[k].detach().numpy(), want, rtol=1e-14, atol=1e-15, err_msg=f'{k} step {step}')
    for k, want in EXPECT_MU2.items():
        np.testing.assert_allclose(opt.state[ps[k]]['mu'].numpy(), want, rtol=1e-13, atol=1e-16)
    assert ps['U'].grad is None and ps['F'].grad is None
    assert np.array_equal(ps['F'].detach().numpy(), INIT['F']) and np.array_equal(ps['U'].detach().numpy(), INIT['U'])
    assert ps['U'] not in opt.state and ps['F'] not in opt.state


def test_lars_by_hand_paddle():
    ps, loss = _paddle_tiny()
    opt = popt.LARS(list(ps.values()), lr=10.0, weight_decay=0.5, momentum=0.9, trust_coefficient=0.003)
    for step in (1, 2):
        opt.clear_grad(set_to_zero=False)
        loss().backward()
        opt.step()
        for k, want in EXPECT_LARS[step].items():
            np.testing.assert_allclose(ps[k].numpy(), want, rtol=1e-14, atol=1e-15, err_msg=f'{k} step {step}')
    for k, want in EXPECT_MU2.items():
        np.testing.assert_allclose(opt._accumulators['mu'][ps[k].name].numpy(), want, rtol=1e-13, atol=1e-16)
    assert ps['U'].grad is None and ps['F'].grad is None
    assert np.array_equal(ps['F'].numpy(), INIT['F']) and np.array_equal(ps['U'].numpy(), INIT['U'])
    assert ps['U'].name not in opt._accumulators['mu'] and ps['F'].name not in opt._accumulators['mu']
    assert len(opt.state_dict()) == 3  # one momentum buffer for each parameter that had a gradient


# ------------------------------------------------------------------------------------------ AdamW
def test_adamw_first_step_by_hand():
    """p = 1, g = 0.5, lr 0.1, wd 0.1: decay first (p = 0.99), then m_hat = 0.5, v_hat = 0.25,
    p -= 0.1 * 0.5 / (sqrt(0.25) + 1e-8): epsilon outside the square root, after bias correction."""
    want = 0.99 - 0.1 * 0.5 / (0.5 + 1e-8)
    tp = torch.nn.Parameter(torch.ones(1, dtype=torch.float64))
    o = topt.build_optimizer('adamw', [tp], 0.1, 0.1)
    (0.5 * tp).sum().backward()
    o.step()
    with paddle_dtype('float64'):
        pp = paddle.create_parameter([1], 'float64', default_initializer=paddle.nn.initializer.Constant(1.0))
    o = popt.build_optimizer('adamw', [pp], 0.1, 0.1)
    (0.5 * pp).sum().backward()
    o.step()
    assert tp.item() == pytest.approx(want, rel=1e-15)
    assert float(pp.numpy()[0]) == pytest.approx(want, rel=1e-15)


def _adamw_pair_run(paddle_factory, steps=10, wd=0.3):
    rng = np.random.default_rng(0)
    W, b = rng.standard_normal((5, 7)), rng.standard_normal(5)
    F = rng.standard_normal((3, 3))
    tw, tb = torch.tensor(W, requires_grad=True), torch.tensor(b, requires_grad=True)
    tf = torch.tensor(F, requires_grad=False)
    tu = torch.tensor(F, requires_grad=True)  # trainable, never in the loss
    with paddle_dtype('float64'):
        pw, pb, pf, pu = (paddle.create_parameter(list(a.shape), 'float64') for a in (W, b, F, F))
    for p, a in ((pw, W), (pb, b), (pf, F), (pu, F)):
        p.set_value(a)
    pf.stop_gradient = True
    to = topt.build_optimizer('adamw', [tw, tb, tf, tu], 0.1, wd)
    po = paddle_factory([pw, pb, pf, pu], 0.1, wd)
    for i in range(steps):
        lr = 0.1 * (i + 1) / steps
        for g in to.param_groups:
            g['lr'] = lr
        po.set_lr(lr)
        x = rng.standard_normal((4, 7))
        to.zero_grad()
        torch.tanh(torch.tensor(x) @ tw.T + tb).pow(2).sum().backward()
        to.step()
        po.clear_grad(set_to_zero=False)
        paddle.tanh(paddle.to_tensor(x) @ pw.T + pb).pow(2).sum().backward()
        po.step()
    err = max(np.linalg.norm(p.numpy() - t.detach().numpy()) / np.linalg.norm(t.detach().numpy())
              for p, t in ((pw, tw), (pb, tb)))
    untouched = (np.array_equal(pf.numpy(), F) and np.array_equal(pu.numpy(), F)
                 and np.array_equal(tf.numpy(), F) and np.array_equal(tu.detach().numpy(), F))
    moved = np.linalg.norm(tw.detach().numpy() - W) / np.linalg.norm(W)
    return err, untouched, moved


def test_adamw_matches_torch_float64():
    err, untouched, moved = _adamw_pair_run(lambda ps, lr, wd: popt.build_optimizer('adamw', ps, lr, wd))
    print(f'\nAdamW (ours) vs torch.optim.AdamW, float64, 10 steps: rel L2 {err:.1e} (weights moved {moved:.2f})')
    assert moved > 0.1
    assert err < 1e-14
    assert untouched  # frozen and gradient-less parameters: no weight decay


def test_stock_paddle_adamw_weight_decay_is_float32():
    """Why paddle_impl.optimizer.AdamW exists: the fused kernel gets weight_decay as a float32 attribute."""
    err, untouched, _ = _adamw_pair_run(
        lambda ps, lr, wd: paddle.optimizer.AdamW(learning_rate=lr, parameters=ps, weight_decay=wd))
    print(f'\nstock paddle.optimizer.AdamW vs torch, float64, 10 steps, wd 0.3: rel L2 {err:.1e}')
    assert err > 1e-11 and untouched
    err_exact, _, _ = _adamw_pair_run(
        lambda ps, lr, wd: paddle.optimizer.AdamW(learning_rate=lr, parameters=ps, weight_decay=wd), wd=0.25)
    assert err_exact < 1e-14  # a weight decay exact in float32: the kernel's algorithm is torch's


@contextlib.contextmanager
def _kernel_spy(allow=True):
    """Yields a list that records, per parameter update, whether AdamW took our one-pass kernel
    (``allow=False``: it is never offered, so Paddle's kernel runs)."""
    taken = []
    real = popt.AdamW._fused_state

    def spy(self, pg):
        state = real(self, pg) if allow else None
        taken.append(state is not None)
        return state

    with mock.patch.object(popt.AdamW, '_fused_state', spy):
        yield taken


def _adamw_fused_or_not(fused, dtype, steps=4):
    """Three parameters (a weight, a bias excluded from the decay, a frozen one), AdamW with wd 0.05 for
    ``steps`` steps, with our one-pass kernel (``fused``) or Paddle's kernel plus the separate decay."""
    rng = np.random.default_rng(3)
    with paddle_dtype(dtype):
        w, b, f = (paddle.create_parameter(list(s), dtype) for s in ((6, 5), (5,), (3,)))
    for p in (w, b, f):
        p.set_value(rng.standard_normal(p.shape).astype(dtype))
    f.stop_gradient = True
    opt = popt.AdamW(learning_rate=0.01, parameters=[w, b, f], weight_decay=0.05,
                     apply_decay_param_fun=lambda name: name != b.name)
    with _kernel_spy(allow=fused) as calls:
        for i in range(steps):
            opt.set_lr(0.01 * (i + 1))
            x = paddle.to_tensor(rng.standard_normal((4, 6)).astype(dtype))
            (paddle.tanh(x @ w + b) ** 2).sum().backward()
            opt.step()
            opt.clear_grad()
    return [p.numpy() for p in (w, b, f)], {k: v.numpy() for k, v in opt.state_dict().items()}, calls


def _adamw_run(fused, dtype):
    with unique_name.guard():  # the same parameter and accumulator names in every run
        return _adamw_fused_or_not(fused, dtype)


def test_adamw_one_pass_kernel_equals_paddles_kernel():
    """On CPU our kernel takes every step (decay mask and frozen parameter kept), with the same accumulators
    (names, moments, beta powers) as Paddle's own kernel and, in float64, the same numbers to rounding. In
    float32 ours stays closer to the float64 result: Paddle's kernel forms 1 - beta2 in float32 (0.00099998713
    for 0.999, 1.3e-5 off), torch and ours in double before rounding it once."""
    pk, sk, ck = _adamw_run(True, 'float64')
    pp, sp, cp = _adamw_run(False, 'float64')
    assert ck == [True] * 8 and cp == [False] * 8  # 2 trainable parameters x 4 steps
    assert set(sk) == set(sp) and len(sk) >= 8  # moment1, moment2, beta1^t, beta2^t of 2 parameters
    for a, b in list(zip(pk, pp)) + [(sk[k], sp[k]) for k in sk if isinstance(sk[k], np.ndarray)]:
        assert _rel(a, b) <= 1e-14
    init = np.random.default_rng(3).standard_normal((6, 5))
    assert np.abs(pk[0] - init).max() > 1e-3  # the weights moved
    p32, s32, c32 = _adamw_run(True, 'float32')
    q32, t32, _ = _adamw_run(False, 'float32')
    assert c32 == [True] * 8
    ours = max([_rel(a, b) for a, b in zip(p32, pk)] +
               [_rel(s32[k], sk[k]) for k in sk if isinstance(sk[k], np.ndarray)])
    paddles = max(_rel(t32[k], sk[k]) for k in sk if isinstance(sk[k], np.ndarray))
    print(f'\nAdamW float32 vs float64, 4 steps, largest relative error: ours {ours:.1e}, Paddle kernel {paddles:.1e}')
    assert ours <= 4e-6 < paddles


def _takes_kernel(**kw):
    p = paddle.create_parameter([3], 'float32')
    opt = popt.AdamW(parameters=[p], **{k: v for k, v in kw.items() if k != 'lr_ratio'})
    if 'lr_ratio' in kw:
        opt._lr_ratio = kw['lr_ratio']
    (p * p).sum().backward()
    with _kernel_spy() as taken:
        opt.step()
    return taken == [True]


def test_adamw_kernel_not_for_what_it_cannot_do():
    """Paddle's kernel (not ours) for amsgrad, lazy mode, lr_ratio and where our kernels are off."""
    assert _takes_kernel()
    assert not _takes_kernel(amsgrad=True)
    assert not _takes_kernel(lazy_mode=True)
    assert not _takes_kernel(lr_ratio=lambda param: 0.5)
    with mock.patch('paddle_impl.cpu_kernels.get', return_value=None):
        assert not _takes_kernel()


def test_build_optimizer_names():
    p = paddle.create_parameter([2, 2], 'float32')
    assert isinstance(popt.build_optimizer('lars', [p], 0.1, 1e-6), popt.LARS)
    assert isinstance(popt.build_optimizer('adamw', [p], 0.1, 0.1), popt.AdamW)
    t = torch.nn.Parameter(torch.zeros(2))
    assert isinstance(topt.build_optimizer('lars', [t], 0.1, 1e-6), topt.LARS)
    assert isinstance(topt.build_optimizer('adamw', [t], 0.1, 0.1), torch.optim.AdamW)
    for build, arg in ((popt.build_optimizer, [p]), (topt.build_optimizer, [t])):
        with pytest.raises(ValueError, match='unknown optimizer'):
            build('sgd', arg, 0.1, 0.0)
    o = popt.build_optimizer('lars', [p], 0.0, 0.0)
    o.set_lr(0.25)
    assert o.get_lr() == 0.25


# ------------------------------------------------------------------------------------------ GradScaler
class _GpuLikePlace:
    """Lets paddle.amp.GradScaler enable itself on a CPU (it refuses to otherwise): the unscale and
    inf-check ops it runs have CPU kernels, so its bookkeeping around optimizer.step() can be tested."""

    def __init__(self, place):
        self.place = place

    def is_gpu_place(self):
        return True

    def is_xpu_place(self):
        return False

    def is_custom_place(self):
        return False


def _scaler_on_cpu(**kw):
    tracer = grad_scaler._dygraph_tracer()
    fake = type('T', (), {'_expected_place': _GpuLikePlace(tracer._expected_place)})()
    with mock.patch.object(grad_scaler, '_dygraph_tracer', lambda: fake):
        return paddle.amp.GradScaler(**kw)


def _scaler_run(name, mode, steps=3, found_inf_at=None):
    paddle.seed(0)
    net = paddle.nn.Sequential(paddle.nn.Linear(4, 8), paddle.nn.ReLU(), paddle.nn.Linear(8, 2))
    opt = popt.build_optimizer(name, net.parameters(), 0.1, 0.01)
    x = paddle.to_tensor(np.random.default_rng(0).standard_normal((5, 4)).astype('float32'))
    scaler = _scaler_on_cpu(init_loss_scaling=1024.) if mode != 'plain' else None
    if scaler is not None:
        assert scaler.is_enable()
    snap = None
    for i in range(steps):
        loss = (net(x) ** 2).mean()
        if i == found_inf_at:
            snap = ([p.numpy().copy() for p in net.parameters()],
                    {k: v.numpy().copy() for k, v in opt.state_dict().items()})
            # what GradScaler.step/minimize hand the optimizer when a scaled gradient overflowed
            loss.backward()
            opt._set_auxiliary_var('found_inf', paddle.to_tensor([True]))
            opt.step()
            opt._set_auxiliary_var('found_inf', paddle.to_tensor([False]))
        elif mode == 'plain':
            loss.backward()
            opt.step()
        elif mode == 'step':
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
        else:
            scaled = scaler.scale(loss)
            scaled.backward()
            scaler.minimize(opt, scaled)
        opt.clear_grad()
    params = [p.numpy().copy() for p in net.parameters()]
    state = {k: v.numpy().copy() for k, v in opt.state_dict().items()}
    return params, state, snap


@pytest.mark.parametrize('name', ['lars', 'adamw'])
def test_grad_scaler_step_and_minimize(name):
    plain, _, _ = _scaler_run(name, 'plain')
    for mode in ('step', 'minimize'):
        scaled, _, _ = _scaler_run(name, mode)
        # a power-of-two loss scale is undone exactly: the same weights, bit for bit
        assert all(np.array_equal(a, b) for a, b in zip(plain, scaled)), mode


@pytest.mark.parametrize('name', ['lars', 'adamw'])
def test_found_inf_skips_the_whole_step(name):
    """GradScaler tells the optimizer of an overflow through ``found_inf``; the step (weight decay
    included) must then leave weights and state untouched. (On this CPU build the scaler's own
    inf check does not fire, so the flag is set as the scaler sets it.)"""
    params, state, (snap_params, snap_state) = _scaler_run(name, 'plain', steps=3, found_inf_at=2)
    assert all(np.array_equal(a, b) for a, b in zip(params, snap_params))
    assert set(state) == set(snap_state) and all(np.array_equal(state[k], snap_state[k]) for k in state)


# ------------------------------------------------------------------------------------------ resume
ARCH_KW = dict(dim=16, mlp_dim=32, T=0.2, img_size=32, stop_grad_conv1=True, depth=1)
LR = {'lars': (0.6, 1e-6), 'adamw': (2.4e-3, 0.1)}


def _views(i):
    rng = np.random.default_rng(100 + i)
    return rng.standard_normal((2, 4, 3, 32, 32)).astype('float32')


def _torch_train(model, opt, name, start, stop):
    lr, _ = LR[name]
    for i in range(start, stop):
        e = i / 3
        tsched.adjust_learning_rate(opt, e, lr, 1, 4)
        x = torch.from_numpy(_views(i))
        loss = model(x[0], x[1], tsched.adjust_moco_momentum(e, 0.99, 4))
        opt.zero_grad()
        loss.backward()
        opt.step()


def _paddle_train(model, opt, name, start, stop):
    lr, _ = LR[name]
    for i in range(start, stop):
        e = i / 3
        psched.adjust_learning_rate(opt, e, lr, 1, 4)
        x = paddle.to_tensor(_views(i))
        loss = model(x[0], x[1], psched.adjust_moco_momentum(e, 0.99, 4))
        opt.clear_grad(set_to_zero=False)
        loss.backward()
        opt.step()


@pytest.mark.parametrize('name', ['lars', 'adamw'])
def test_resume_bit_for_bit_torch(name, tmp_path):
    lr, wd = LR[name]

    def fresh(seed):
        torch.manual_seed(seed)
        m = tm.build_moco('vit_small', **ARCH_KW)
        return m, topt.build_optimizer(name, m.parameters(), lr, wd)

    ma, oa = fresh(0)
    _torch_train(ma, oa, name, 0, 6)
    mb, ob = fresh(0)
    _torch_train(mb, ob, name, 0, 3)
    torch.save({'state_dict': mb.state_dict(), 'optimizer': ob.state_dict()}, tmp_path / 'ckpt.pth.tar')
    mc, oc = fresh(1)  # other weights, fresh optimizer: everything comes from the checkpoint
    ck = torch.load(tmp_path / 'ckpt.pth.tar', weights_only=True)
    mc.load_state_dict(ck['state_dict'])
    oc.load_state_dict(ck['optimizer'])
    _torch_train(mc, oc, name, 3, 6)
    for (k, a), b in zip(ma.state_dict().items(), mc.state_dict().values()):
        assert torch.equal(a, b), k
    for p, q in zip(ma.parameters(), mc.parameters()):
        sa, sc = oa.state.get(p, {}), oc.state.get(q, {})
        assert sa.keys() == sc.keys() and all(torch.equal(torch.as_tensor(sa[k]), torch.as_tensor(sc[k])) for k in sa)


@pytest.mark.parametrize('name', ['lars', 'adamw'])
def test_resume_bit_for_bit_paddle(name, tmp_path):
    """Each run is built inside its own unique_name.guard(), as a fresh process would build it: Paddle
    keys optimizer state by generated parameter names (``linear_3.w_0_moment1_0``), which differ for a
    second model built in the same process."""
    lr, wd = LR[name]

    def run(seed, start, stop, ckpt_in=None, ckpt_out=None):
        with unique_name.guard():
            paddle.seed(seed)
            m = pm.build_moco('vit_small', **ARCH_KW)
            o = popt.build_optimizer(name, m.parameters(), lr, wd)
            if ckpt_in:
                ck = paddle.load(str(ckpt_in))  # our own file; paddle.load must not see untrusted ones
                m.set_state_dict(ck['state_dict'])
                o.set_state_dict(ck['optimizer'])
            _paddle_train(m, o, name, start, stop)
            if ckpt_out:
                paddle.save({'state_dict': m.state_dict(), 'optimizer': o.state_dict()}, str(ckpt_out))
            return ({k: v.numpy() for k, v in m.state_dict().items()},
                    {k: v.numpy() for k, v in o.state_dict().items() if hasattr(v, 'numpy')})

    sd_a, st_a = run(0, 0, 6)
    run(0, 0, 3, ckpt_out=tmp_path / 'ckpt.pdparams')
    sd_c, st_c = run(1, 3, 6, ckpt_in=tmp_path / 'ckpt.pdparams')
    assert sd_a.keys() == sd_c.keys() and st_a.keys() == st_c.keys() and len(st_a) > 0
    for k in sd_a:
        assert np.array_equal(sd_a[k], sd_c[k]), k
    for k in st_a:
        assert np.array_equal(st_a[k], st_c[k]), k
