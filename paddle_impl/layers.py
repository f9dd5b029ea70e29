"""Paddle layers with PyTorch's numerics where Paddle's built-ins differ.

BatchNorm: Paddle's kernel updates the running variance with the biased batch variance (divide by n);
torch (and so the official MoCo v3) uses the unbiased one (n - 1). Normalisation itself uses the biased
variance on both. These subclasses keep Paddle's fused kernel and redo the running-statistics update
after it, as torch does (see _UnbiasedVarMixin).
"""
import numpy as np
import paddle
import paddle.nn as nn


def torch_momentum(m):
    """torch's BN momentum (weight of the new value) -> Paddle's (weight of the old value)."""
    return 1.0 - m


class _UnbiasedVarMixin:
    """Runs Paddle's fused BN kernel, then rewrites the running statistics as torch computes them.

    Two differences are put right: the unbiased variance (above), and precision: the kernel applies the
    momentum as a float32 attribute (0.9 -> 0.89999998), a 2e-7 relative error on the running statistics
    that float64 parity sees. From the kernel's result and the old values, the batch mean and biased
    variance are recovered exactly and the update is redone in the tensor's own precision:
    running = (1 - mom) * running + mom * batch_stat, with torch's momentum ``mom``.
    """

    def _reduce_count(self, x):
        # elements per channel that the batch statistics were taken over
        return int(x.numel()) // int(x.shape[1])

    def forward(self, x):
        if x.dtype == paddle.float64:
            return self._forward_float64(x)
        if not self.training or self._use_global_stats:
            return super().forward(x)
        old_mean, old_var = self._mean.clone(), self._variance.clone()
        y = super().forward(x)
        n = self._reduce_count(x)
        with paddle.no_grad():
            m32 = float(np.float32(self._momentum))  # what the kernel used
            batch_mean = (self._mean - m32 * old_mean) / (1.0 - m32)
            batch_var = (self._variance - m32 * old_var) / (1.0 - m32)
            if n > 1:
                batch_var = batch_var * (n / (n - 1))
            mom = self._torch_momentum
            self._mean.set_value((1.0 - mom) * old_mean + mom * batch_mean)
            self._variance.set_value((1.0 - mom) * old_var + mom * batch_var)
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
    """

    def forward(self, x):
        if x.dtype != paddle.float64:
            return super().forward(x)
        mean = x.mean(axis=-1, keepdim=True)
        xc = x - mean
        var = (xc * xc).mean(axis=-1, keepdim=True)
        y = xc / paddle.sqrt(var + self._epsilon)
        if self.weight is not None:
            y = y * self.weight
        if self.bias is not None:
            y = y + self.bias
        return y
