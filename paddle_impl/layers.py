"""Paddle layers with PyTorch's numerics where Paddle's built-ins differ.

BatchNorm: Paddle's kernel updates the running variance with the biased batch variance (divide by n);
torch (and so the official MoCo v3) uses the unbiased one (n - 1). Normalisation itself uses the biased
variance on both. These subclasses keep Paddle's fused kernel and correct the running variance after it:
with m = Paddle momentum (weight of the old value) and v_b the biased batch variance, the kernel wrote
new = m*old + (1-m)*v_b; torch wants m*old + (1-m)*v_b*n/(n-1) = new + (new - m*old)/(n-1).
"""
import paddle
import paddle.nn as nn


def torch_momentum(m):
    """torch's BN momentum (weight of the new value) -> Paddle's (weight of the old value)."""
    return 1.0 - m


class _UnbiasedVarMixin:
    def _reduce_count(self, x):
        # elements per channel that the batch statistics were taken over
        return int(x.numel()) // int(x.shape[1])

    def forward(self, x):
        if not self.training or self._use_global_stats:
            return super().forward(x)
        old = self._variance.clone()
        y = super().forward(x)
        n = self._reduce_count(x)
        if n > 1:
            with paddle.no_grad():
                new = self._variance
                new.set_value(new + (new - self._momentum * old) / (n - 1))
        return y


class BatchNorm1D(_UnbiasedVarMixin, nn.BatchNorm1D):
    """nn.BatchNorm1D with torch's defaults (eps 1e-5, momentum 0.1) and its unbiased running variance.

    ``affine=False`` gives a BN without weight and bias, as torch's ``BatchNorm1d(d, affine=False)``.
    """

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True):
        kw = {} if affine else dict(weight_attr=False, bias_attr=False)
        super().__init__(num_features, momentum=torch_momentum(momentum), epsilon=eps, **kw)


class BatchNorm2D(_UnbiasedVarMixin, nn.BatchNorm2D):
    """nn.BatchNorm2D with torch's defaults and its unbiased running variance."""

    def __init__(self, num_features, eps=1e-5, momentum=0.1):
        super().__init__(num_features, momentum=torch_momentum(momentum), epsilon=eps)


def replace_batchnorm2d(layer):
    """Swap every plain nn.BatchNorm2D inside ``layer`` for BatchNorm2D above (same shapes, fresh init)."""
    for name, child in list(layer.named_children()):
        if type(child) is nn.BatchNorm2D:
            setattr(layer, name, BatchNorm2D(child._num_features, eps=child._epsilon,
                                             momentum=1.0 - child._momentum))
        else:
            replace_batchnorm2d(child)
    return layer


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
