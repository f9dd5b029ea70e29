"""Paddle layers with PyTorch's numerics where Paddle's built-ins differ.

BatchNorm: Paddle's kernel updates the running variance with the biased batch variance (divide by n);
torch (and so the official MoCo v3) uses the unbiased one (n - 1). Normalisation itself uses the biased
variance on both. These subclasses keep Paddle's fused kernel and redo the running-statistics update
after it, as torch does (see _UnbiasedVarMixin).

CPU fast paths (FastLinear, GELU, transpose): the same numbers through faster Paddle kernels; see below.
``MOCO_FAST_LAYERS=0`` turns them off (Paddle's own ops, as a GPU runs them).
"""
import math
import os

import numpy as np
import paddle
import paddle.nn as nn
import paddle.nn.functional as F
from paddle.autograd import PyLayer

from . import cpu_kernels


def torch_momentum(m):
    """torch's BN momentum (weight of the new value) -> Paddle's (weight of the old value)."""
    return 1.0 - m


def reduce_count(x):
    """Elements per channel that BN's batch statistics are taken over (N * spatial), from the static
    shape: ``x.numel()`` is a tensor on the device, and ``int()`` of it makes the CPU wait for the GPU
    (Paddle issue #51502) in every BN call. An unknown (-1) dimension, only met while a static graph is
    being traced, falls back to numel."""
    dims = [int(d) for d in x.shape]
    if any(d < 0 for d in dims):
        return int(x.numel()) // dims[1]
    n = dims[0]
    for d in dims[2:]:
        n *= d
    return n


def _bn_kernel(x, running_mean, running_var, weight, bias, momentum, epsilon, data_format):
    """Paddle's fused BN in training mode (what nn.BatchNorm*D.forward runs): normalises ``x`` with its batch
    statistics and updates ``running_mean``/``running_var`` in place, with ``momentum`` the weight of the old
    value. The one place our layers call the kernel (the probe below asks the same function)."""
    return F.batch_norm(x, running_mean, running_var, weight=weight, bias=bias, training=True, momentum=momentum,
                        epsilon=epsilon, data_format=data_format, use_global_stats=False)


_KERNEL_STORES_UNBIASED = {}


def _require_two_values(n, shape):
    """BN's batch statistics need more than one value per channel (torch refuses the same)."""
    if n < 2:
        raise ValueError(f'BatchNorm in training mode needs more than one value per channel, got input '
                         f'{[int(d) for d in shape]}')


def kernel_stores_unbiased(x, stat_dtype, data_format='NCHW', kernel=None, world=1):
    """Does Paddle's BN kernel, for an input like ``x`` (place, dtype, shape, layout) and running statistics
    of ``stat_dtype``, update the running variance with the UNBIASED batch variance (divide by n - 1)?

    Decided once per such key by a probe: one kernel call on a batch of x's shape whose every channel holds
    +1 and -1 once and zeros elsewhere (mean 0, biased variance 2/n, unbiased 2/(n-1)), running statistics
    starting at 0 with momentum 0.5, so that the stored variance is half the batch variance the kernel used.
    Why per shape and not only per device: Paddle's CPU kernel stores the biased variance; on CUDA it calls
    cuDNN (which stores the unbiased one) for most shapes but its own kernels (biased) for 2-D inputs with
    N >= 131070 and for 3-D inputs past a size threshold (phi/kernels/gpu/batch_norm_kernel.cu).
    ``kernel``: another BN kernel of _bn_kernel's signature (the synchronised one, utils.SyncBatchNormMixin),
    run on all ``world`` processes at once (each holds the same probe: global n = world * n)."""
    shape = [int(d) for d in x.shape]
    key = (str(x.place), str(x.dtype), str(stat_dtype), tuple(shape), data_format, kernel, world)
    if key in _KERNEL_STORES_UNBIASED:
        return _KERNEL_STORES_UNBIASED[key]
    ch_axis = 1 if data_format.startswith('NC') else len(shape) - 1
    c = shape[ch_axis]
    n = reduce_count(x)
    _require_two_values(n, shape)
    pattern = np.zeros(n, dtype=np.float32)
    pattern[0], pattern[1] = 1.0, -1.0
    one_ch = shape[:ch_axis] + [1] + shape[ch_axis + 1:]
    with paddle.no_grad():
        xp = paddle.expand(paddle.to_tensor(pattern.reshape(one_ch), place=x.place).astype(x.dtype), shape)
        rm, rv, b = (paddle.to_tensor(np.zeros(c), dtype=stat_dtype, place=x.place) for _ in range(3))
        w = paddle.to_tensor(np.ones(c), dtype=stat_dtype, place=x.place)
        (kernel or _bn_kernel)(xp, rm, rv, w, b, 0.5, 1e-5, data_format)
        stored = 2.0 * float(rv.astype('float64').mean())
    biased, unbiased = 2.0 / n, 2.0 * world / (n * world - 1)

    def near(ref):
        return math.isfinite(stored) and abs(stored - ref) <= 0.25 * ref
    if not (near(biased) or near(unbiased)):
        raise RuntimeError(f'BatchNorm probe: the kernel on {x.place} ({x.dtype}, input {shape}) stored a '
                           f'batch variance of {stored:.6g} for a batch whose variance is {biased:.6g} '
                           f'(biased) / {unbiased:.6g} (unbiased): cannot restore torch\'s running variance')
    answer = abs(stored - unbiased) < abs(stored - biased)
    _KERNEL_STORES_UNBIASED[key] = answer
    return answer


def restore_torch_running_stats(bn, old_mean, old_var, n, unbiased_stored):
    """After a kernel updated ``bn``'s running statistics from ``old_mean``/``old_var`` with the batch statistics
    of ``n`` values per channel, redo the update as torch does: batch mean and variance are recovered exactly
    from the kernel's result (with the float32 momentum the kernel used), the variance made unbiased where the
    kernel stored the biased one, and running = (1 - mom) * running + mom * batch with torch's momentum, in
    the statistics' own precision. No device sync: tensor arithmetic only."""
    with paddle.no_grad():
        m32 = float(np.float32(bn._momentum))  # what the kernel used
        batch_mean = (bn._mean - m32 * old_mean) / (1.0 - m32)
        batch_var = (bn._variance - m32 * old_var) / (1.0 - m32)
        if not unbiased_stored:
            batch_var = batch_var * (n / (n - 1))
        mom = bn._torch_momentum
        bn._mean.set_value((1.0 - mom) * old_mean + mom * batch_mean)
        bn._variance.set_value((1.0 - mom) * old_var + mom * batch_var)


def _bn_forward_k(x, bn):
    """[y, batch mean, batch rstd] of BN in training mode (our moco_batch_norm_; float32 NCHW only, see
    _bn_k_applies); bn's running statistics updated in place as torch does, in the same call. Paddle's BN
    kernels run on one thread (in a ResNet-50 step on a 2-core Intel Xeon its backward took 2.1 ms per call
    against torch's 1.3 ms); the backward is moco_batch_norm_backward, through norm_k."""
    return cpu_kernels.get().moco_batch_norm_(x, bn.weight, bn.bias, bn._mean, bn._variance, float(bn._epsilon),
                                              float(bn._torch_momentum))[:3]


def _bn_k_applies(bn, x):
    """_bn_forward_k (through norm_k) for this training-mode call: CPU float32, 4-D NCHW, affine, torch's momentum
    known, running statistics in float32, our kernels and fast layers on."""
    return (x.ndim == 4 and bn._data_format == 'NCHW' and x.dtype == paddle.float32 and bn.weight is not None
            and bn.bias is not None and hasattr(bn, '_torch_momentum') and bn._mean.dtype == paddle.float32
            and bn._variance.dtype == paddle.float32 and _fast_cpu(x)
            and cpu_kernels.usable(x, bn.weight, bn.bias))


class _UnbiasedVarMixin:
    """Runs Paddle's fused BN kernel, then rewrites the running statistics as torch computes them.

    Two differences are put right: the unbiased variance (above; whether the kernel already stored it is
    asked of the kernel itself, see kernel_stores_unbiased), and precision: the kernel applies the
    momentum as a float32 attribute (0.9 -> 0.89999998), a 2e-7 relative error on the running statistics
    that float64 parity sees. From the kernel's result and the old values, the batch mean and biased
    variance are recovered exactly and the update is redone in the tensor's own precision:
    running = (1 - mom) * running + mom * batch_stat, with torch's momentum ``mom``.
    """

    def _reduce_count(self, x):
        return reduce_count(x)

    def forward(self, x):
        if x.dtype == paddle.float64:
            return self._forward_float64(x)
        if not self.training or self._use_global_stats:
            return super().forward(x)
        self._check_input_dim(x)
        n = self._reduce_count(x)
        if _bn_k_applies(self, x):
            _require_two_values(n, x.shape)
            return norm_k(x, self.weight, self.bias, lambda xc: _bn_forward_k(xc, self), 'moco_batch_norm_backward')
        unbiased_stored = kernel_stores_unbiased(x, self._variance.dtype, self._data_format)
        old_mean, old_var = self._mean.clone(), self._variance.clone()
        y = _bn_kernel(x, self._mean, self._variance, self.weight, self.bias, self._momentum, self._epsilon,
                       self._data_format)
        restore_torch_running_stats(self, old_mean, old_var, n, unbiased_stored)
        return y

    def _forward_float64(self, x):
        """BN from its definition, so that epsilon stays a float64 number (the kernel holds it as float32:
        1e-5 -> 9.99999975e-6, visible in float64 where a channel's variance is near epsilon)."""
        C = int(x.shape[1])
        shape = [1, C] + [1] * (x.ndim - 2)
        axes = [0] + list(range(2, x.ndim))
        if self.training and not self._use_global_stats:
            mean = x.mean(axis=axes)
            xc = x - mean.reshape(shape)
            var = (xc * xc).mean(axis=axes)
            n = self._reduce_count(x)
            mom = self._torch_momentum
            with paddle.no_grad():
                unbiased = var.detach() * (n / (n - 1)) if n > 1 else var.detach()
                self._mean.set_value((1.0 - mom) * self._mean + mom * mean.detach())
                self._variance.set_value((1.0 - mom) * self._variance + mom * unbiased)
        else:
            xc = x - self._mean.reshape(shape)
            var = self._variance
        y = xc / paddle.sqrt(var.reshape(shape) + self._epsilon)
        if self.weight is not None:
            y = y * self.weight.reshape(shape)
        if self.bias is not None:
            y = y + self.bias.reshape(shape)
        return y


class BatchNorm1D(_UnbiasedVarMixin, nn.BatchNorm1D):
    """nn.BatchNorm1D with torch's defaults (eps 1e-5, momentum 0.1) and its unbiased running variance.

    ``affine=False`` gives a BN without weight and bias, as torch's ``BatchNorm1d(d, affine=False)``.
    """

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True):
        kw = {} if affine else dict(weight_attr=False, bias_attr=False)
        super().__init__(num_features, momentum=torch_momentum(momentum), epsilon=eps, **kw)
        self._torch_momentum = momentum


class BatchNorm2D(_UnbiasedVarMixin, nn.BatchNorm2D):
    """nn.BatchNorm2D with torch's defaults and its unbiased running variance."""

    def __init__(self, num_features, eps=1e-5, momentum=0.1):
        super().__init__(num_features, momentum=torch_momentum(momentum), epsilon=eps)
        self._torch_momentum = momentum


def replace_batchnorm2d(layer):
    """Swap every plain nn.BatchNorm2D inside ``layer`` for BatchNorm2D above (same shapes, fresh init)."""
    for name, child in list(layer.named_children()):
        if type(child) is nn.BatchNorm2D:
            setattr(layer, name, BatchNorm2D(child._num_features, eps=child._epsilon,
                                             momentum=1.0 - child._momentum))
        else:
            replace_batchnorm2d(child)
    return layer


BN_STAT_NAMES = ('_mean', '_variance')


def model_parameters(layer):
    """What torch calls ``module.parameters()``: Paddle also lists BatchNorm running statistics
    (``_mean``/``_variance``) among a layer's parameters; these are buffers in torch and are left out."""
    return [p for n, p in layer.named_parameters() if n.rsplit('.', 1)[-1] not in BN_STAT_NAMES]


def _uniform_(param, bound):
    param.set_value(paddle.uniform(param.shape, dtype=param.dtype, min=-bound, max=bound))


def torch_default_init_(layer):
    """Re-initialise a Linear or Conv2D as torch does by default (kaiming_uniform(a=sqrt(5)), i.e.
    U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for the weight, and the same bound for the bias)."""
    w = layer.weight
    if isinstance(layer, nn.Linear):
        fan_in = w.shape[0]  # Paddle Linear weight is [in, out]
    else:
        fan_in = int(w.shape[1]) * int(w.shape[2]) * int(w.shape[3])
    bound = 1.0 / fan_in ** 0.5
    _uniform_(w, bound)
    if getattr(layer, 'bias', None) is not None:
        _uniform_(layer.bias, bound)
    return layer


def Linear(in_features, out_features, bias=True):
    """nn.Linear initialised as torch's nn.Linear."""
    return torch_default_init_(nn.Linear(in_features, out_features, bias_attr=None if bias else False))


class LayerNorm(nn.LayerNorm):
    """nn.LayerNorm; in float64 computed from its definition so that epsilon stays a float64 number.

    Paddle's fused kernel holds epsilon as a float32 attribute (1e-6 -> 9.99999997e-7). Where the
    normalised variance is tiny, epsilon dominates and that rounding shows: the ViT's class token is
    N(0, 1e-6) at init and its position-embedding slot is zero, so block 0 normalises a token of variance
    ~1e-12 and its gradient moved by ~1e-9 relative (measured) against torch. Float32/16 use the kernel.
    On CPU, where a gradient is needed, the backward is _LayerNormFn's (faster than Paddle's kernel).
    """

    def forward(self, x):
        if (self.weight is not None and self.bias is not None and len(self._normalized_shape) == 1
                and cpu_kernels.usable(x, self.weight, self.bias)):
            return layer_norm_k(x, self.weight, self.bias, float(self._epsilon))
        if (_fast_cpu(x) and self.weight is not None and self.bias is not None
                and len(self._normalized_shape) == 1 and _needs_grad(x, self.weight, self.bias)):
            return _LayerNormFn.apply(x, self.weight, self.bias, float(self._epsilon))
        return _layer_norm(x, self.weight, self.bias, self._epsilon, self._normalized_shape,
                           super().forward)


def _layer_norm(x, weight, bias, epsilon, normalized_shape=None, kernel=None):
    if x.dtype != paddle.float64:
        if kernel is not None:
            return kernel(x)
        return F.layer_norm(x, normalized_shape or x.shape[-1:], weight, bias, epsilon)
    mean = x.mean(axis=-1, keepdim=True)
    xc = x - mean
    var = (xc * xc).mean(axis=-1, keepdim=True)
    y = xc / paddle.sqrt(var + epsilon)
    if weight is not None:
        y = y * weight
    if bias is not None:
        y = y + bias
    return y


class _LayerNormFn(PyLayer):
    """LayerNorm over the last axis (forward as LayerNorm.forward); the backward written out so that no
    step is one of Paddle's slow CPU paths: row means and the weight/bias gradients as GEMVs (ones
    vectors), the per-row statistics broadcast as rank-1 products. Measured at ViT-S shape, batch 8,
    forward + backward: 6.9 ms with the kernel, 4.7 ms so (torch: 1.2 ms)."""

    @staticmethod
    def forward(ctx, x, weight, bias, epsilon):
        ctx.save_for_backward(x, weight)
        ctx.epsilon = epsilon
        ctx.needs = (not x.stop_gradient, not weight.stop_gradient, not bias.stop_gradient)
        return _layer_norm(x, weight, bias, epsilon)

    @staticmethod
    def backward(ctx, dy):
        x, weight = ctx.saved_tensor()
        need_x, need_w, need_b = ctx.needs
        C = x.shape[-1]
        x2, dy2 = x.reshape([-1, C]), dy.reshape([-1, C])
        ones_c = paddle.ones([1, C], dtype=x.dtype)
        ones_m = paddle.ones([1, x2.shape[0]], dtype=x.dtype)

        def row_mean(t):  # [M, C] -> [M, 1]
            return paddle.matmul(t, ones_c, transpose_y=True) * (1.0 / C)

        def spread(col):  # [M, 1] -> [M, C]
            return paddle.matmul(col, ones_c)

        xc = x2 - spread(row_mean(x2))
        rstd = paddle.rsqrt(row_mean(xc * xc) + ctx.epsilon)
        xhat = xc * spread(rstd)
        dx = dw = db = None
        if need_x:
            g = dy2 * paddle.matmul(ones_m, weight.unsqueeze(0), transpose_x=True)
            dx = ((g - spread(row_mean(g)) - xhat * spread(row_mean(g * xhat))) * spread(rstd)).reshape(x.shape)
        if need_w:
            dw = paddle.matmul(ones_m, dy2 * xhat).reshape([-1])
        if need_b:
            db = paddle.matmul(ones_m, dy2).reshape([-1])
        return dx, dw, db


# ----------------------------------------------------------------------------------------------------------
# CPU fast paths. A few of Paddle's CPU kernels are far slower than the arithmetic they do (measured on a
# 2-core AMD EPYC, one thread, ViT-S/16 shapes at batch 16, against torch on the same shapes):
#   - a bias gradient, i.e. a sum over rows ([3152, 1536]: 24 ms; the same sum as a GEMV: 1 ms; a ViT-S
#     fc1 forward + backward at batch 8 on 2 threads: 48 ms with F.linear, 32 ms below, 29 ms without bias);
#   - exact GELU's backward ([16, 197, 1536]: ~50 ms; torch 13 ms; from erf/exp kernels: ~15 ms);
#   - making a transposed view contiguous (Paddle 3 transposes lazily with stride kernels; the strided copy
#     of [16, 197, 36, 32] takes 35 ms, the dense transpose kernel 2.4 ms, torch 2.3 ms).
# Each function below computes the same quantity (float64 parity covers them) through the fast kernels, on
# CPU and in float32/float64 only; elsewhere it is the plain op.

_SQRT1_2 = 1.0 / math.sqrt(2.0)
_LOG_INV_SQRT_2PI = -0.5 * math.log(2.0 * math.pi)


_FAST_LAYERS = {'on': None}  # None: read MOCO_FAST_LAYERS at the first call


def fast_layers_enabled():
    """The CPU fast paths of this section are on unless ``MOCO_FAST_LAYERS=0`` (or set_fast_layers(False)):
    off, every layer runs Paddle's own ops, as on a GPU (with MOCO_CPU_KERNELS=0 also: `python -m parity
    --paddle-ops`)."""
    if _FAST_LAYERS['on'] is None:
        _FAST_LAYERS['on'] = cpu_kernels.switched_on(os.environ.get('MOCO_FAST_LAYERS', '1'))
    return _FAST_LAYERS['on']


def set_fast_layers(on):
    """Turn the CPU fast paths on/off in this process (None: back to MOCO_FAST_LAYERS); returns the old value."""
    old = _FAST_LAYERS['on']
    _FAST_LAYERS['on'] = None if on is None else bool(on)
    return old


def _fast_cpu(x):  # eager only: a traced program (paddle.jit.save) keeps Paddle's own ops
    return paddle.in_dynamic_mode() and x.place.is_cpu_place() and x.dtype in (paddle.float32, paddle.float64) and fast_layers_enabled()


def _needs_grad(*tensors):
    return paddle.is_grad_enabled() and any(t is not None and not t.stop_gradient for t in tensors)


class _LinearGemvBias(PyLayer):
    """F.linear whose backward is written out: dx = dy W^T, dW = x^T dy (one GEMM over all rows), and the
    bias gradient as the GEMV ones[1, M] @ dy instead of Paddle's slow row sum. Gradients only for the
    inputs that need one."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x, weight)
        ctx.needs = (not x.stop_gradient, not weight.stop_gradient, not bias.stop_gradient)
        return _addmm_linear(x, weight, bias)

    @staticmethod
    def backward(ctx, dy):
        x, weight = ctx.saved_tensor()
        return _linear_grads(x, weight, dy, ctx.needs)


def _linear_grads(x, weight, dy, needs):
    """(dx, dW, db) of y = x W + b for the inputs that need one (needs: three bools)."""
    need_x, need_w, need_b = needs
    dy2 = dy.reshape([-1, dy.shape[-1]])
    dx = paddle.matmul(dy, weight, transpose_y=True) if need_x else None
    dw = paddle.matmul(x.reshape([-1, x.shape[-1]]), dy2, transpose_x=True) if need_w else None
    db = (paddle.matmul(paddle.ones([1, dy2.shape[0]], dtype=dy2.dtype), dy2).reshape([-1])
          if need_b else None)
    return dx, dw, db


def _addmm_linear(x, weight, bias):
    """x @ weight + bias as one addmm (the GEMM accumulates onto the bias): F.linear adds the bias in a
    separate broadcast pass, ~6 ms of a 28 ms ViT-S fc1 forward at batch 8."""
    x2 = x.reshape([-1, x.shape[-1]])
    y = paddle.addmm(bias.unsqueeze(0), x2, weight)
    return y.reshape(list(x.shape[:-1]) + [weight.shape[-1]])


def linear(x, weight, bias=None):
    """F.linear (Paddle weight layout [in, out]); on CPU (float32/64) with a bias, the forward is one addmm
    and, where a gradient is needed, the backward is _LinearGemvBias's."""
    if bias is None or not _fast_cpu(x):
        return F.linear(x, weight, bias)
    if not _needs_grad(x, weight, bias):
        return _addmm_linear(x, weight, bias)
    return _LinearGemvBias.apply(x, weight, bias)


class FastLinear(nn.Linear):
    """nn.Linear (same parameters, names and init) whose training forward uses ``linear`` above."""

    def forward(self, x):
        return linear(x, self.weight, self.bias)


class _ExactGELU(PyLayer):
    """Exact (erf) GELU: Paddle's forward kernel; the backward dy * (Phi(x) + x * phi(x)) from erf/exp."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return F.gelu(x, approximate=False)

    @staticmethod
    def backward(ctx, dy):
        x, = ctx.saved_tensor()
        t = x * _SQRT1_2
        cdf = paddle.scale(paddle.erf(t), 0.5, 0.5)  # Phi(x)
        pdf = paddle.exp(paddle.scale(paddle.square(t), -1.0, _LOG_INV_SQRT_2PI))  # phi(x) = e^(-x^2/2) / sqrt(2 pi)
        return dy * (cdf + x * pdf)


def gelu(x):
    """Exact GELU, F.gelu(x, approximate=False); on CPU our kernels (cpu_kernels), else a fast backward
    from Paddle's erf/exp (see _ExactGELU)."""
    if cpu_kernels.usable(x):
        return gelu_k(x)
    if _fast_cpu(x) and _needs_grad(x):
        return _ExactGELU.apply(x)
    return F.gelu(x, approximate=False)


class GELU(nn.GELU):
    """nn.GELU(approximate=False) using ``gelu`` above."""

    def __init__(self):
        super().__init__(approximate=False)

    def forward(self, x):
        return gelu(x)


def _dense_transpose(x, perm):
    """paddle.transpose with the stride kernels off: a real, contiguous transpose (fast kernel)."""
    key = 'FLAGS_use_stride_kernel'
    old = paddle.get_flags([key])[key]
    if not old:
        return paddle.transpose(x, perm)
    paddle.set_flags({key: False})
    try:
        return paddle.transpose(x, perm)
    finally:
        paddle.set_flags({key: old})


class _DenseTranspose(PyLayer):
    @staticmethod
    def forward(ctx, x, perm):
        ctx.inverse = [perm.index(i) for i in range(len(perm))]
        return _dense_transpose(x, perm)

    @staticmethod
    def backward(ctx, dy):
        return _dense_transpose(dy, ctx.inverse)


def transpose(x, perm):
    """paddle.transpose, materialised contiguously on CPU (forward and backward), where the lazy
    (strided-view) transpose would later be copied by Paddle's slow strided-copy kernel."""
    if not paddle.in_dynamic_mode() or not x.place.is_cpu_place() or not fast_layers_enabled():
        return paddle.transpose(x, perm)
    perm = [int(p) for p in perm]
    if _needs_grad(x):
        return _DenseTranspose.apply(x, perm)
    return _dense_transpose(x, perm)


# ----------------------------------------------------------------------------------------------------------
# Our CPU kernels (paddle_impl/csrc/cpu_kernels.cc, built by cpu_kernels.py): multi-threaded SIMD softmax,
# GELU and LayerNorm, forward and backward. Each function takes CPU float32/float64 tensors (callers check
# cpu_kernels.usable) and records a PyLayer only where a gradient is needed.

def _softmax_k(x, scale):
    """softmax(scale * x) over the last axis by our kernel (no autograd record)."""
    return cpu_kernels.get().moco_softmax(cpu_kernels.contiguous(x), scale)


class _SoftmaxK(PyLayer):
    @staticmethod
    def forward(ctx, x, scale):
        y = _softmax_k(x, scale)
        ctx.save_for_backward(y)
        ctx.scale = scale
        return y

    @staticmethod
    def backward(ctx, dy):
        y, = ctx.saved_tensor()
        return cpu_kernels.get().moco_softmax_grad_k(y, cpu_kernels.contiguous(dy), ctx.scale)


def softmax_scaled(x, scale):
    """softmax(scale * x) over the last axis (scale > 0) with our kernel."""
    scale = float(scale)
    if _needs_grad(x):
        return _SoftmaxK.apply(x, scale)
    return _softmax_k(x, scale)


def patch_conv_applies(conv, x):
    """``conv`` (an nn.Conv2D) on ``x`` is a patch projection that patch_embed_k computes: CPU float32/64 in eager
    mode with the fast layers on, kernel = stride, no padding, dilation 1, groups 1, NCHW, image sides divisible
    by the kernel, and the module call unobserved (no hooks, no replaced forward)."""
    if type(conv) is not nn.Conv2D or not _fast_cpu(x) or not unobserved(conv) or x.ndim != 4:
        return False
    k = _pair(conv._kernel_size)
    if _pair(conv._stride) != k or conv._groups != 1 or conv._data_format != 'NCHW' or _pair(conv._dilation) != [1, 1]:
        return False
    if isinstance(conv._padding, str) or conv._padding not in (0, [0, 0], (0, 0), [0, 0, 0, 0]):
        return False
    if getattr(conv, '_padding_mode', 'zeros') != 'zeros':
        return False
    return x.shape[2] % k[0] == 0 and x.shape[3] % k[1] == 0 and x.dtype == conv.weight.dtype


def patch_embed_k(x, weight, bias=None):
    """F.conv2d(x, weight, bias, stride=kernel) -> flatten(2) -> transpose to [B, patches, E]: the ViT's patch
    projection as one GEMM. With stride = kernel the patches do not overlap, so the conv's im2col matrix is a
    transpose of the image ([B, C, gh, p, gw, p] -> [B, gh, gw, C, p, p]) and the product comes out in the
    [B, N, E] layout the ViT wants, without the conv's column buffer and the transpose after it (ViT-S/16,
    8 images, 2 threads: 7.5 -> 3.9 ms forward). Each output sums over (c, i, j) in the conv's order."""
    b, c, h, w = x.shape
    e, _, ph, pw = weight.shape
    gh, gw = h // ph, w // pw
    cols = transpose(x.reshape([b, c, gh, ph, gw, pw]), [0, 2, 4, 1, 3, 5]).reshape([b * gh * gw, c * ph * pw])
    y = paddle.matmul(cols, weight.reshape([e, c * ph * pw]), transpose_y=True)
    if bias is not None:
        y = y + bias
    return y.reshape([b, gh * gw, e])


def unobserved(*layers):
    """True when calling these layers' forward directly would be indistinguishable from calling the layers:
    no forward pre/post hooks (parity.trace, user hooks) and no forward replaced on the instance (a planted
    bug, a user patch). Fused paths that skip the module calls use it."""
    for m in layers:
        if 'forward' in vars(m) or getattr(m, '_forward_pre_hooks', None) or getattr(m, '_forward_post_hooks', None):
            return False
    return True


def _attention_probs(q, k, scale):
    return _softmax_k(paddle.matmul(q, k, transpose_y=True), scale)


class _AttentionK(PyLayer):
    """softmax(scale * q k^T) v keeping only q, k and v for the backward: the attention matrix [B, H, N, N]
    (the largest activation of a ViT block: 15 MB per block and view for ViT-S at batch 8) is recomputed there
    by the same two calls, so it is not held from the forward to the backward (peak memory, bench/). The
    backward is the one autograd builds for matmul -> softmax -> matmul: dv = P^T dO, dP = dO v^T,
    dS = softmax_grad(P, dP), dq = dS k, dk = dS^T q."""

    @staticmethod
    def forward(ctx, q, k, v, scale):
        ctx.save_for_backward(q, k, v)
        ctx.scale = scale
        ctx.needs = (not q.stop_gradient, not k.stop_gradient, not v.stop_gradient)
        return paddle.matmul(_attention_probs(q, k, scale), v)

    @staticmethod
    def backward(ctx, dout):
        q, k, v = ctx.saved_tensor()
        need_q, need_k, need_v = ctx.needs
        attn = _attention_probs(q, k, ctx.scale)
        dv = paddle.matmul(attn, dout, transpose_x=True) if need_v else None
        ds = cpu_kernels.get().moco_softmax_grad_k(attn, paddle.matmul(dout, v, transpose_y=True), ctx.scale)
        del attn
        dq = paddle.matmul(ds, k) if need_q else None
        dk = paddle.matmul(ds, q, transpose_x=True) if need_k else None
        return dq, dk, dv


def attention_k(q, k, v, scale):
    """softmax(scale * q k^T) v over the last two axes of [B, H, N, D] (scale > 0) with our softmax kernel;
    where a gradient is needed, the attention matrix is recomputed in the backward instead of kept."""
    scale = float(scale)
    if _needs_grad(q, k, v):
        return _AttentionK.apply(q, k, v, scale)
    return paddle.matmul(_attention_probs(q, k, scale), v)


class _FusedAttention(PyLayer):
    @staticmethod
    def forward(ctx, qkv, heads, scale):
        qkv = cpu_kernels.contiguous(qkv)
        ctx.save_for_backward(qkv)
        ctx.heads, ctx.scale = heads, scale
        return cpu_kernels.get().moco_attention(qkv, heads, scale)

    @staticmethod
    def backward(ctx, dout):
        qkv, = ctx.saved_tensor()
        return cpu_kernels.get().moco_attention_grad(qkv, cpu_kernels.contiguous(dout), ctx.heads, ctx.scale)


def fused_attention(qkv, heads, scale):
    """Multi-head attention from the qkv projection's output: qkv [B, N, 3 C] (q of every head, then k, then v)
    -> [B, N, C], each head's softmax(scale q k^T) v in its columns; the same computation as reshape ->
    transpose -> unbind -> attention_k -> transpose -> reshape, without the transposes (our kernel reads and
    writes the linear layers' layouts) and with nothing of size N x N kept for the backward (recomputed there).
    Callers check cpu_kernels.attention(qkv) (which also opens the BLAS) and keep the unfused path otherwise."""
    if not cpu_kernels.attention(qkv):
        raise RuntimeError('fused_attention: not usable here (our CPU kernels, MOCO_CPU_ATTENTION or the BLAS '
                           'library; see cpu_kernels.attention); use the unfused attention')
    heads, scale = int(heads), float(scale)
    if _needs_grad(qkv):
        return _FusedAttention.apply(qkv, heads, scale)
    return cpu_kernels.get().moco_attention(cpu_kernels.contiguous(qkv), heads, scale)


class _GeluK(PyLayer):
    """Exact GELU; keeps its slope at x (computed in the forward's pass) instead of x, so that the backward is
    one product dx = dy * slope (the same memory: one tensor of x's size)."""

    @staticmethod
    def forward(ctx, x):
        y, slope = cpu_kernels.get().moco_gelu_slope(cpu_kernels.contiguous(x))
        ctx.save_for_backward(slope)
        return y

    @staticmethod
    def backward(ctx, dy):
        slope, = ctx.saved_tensor()
        return cpu_kernels.get().moco_mul(cpu_kernels.contiguous(dy), slope)


def gelu_k(x):
    if _needs_grad(x):
        return _GeluK.apply(x)
    return cpu_kernels.get().moco_gelu(cpu_kernels.contiguous(x))


class _ReluK(PyLayer):
    """In-place ReLU: Paddle's relu_ forward; the backward dy where y > 0 (Paddle's relu_grad, same numbers)
    in our multi-threaded kernel (Paddle's runs on one thread: 2.9 ms vs torch's 0.6 ms per call in a
    ResNet-50 step on a 2-core Intel Xeon)."""

    @staticmethod
    def forward(ctx, x):
        y = F.relu_(x)
        ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx, dy):
        y, = ctx.saved_tensor()
        return cpu_kernels.get().moco_relu_backward(y, cpu_kernels.contiguous(dy))


def relu_(x):
    """F.relu_(x) (in place); on CPU with our kernels, where a gradient is needed, _ReluK's backward."""
    if cpu_kernels.usable(x) and _needs_grad(x) and x.is_contiguous():
        return _ReluK.apply(x)
    return F.relu_(x)


class _NormK(PyLayer):
    """A normalisation in our kernels (LayerNorm, BatchNorm): ``forward_k(x)`` gives [y, mean, rstd] (and may
    update running statistics); the kernel op named ``backward_op`` takes (x, weight, mean, rstd, dy) and gives
    [dx, dweight, dbias]."""

    @staticmethod
    def forward(ctx, x, weight, bias, forward_k, backward_op):
        x = cpu_kernels.contiguous(x)
        y, mean, rstd = forward_k(x)
        ctx.save_for_backward(x, weight, mean, rstd)
        ctx.backward_op = backward_op
        ctx.needs = (not x.stop_gradient, not weight.stop_gradient, not bias.stop_gradient)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, mean, rstd = ctx.saved_tensor()
        grads = getattr(cpu_kernels.get(), ctx.backward_op)(x, weight, mean, rstd, cpu_kernels.contiguous(dy))
        return tuple(g if need else None for g, need in zip(grads, ctx.needs))


def norm_k(x, weight, bias, forward_k, backward_op):
    """y of _NormK: through the PyLayer where a gradient is needed, else the forward kernel alone."""
    if _needs_grad(x, weight, bias):
        return _NormK.apply(x, weight, bias, forward_k, backward_op)
    return forward_k(cpu_kernels.contiguous(x))[0]


def layer_norm_k(x, weight, bias, epsilon):
    """LayerNorm over the last axis (biased variance, float64 epsilon) with our kernel."""
    epsilon = float(epsilon)
    return norm_k(x, weight, bias, lambda xc: cpu_kernels.get().moco_layer_norm(xc, weight, bias, epsilon),
                  'moco_layer_norm_grad_k')


# The column matrix of one im2col GEMM is kept under this many bytes by splitting the batch into groups of
# images (ResNet-50 at batch 8: the stem's and layer 1's 3x3 columns are ~58 MB for the whole batch, 9x their
# input; layers 3-4 stay one GEMM over the batch). Peak memory; the GEMMs keep >= 6000 columns each.
COLS_CAP_BYTES = 16 * 2 ** 20


def _batch_groups(x, weight, out_hw):
    """[(start, stop)] over the batch so that each group's columns stay under COLS_CAP_BYTES (one image at least)."""
    n = x.shape[0]
    per_image = int(np.prod(weight.shape[1:])) * out_hw[0] * out_hw[1] * x.element_size()
    step = max(1, min(n, COLS_CAP_BYTES // max(per_image, 1)))
    return [(a, min(n, a + step)) for a in range(0, n, step)]


def _rows(t, a, b):
    """t[a:b] along the batch axis (t itself when that is all of it)."""
    return t if (a, b) == (0, t.shape[0]) else t[a:b]


def _conv_forward(x, weight, geom, out_hw):
    """y = conv(x, weight): per group of images (_batch_groups), columns [C*KH*KW, n*L], one GEMM
    [Co, C*KH*KW] @ cols, then [Co, n, L] -> [n, Co, L] (a dense transpose)."""
    co = weight.shape[0]
    w2 = weight.reshape([co, -1])
    ys = []
    for a, b in _batch_groups(x, weight, out_hw):
        cols = cpu_kernels.get().moco_im2col(cpu_kernels.contiguous(_rows(x, a, b)), *geom, True)
        y = paddle.matmul(w2, cols).reshape([co, b - a, -1])
        ys.append(_dense_transpose(y, [1, 0, 2]).reshape([b - a, co, *out_hw]))
    return ys[0] if len(ys) == 1 else paddle.concat(ys, axis=0)


class _Conv2dK(PyLayer):
    """Convolution (groups 1, dilation 1, no bias) as our parallel im2col + one GEMM per group of images (MKL;
    the whole batch unless its columns exceed COLS_CAP_BYTES). Backward per group: dy as [Co, n*L];
    dW += dy @ cols^T (the columns are rebuilt rather than kept: memory), dx = col2im(W^T @ dy). Large GEMMs
    instead of one small GEMM per image (layer 4 of ResNet-50: L = 49)."""

    @staticmethod
    def forward(ctx, x, weight, geom, out_hw):
        x = cpu_kernels.contiguous(x)
        ctx.save_for_backward(x, weight)
        ctx.geom = geom
        ctx.out_hw = out_hw
        ctx.needs = (not x.stop_gradient, not weight.stop_gradient)
        return _conv_forward(x, weight, geom, out_hw)

    @staticmethod
    def backward(ctx, dy):
        x, weight = ctx.saved_tensor()
        need_x, need_w = ctx.needs
        k = cpu_kernels.get()
        _, c, h, w = x.shape
        co = weight.shape[0]
        w2 = weight.reshape([co, -1])
        dxs, dw = [], None
        for a, b in _batch_groups(x, weight, ctx.out_hw):
            dy_cn = _dense_transpose(_rows(dy, a, b).reshape([b - a, co, -1]), [1, 0, 2]).reshape([co, -1])
            if need_w:
                cols = k.moco_im2col(cpu_kernels.contiguous(_rows(x, a, b)), *ctx.geom, True)
                part = paddle.matmul(dy_cn, cols, transpose_y=True)
                del cols
                dw = part if dw is None else paddle.add(dw, part)
            if need_x:
                dcols = paddle.matmul(w2, dy_cn, transpose_x=True)
                dxs.append(k.moco_col2im(dcols, b - a, c, h, w, *ctx.geom, True))
        dx = (dxs[0] if len(dxs) == 1 else paddle.concat(dxs, axis=0)) if need_x else None
        return dx, dw.reshape(weight.shape) if need_w else None


def conv2d_k(x, weight, stride, padding):
    """F.conv2d(x, weight, stride=stride, padding=padding) (NCHW, no bias, groups 1) with our im2col."""
    stride, padding = [int(s) for s in stride], [int(p) for p in padding]
    _, _, kh, kw = weight.shape
    h, w = x.shape[2:]
    geom = [kh, kw, stride[0], stride[1], padding[0], padding[1]]
    out_hw = [(h + 2 * padding[0] - kh) // stride[0] + 1, (w + 2 * padding[1] - kw) // stride[1] + 1]
    if onednn_conv_applies(x, weight, geom, out_hw):
        return conv2d_onednn(x, weight, geom)
    if _needs_grad(x, weight):
        return _Conv2dK.apply(x, weight, geom, out_hw)
    return _conv_forward(cpu_kernels.contiguous(x), weight, geom, out_hw)


class _Conv2dOneDNN(PyLayer):
    """Convolution (groups 1, dilation 1, no bias, float32) as oneDNN direct convolutions (csrc/cpu_kernels.cc):
    forward, backward data and backward weights, each one primitive cached per shape."""

    @staticmethod
    def forward(ctx, x, weight, geom):
        x = cpu_kernels.contiguous(x)
        ctx.save_for_backward(x, weight)
        ctx.geom = geom
        ctx.needs = (not x.stop_gradient, not weight.stop_gradient)
        return cpu_kernels.get().moco_dnnl_conv(x, weight, *geom[2:])

    @staticmethod
    def backward(ctx, dy):
        x, weight = ctx.saved_tensor()
        need_x, need_w = ctx.needs
        k = cpu_kernels.get()
        dy = cpu_kernels.contiguous(dy)
        kh, kw = ctx.geom[:2]
        dx = k.moco_dnnl_conv_grad_x(weight, dy, x.shape[2], x.shape[3], *ctx.geom[2:]) if need_x else None
        dw = k.moco_dnnl_conv_grad_w(x, dy, kh, kw, *ctx.geom[2:]) if need_w else None
        return dx, dw


def conv2d_onednn(x, weight, geom):
    """conv2d_k through oneDNN (float32 only; geom = [kh, kw, sh, sw, ph, pw])."""
    if not cpu_kernels.onednn_loaded():
        raise RuntimeError(f'oneDNN could not be loaded from {cpu_kernels.onednn_library()}; use conv2d_k')
    if _needs_grad(x, weight):
        return _Conv2dOneDNN.apply(x, weight, geom)
    return cpu_kernels.get().moco_dnnl_conv(cpu_kernels.contiguous(x), weight, *geom[2:])


_CPU = {}


def cpu_vendor():
    """'intel', 'amd' or 'other' (machine.cpu_facts, read once per process); the convolution routes below
    differ by vendor because they were measured to."""
    if 'vendor' not in _CPU:
        from . import machine
        _CPU['vendor'] = machine.cpu_facts()['vendor']
    return _CPU['vendor']


def onednn_conv_wins(x, weight, geom, out_hw):
    """The shapes where the oneDNN convolution measured faster than im2col + GEMM, forward + backward, batch 8
    (bench/conv_layers.py, docs/benchmarks.md "ResNet-50: the convolutions"): 3x3 and 7x7 kernels with stride 1
    or 2 and at least 14x14 output positions. On the 7x7 outputs of the last stage (512 channels) im2col + one
    GEMM over the whole batch was as fast or faster on the AMD EPYC (43-46 ms vs 44-55 ms, one thread); on the
    Intel Xeon the stride-1 one is faster in oneDNN (20 vs 24 ms, 2 threads)."""
    kh, kw, sh, sw = geom[:4]
    if not (kh == kw and kh in (3, 7) and sh == sw and sh in (1, 2)):
        return False
    return out_hw[0] * out_hw[1] >= 14 * 14 or (sh == 1 and cpu_vendor() == 'intel')


def pointwise_conv_takes(x, geom):
    """A float32 1x1 convolution that conv2d_k runs (im2col: a strided gather and one GEMM for the batch)
    instead of Paddle's conv2d (one GEMM per image): stride 2, no padding, on Intel CPUs, where it measured
    faster forward + backward (2-core Xeon with AVX-512, bench/conv_layers.py, 2026-12-02: 20-30 ms vs 29-37 ms
    per layer; the ResNet-50 step 1.2% faster, alternating in one process). Stride 1 stays on Paddle's: oneDNN
    was faster there on 28x28 and smaller inputs (10-32% per layer) but added ~300 MiB to the step's peak RSS
    (glibc heap holes, the tensors' own peak unchanged); on the AMD EPYC Paddle's own was the fastest 1x1
    (1203 ms vs oneDNN 1483, all of ResNet-50's 1x1 shapes, one thread, AVX2 cap)."""
    kh, kw, sh, sw, ph, pw = geom
    return ((kh, kw, sh, sw, ph, pw) == (1, 1, 2, 2, 0, 0) and x.dtype == paddle.float32
            and cpu_vendor() == 'intel')


def onednn_conv_applies(x, weight, geom, out_hw):
    """conv2d_k goes to oneDNN: float32, oneDNN loaded, ``MOCO_ONEDNN_CONV`` 1 (or unset and the shape is one
    where it wins), contiguous weight and no negative bottom/right padding in oneDNN's terms. float64 never
    does (the parity proof runs on im2col + GEMM)."""
    if x.dtype != paddle.float32 or weight.dtype != paddle.float32 or not weight.is_contiguous():
        return False
    kh, kw, sh, sw, ph, pw = geom
    if (out_hw[0] - 1) * sh + kh < x.shape[2] + ph or (out_hw[1] - 1) * sw + kw < x.shape[3] + pw:
        return False
    setting = cpu_kernels.onednn_setting()
    if setting == '0' or not cpu_kernels.onednn():
        return False
    return setting == '1' or onednn_conv_wins(x, weight, geom, out_hw)


def _pair(v):
    return [int(v), int(v)] if isinstance(v, int) else [int(a) for a in v]


def conv_k_applies(layer, x):
    """Our path (conv2d_k) applies to this nn.Conv2D call: CPU float32/64, NCHW, groups 1, dilation 1, no bias,
    numeric padding; a 1x1 kernel (already one GEMM per image in Paddle) only where pointwise_conv_takes."""
    if layer._groups != 1 or layer.bias is not None or layer._data_format != 'NCHW':
        return False
    if _pair(layer._dilation) != [1, 1] or isinstance(layer._padding, str):
        return False
    pad = layer._padding
    if not isinstance(pad, int) and (len(pad) != 2 or not all(isinstance(p, int) for p in pad)):
        return False
    if getattr(layer, '_padding_mode', 'zeros') != 'zeros':
        return False
    if not cpu_kernels.usable(x, layer.weight):
        return False
    if list(layer._kernel_size) == [1, 1]:  # only where this CPU measured ours faster
        return pointwise_conv_takes(x, [1, 1] + _pair(layer._stride) + _pair(pad))
    return True


class Conv2D(nn.Conv2D):
    """nn.Conv2D; on CPU, where conv_k_applies, computed by conv2d_k (same numbers, parallel im2col)."""

    def forward(self, x):
        if conv_k_applies(self, x):
            return conv2d_k(x, self.weight, _pair(self._stride), _pair(self._padding))
        return super().forward(x)


def use_fast_conv(layer):
    """Make every plain nn.Conv2D inside ``layer`` a Conv2D above (same parameters, names and init; only the
    CPU forward/backward changes)."""
    for m in [layer] + list(layer.sublayers()):
        if type(m) is nn.Conv2D:
            m.__class__ = Conv2D
    return layer

