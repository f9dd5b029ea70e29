"""Optimizers of the official MoCo v3 (moco-v3/moco/optimizer.py and main_moco.py), torch side.

LARS (layer-wise adaptive rate scaling, no rate scaling for biases and norms):
  for every parameter with a gradient and ndim > 1:
      g = g + wd * p
      q = tc * ||p|| / ||g||   if ||p|| > 0 and ||g|| > 0, else 1
      g = g * q
  for every parameter with a gradient:
      mu = momentum * mu + g
      p = p - lr * mu
Parameters with ndim <= 1 (biases, norm gains/shifts) get neither weight decay nor scaling.
"""
import torch

OPTIMIZERS = ('lars', 'adamw')


class LARS(torch.optim.Optimizer):
    """LARS as in MoCo v3: SGD with momentum whose update of each >1-D parameter is rescaled to
    ``trust_coefficient * ||p||`` (after adding weight decay to its gradient)."""

    def __init__(self, params, lr=0, weight_decay=0, momentum=0.9, trust_coefficient=0.001):
        defaults = dict(lr=lr, weight_decay=weight_decay, momentum=momentum,
                        trust_coefficient=trust_coefficient)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group['params']:
                g = p.grad
                if g is None:
                    continue
                if p.ndim > 1:  # not a bias nor a norm parameter
                    g = g.add(p, alpha=group['weight_decay'])
                    p_norm = torch.linalg.vector_norm(p)
                    g_norm = torch.linalg.vector_norm(g)
                    one = torch.ones_like(p_norm)
                    q = torch.where(p_norm > 0.,
                                    torch.where(g_norm > 0., group['trust_coefficient'] * p_norm / g_norm, one),
                                    one)
                    g = g.mul(q)
                state = self.state[p]
                if 'mu' not in state:
                    state['mu'] = torch.zeros_like(p)
                mu = state['mu']
                mu.mul_(group['momentum']).add_(g)
                p.add_(mu, alpha=-group['lr'])
        return loss


def build_optimizer(name, parameters, lr, weight_decay, momentum=0.9):
    """The optimizer of official main_moco: ``LARS(params, lr, weight_decay, momentum)`` or
    ``torch.optim.AdamW(params, lr, weight_decay=weight_decay)`` (betas 0.9/0.999, eps 1e-8).
    ``lr`` is the already batch-scaled rate; the schedule overwrites it every iteration."""
    if name == 'lars':
        return LARS(parameters, lr, weight_decay=weight_decay, momentum=momentum)
    if name == 'adamw':
        return torch.optim.AdamW(parameters, lr, weight_decay=weight_decay)
    raise ValueError(f"unknown optimizer '{name}'; known: {', '.join(OPTIMIZERS)}")
