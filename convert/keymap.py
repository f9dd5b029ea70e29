"""Key map between torch and Paddle state dicts of the MoCo v3 models (numpy in, numpy out).

Rules (the same for every arch, since both sides use the official/timm/torchvision parameter names):
- Linear weights: torch [out, in] <-> Paddle [in, out]. In these models every 2-D ``*.weight`` is a
  Linear weight (conv weights are 4-D, norm weights 1-D, cls_token/pos_embed 3-D).
- BatchNorm buffers: ``running_mean`` <-> ``_mean``, ``running_var`` <-> ``_variance``.
- ``num_batches_tracked`` has no Paddle counterpart: it is returned aside (torch -> Paddle) and put back
  (Paddle -> torch) so that a round trip is exact; when unknown it is restored as 0.
- Prefixes (``module.`` of DDP, ``base_encoder.`` …) are the caller's business: see strip_prefix/add_prefix.
"""
import numpy as np

_TORCH_TO_PADDLE_SUFFIX = {'.running_mean': '._mean', '.running_var': '._variance'}
_PADDLE_TO_TORCH_SUFFIX = {v: k for k, v in _TORCH_TO_PADDLE_SUFFIX.items()}
NBT = '.num_batches_tracked'


class KeyMapError(ValueError):
    """A state dict that does not fit the model: names the missing, unexpected and mis-shaped keys."""


def _is_linear_weight(name, value):
    return name.endswith('.weight') and np.ndim(value) == 2


def _swap_suffix(name, table):
    for a, b in table.items():
        if name.endswith(a):
            return name[: -len(a)] + b
    return name


def torch_to_paddle(sd):
    """torch state dict (name -> array) -> (paddle state dict, extras). extras holds num_batches_tracked."""
    out, extras = {}, {}
    for k, v in sd.items():
        v = np.asarray(v)
        if k.endswith(NBT):
            extras[k] = v
            continue
        if _is_linear_weight(k, v):
            v = np.ascontiguousarray(v.T)
        out[_swap_suffix(k, _TORCH_TO_PADDLE_SUFFIX)] = v
    return out, extras


def paddle_to_torch(sd, extras=None):
    """Paddle state dict (name -> array) -> torch state dict, num_batches_tracked from ``extras`` or 0."""
    extras = extras or {}
    out = {}
    for k, v in sd.items():
        v = np.asarray(v)
        if _is_linear_weight(k, v):
            v = np.ascontiguousarray(v.T)
        tk = _swap_suffix(k, _PADDLE_TO_TORCH_SUFFIX)
        out[tk] = v
        if k.endswith('._mean'):
            nk = tk[: -len('.running_mean')] + NBT
            out[nk] = np.asarray(extras.get(nk, np.array(0, dtype=np.int64)))
    return out


def check_state_dict(sd, expected, what='state dict'):
    """Raise KeyMapError naming missing / unexpected / mis-shaped keys of ``sd`` against ``expected``
    (name -> shape)."""
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(set(sd) - set(expected))
    misshaped = sorted(f'{k} {tuple(np.shape(sd[k]))} (expected {tuple(expected[k])})'
                       for k in set(sd) & set(expected) if tuple(np.shape(sd[k])) != tuple(expected[k]))
    if missing or unexpected or misshaped:
        parts = []
        for label, keys in (('missing', missing), ('unexpected', unexpected), ('mis-shaped', misshaped)):
            if keys:
                shown = ', '.join(keys[:8]) + (f' … (+{len(keys) - 8} more)' if len(keys) > 8 else '')
                parts.append(f'{len(keys)} {label}: {shown}')
        raise KeyMapError(f'{what} does not fit the model: ' + '; '.join(parts))


def strip_prefix(sd, prefix):
    return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}


def add_prefix(sd, prefix):
    return {prefix + k: v for k, v in sd.items()}
