"""A synchronised BatchNorm for torch that also runs on the CPU (gloo), so that torch_ref can be run on
several CPU processes with the official semantics (every BatchNorm of the MoCo model synchronised).

torch's own ``nn.SyncBatchNorm`` refuses CPU tensors (torch 2.14: "SyncBatchNorm expected input tensor to
be on GPU or XPU or ..."), so the official main_moco cannot run distributed on a CPU. ``SyncBatchNormCPU``
computes what ``nn.SyncBatchNorm`` computes, with two differentiable all-reduces instead of its CUDA kernels.
Per channel, over the batch (and spatial) axes of all processes together:
    n    = all_reduce(n_local)
    mean = all_reduce(sum x) / n
    var  = all_reduce(sum (x - mean)^2) / n                 (biased: used to normalise)
    y    = (x - mean) / sqrt(var + eps) * weight + bias
    running_mean = (1 - momentum) * running_mean + momentum * mean
    running_var  = (1 - momentum) * running_var  + momentum * var * n / (n - 1)   (unbiased, as torch)
    num_batches_tracked += 1
The adjoint of an all-reduce sum is again an all-reduce sum, so autograd yields the gradient of the
global-batch BN; with DistributedDataParallel averaging the parameter gradients, a step on W processes with
N samples each equals one step of a single process on the W*N samples. It is the twin of Paddle's
``paddle_impl.utils.SyncBatchNormMixin`` (same formula, same two passes).

Eval mode, and a process group of one (or none), fall back to the plain BatchNorm, as nn.SyncBatchNorm does.
Nothing here imports paddle.
"""
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

__all__ = ['all_reduce_sum', 'SyncBatchNormCPU', 'convert_sync_batchnorm', 'world_size', 'rank']


def world_size(group=None):
    return dist.get_world_size(group) if dist.is_available() and dist.is_initialized() else 1


def rank():
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


class _AllReduceSum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        y = x.clone()
        dist.all_reduce(y, op=dist.ReduceOp.SUM, group=group)
        return y

    @staticmethod
    def backward(ctx, dy):
        dx = dy.clone()
        dist.all_reduce(dx, op=dist.ReduceOp.SUM, group=ctx.group)
        return dx, None


def all_reduce_sum(x, group=None):
    """Sum of ``x`` over the ranks of ``group``, differentiable (the gradient of each rank's input is the
    sum over ranks of the output gradients). Identity without a process group."""
    if world_size(group) <= 1:
        return x
    return _AllReduceSum.apply(x, group)


class SyncBatchNormCPU(nn.modules.batchnorm._BatchNorm):
    """nn.SyncBatchNorm's semantics on any device (see the module docstring). Any input rank >= 2,
    channels on axis 1."""

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True, track_running_stats=True,
                 process_group=None, device=None, dtype=None):
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device=device, dtype=dtype)
        self.process_group = process_group

    def _check_input_dim(self, x):
        if x.dim() < 2:
            raise ValueError(f'expected at least 2D input (got {x.dim()}D input)')

    def forward(self, x):
        self._check_input_dim(x)
        if not self.training or world_size(self.process_group) <= 1:
            return super().forward(x)
        if self.momentum is None:
            raise NotImplementedError('SyncBatchNormCPU: momentum=None (cumulative average) is not supported')
        c = x.shape[1]
        axes = [0] + list(range(2, x.dim()))
        shape = [1, c] + [1] * (x.dim() - 2)
        xf = x if x.dtype in (torch.float32, torch.float64) else x.float()
        n_local = x.numel() // c
        count = torch.full((1,), float(n_local), dtype=xf.dtype, device=x.device)
        tot = all_reduce_sum(torch.cat([xf.sum(dim=axes), count]), self.process_group)
        n = tot[c:]
        mean = tot[:c] / n
        xc = xf - mean.reshape(shape)
        var = all_reduce_sum((xc * xc).sum(dim=axes), self.process_group) / n
        y = xc * torch.rsqrt(var + self.eps).reshape(shape)
        if self.affine:
            y = y * self.weight.to(xf.dtype).reshape(shape) + self.bias.to(xf.dtype).reshape(shape)
        if self.track_running_stats:
            with torch.no_grad():
                n_total = float(n_local * world_size(self.process_group))  # equal per-rank batches
                unbiased = var.detach() * (n_total / (n_total - 1)) if n_total > 1 else var.detach()
                mom = self.momentum
                self.running_mean.mul_(1 - mom).add_(mean.detach().to(self.running_mean.dtype), alpha=mom)
                self.running_var.mul_(1 - mom).add_(unbiased.to(self.running_var.dtype), alpha=mom)
                self.num_batches_tracked.add_(1)
        return y.to(x.dtype)


def convert_sync_batchnorm(module, process_group=None):
    """Replace every BatchNorm*d inside ``module`` by SyncBatchNormCPU, keeping the same Parameter objects
    (so requires_grad, e.g. of the momentum encoder, is kept), the running statistics and
    num_batches_tracked; as nn.SyncBatchNorm.convert_sync_batchnorm does. Returns the converted module."""
    out = module
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(module, SyncBatchNormCPU):
        out = SyncBatchNormCPU(module.num_features, module.eps, module.momentum, module.affine,
                               module.track_running_stats, process_group)
        if module.affine:
            with torch.no_grad():
                out.weight = module.weight
                out.bias = module.bias
        out.running_mean = module.running_mean
        out.running_var = module.running_var
        out.num_batches_tracked = module.num_batches_tracked
        out.train(module.training)
    for name, child in module.named_children():
        out.add_module(name, convert_sync_batchnorm(child, process_group))
    return out
