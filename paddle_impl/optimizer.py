"""Optimizers of the official MoCo v3 in Paddle: the twin of torch_ref/optimizer.py.

LARS (layer-wise adaptive rate scaling, no rate scaling for biases and norms):
  for every parameter with a gradient and ndim > 1:
      g = g + wd * p
      q = tc * ||p|| / ||g||   if ||p|| > 0 and ||g|| > 0, else 1
      g = g * q
  for every parameter with a gradient:
      mu = momentum * mu + g
      p = p - lr * mu
Parameters with ndim <= 1 (biases, norm gains/shifts) get neither weight decay nor scaling.

Both optimizers are ``paddle.optimizer.Optimizer`` subclasses: ``step()``, ``clear_grad()``,
``state_dict()`` / ``set_state_dict()``, ``get_lr()`` / ``set_lr()`` and ``paddle.amp.GradScaler``'s
``scaler.step(opt)`` / ``scaler.minimize(opt, loss)`` (which skip the whole step on inf/nan) work as for
Paddle's own. Parameters with ``stop_gradient=True`` or without a gradient are left untouched.

AdamW: Paddle's fused ``adamw`` kernel computes what torch.optim.AdamW computes (bias correction,
epsilon added to sqrt(v_hat), decay p *= 1 - lr*wd before the Adam update; measured equal to 1e-16 in
float64), but it receives the weight decay as a float32 attribute: wd = 0.1 becomes 0.10000000149, an
error of ~1e-8 in the decay term (measured: 1e-10 relative per step in float64). ``AdamW`` below
therefore applies the decoupled decay itself, in the parameter's dtype, and runs the fused kernel with
a decay of 0. In float32 both ways agree to rounding.

On the CPU (float32/float64, eager; not for amsgrad, lazy mode or a per-parameter lr ratio) ``AdamW`` runs
one pass of our kernel instead (csrc/kernels_impl.h ``adamw_k``): decay, moments and update with torch's
formula, multi-threaded, on Paddle's own accumulators (moment1, moment2, beta1/beta2 powers, which it
advances as Paddle's kernel does), so checkpoints are the same. ViT-S MoCo, 43 M parameters, 2 threads:
77 -> 39 ms per step. In float64 it equals Paddle's kernel to 1e-14; in float32 it is the closer of the two
to torch (Paddle's kernel forms 1 - beta2 in float32: 0.00099998713 for 0.999).
"""
import paddle

from . import cpu_kernels

OPTIMIZERS = ('lars', 'adamw')


def _no_groups(parameters, cls):
    if parameters is not None and len(parameters) > 0 and isinstance(parameters[0], dict):
        raise ValueError(f'{cls}: parameter groups are not supported (official MoCo v3 passes model.parameters())')


def _lr_value(lr):
    return lr if isinstance(lr, paddle.optimizer.lr.LRScheduler) else float(lr)


class LARS(paddle.optimizer.Optimizer):
    """LARS as in MoCo v3: SGD with momentum whose update of each >1-D parameter is rescaled to
    ``trust_coefficient * ||p||`` (after adding weight decay to its gradient). State: one ``mu``
    accumulator per parameter (torch: ``state[p]['mu']``)."""

    _mu_acc_str = 'mu'

    def __init__(self, params, lr=0, weight_decay=0, momentum=0.9, trust_coefficient=0.001, name=None):
        params = list(params) if params is not None else None
        _no_groups(params, 'LARS')
        super().__init__(learning_rate=_lr_value(lr), parameters=params, weight_decay=None, grad_clip=None,
                         name=name)
        self.type = 'lars'
        self._lars_weight_decay = float(weight_decay)
        self._momentum = float(momentum)
        self._trust_coefficient = float(trust_coefficient)

    def _create_accumulators(self, block, parameters):
        for p in parameters:
            if p.name in self._already_create_accumulator:
                continue
            self._add_accumulator(self._mu_acc_str, p)
            self._already_create_accumulator.add(p.name)

    def _append_optimize_op(self, block, param_and_grad):
        if not paddle.in_dynamic_mode():
            raise NotImplementedError('LARS runs in dynamic (eager) mode only')
        p, g = param_and_grad
        lr = self._create_param_lr(param_and_grad)
        mu = self._get_accumulator(self._mu_acc_str, p)
        if cpu_kernels.usable(p, g, mu) and g.is_contiguous() and p.is_contiguous() and mu.is_contiguous():
            # the same update in one multi-threaded kernel (csrc/cpu_kernels.cc: lars_k)
            cpu_kernels.run_inplace(cpu_kernels.get().moco_lars_, p, g, mu, float(lr), self._lars_weight_decay,
                                    self._momentum, self._trust_coefficient, p.ndim > 1)
            return None
        if p.ndim > 1:  # not a bias nor a norm parameter
            g = g + self._lars_weight_decay * p
            # ||t|| as sqrt(t . t): a BLAS dot product (0.15 ms for a 512x512x3x3 weight here, where
            # paddle.linalg.norm takes 11.6 ms on one thread)
            p_norm = _norm(p)
            g_norm = _norm(g)
            one = paddle.ones_like(p_norm)
            q = paddle.where(p_norm > 0.,
                             paddle.where(g_norm > 0., self._trust_coefficient * p_norm / g_norm, one),
                             one)
            g = g * q
        mu.scale_(self._momentum).add_(g)
        p.subtract_(lr.astype(p.dtype) * mu)
        return None


def _norm(t):
    f = t.flatten()
    return paddle.sqrt(paddle.matmul(f, f))


class AdamW(paddle.optimizer.AdamW):
    """paddle.optimizer.AdamW with torch.optim.AdamW's defaults (betas 0.9/0.999, eps 1e-8) and its
    decoupled weight decay applied in the parameter's dtype (see the module docstring). Accumulators
    (``moment1``, ``moment2``, ``beta1_pow_acc``, ``beta2_pow_acc``) and checkpoints are Paddle's own."""

    def __init__(self, learning_rate=0.001, beta1=0.9, beta2=0.999, epsilon=1e-8, parameters=None,
                 weight_decay=0.01, apply_decay_param_fun=None, grad_clip=None, lazy_mode=False,
                 multi_precision=False, amsgrad=False, name=None):
        if not isinstance(weight_decay, (int, float)):
            raise TypeError(f'AdamW: weight_decay must be a number, got {type(weight_decay).__name__}')
        parameters = list(parameters) if parameters is not None else None
        _no_groups(parameters, 'AdamW')
        super().__init__(learning_rate=_lr_value(learning_rate), beta1=beta1, beta2=beta2, epsilon=epsilon,
                         parameters=parameters, weight_decay=0.0, apply_decay_param_fun=apply_decay_param_fun,
                         grad_clip=grad_clip, lazy_mode=lazy_mode, multi_precision=multi_precision,
                         amsgrad=amsgrad, name=name)
        self._decoupled_weight_decay = float(weight_decay)

    def _append_optimize_op(self, block, param_and_grad):
        p = param_and_grad[0]
        wd = self._decoupled_weight_decay
        decays = wd != 0.0 and (self._apply_decay_param_fun is None or self._apply_decay_param_fun(p.name))
        state = self._fused_state(param_and_grad)
        if state is not None:
            # the decay and the Adam update in one multi-threaded pass, torch's formula (csrc/kernels_impl.h
            # adamw_k) on Paddle's accumulators, which it advances as Paddle's kernel does
            lr = float(self._create_param_lr(param_and_grad))
            cpu_kernels.run_inplace(cpu_kernels.get().moco_adamw_, p, param_and_grad[1], *state, lr,
                                    float(self._beta1), float(self._beta2), float(self._epsilon),
                                    wd if decays else 0.0)
            return None
        if decays:
            if not paddle.in_dynamic_mode():
                raise NotImplementedError('AdamW with weight decay runs in dynamic (eager) mode only')
            lr = self._create_param_lr(param_and_grad)
            master = self._multi_precision and self._is_dtype_fp16_or_bf16(p.dtype)
            target = self._master_weights[p.name] if master else p
            # torch: p.mul_(1 - lr * weight_decay), before the Adam update
            target.multiply_(1.0 - lr.astype(target.dtype) * wd)
        return super()._append_optimize_op(block, param_and_grad)

    def _fused_state(self, param_and_grad):
        """[moment1, moment2, beta1_pow, beta2_pow] where our one-pass kernel applies (eager, CPU float32/64,
        contiguous, the same dtype throughout; no lazy mode, amsgrad, lr_ratio or master weights), else None."""
        p, g = param_and_grad
        if (not paddle.in_dynamic_mode() or self._lazy_mode or self._amsgrad or self._lr_ratio is not None
                or not isinstance(self._beta1, (int, float)) or not isinstance(self._beta2, (int, float))
                or not cpu_kernels.usable(p, g)):
            return None
        state = [self._get_accumulator_master(name, p) for name in (
            self._moment1_acc_str, self._moment2_acc_str, self._beta1_pow_acc_str, self._beta2_pow_acc_str)]
        if not all(t.place.is_cpu_place() and t.dtype == p.dtype and t.is_contiguous() for t in state + [g, p]):
            return None
        return state


def build_optimizer(name, parameters, lr, weight_decay, momentum=0.9):
    """The optimizer of official main_moco: ``LARS(params, lr, weight_decay, momentum)`` or AdamW(params,
    lr, weight_decay) with torch's defaults. ``lr`` is the already batch-scaled rate; the schedule
    overwrites it every iteration (``schedules.adjust_learning_rate``)."""
    if name == 'lars':
        return LARS(parameters, lr, weight_decay=weight_decay, momentum=momentum)
    if name == 'adamw':
        return AdamW(learning_rate=lr, parameters=parameters, weight_decay=weight_decay)
    raise ValueError(f"unknown optimizer '{name}'; known: {', '.join(OPTIMIZERS)}")
