"""File formats: reading any checkpoint file without running code in it (paddle_impl.io's safe readers; torch
only for pre-1.6 files, with weights_only=True), unwrapping the state dict, and the file-name conventions."""
import os

import numpy as np

from paddle_impl.io import CheckpointError, load_checkpoint, load_safetensors, load_torch_file_safe, sniff_format

from . import keymap

FORMAT = 'mocov3-paddle/1'
TORCH_EXTS = ('.pth', '.pth.tar', '.pt', '.tar', '.bin')
PADDLE_EXTS = ('.pdparams',)
_PREFIXES = ('module.', '_layers.')
_OUR_META = ('format', 'kind', 'img_size', 'torch_extras', 'framework')


def _load_legacy_torch(path):
    """Pre-1.6 torch files (a bare pickle sequence): only through torch.load(weights_only=True)."""
    try:
        import torch
    except ImportError:
        raise CheckpointError(f"'{path}' is in the legacy PyTorch format (before torch 1.6), which needs torch "
                              f"to read; re-save it with a current torch or install torch") from None
    try:
        obj = torch.load(path, map_location='cpu', weights_only=True)
    except Exception as e:  # UnpicklingError for a crafted file, RuntimeError for a broken one
        raise CheckpointError(f"'{path}' refused by torch.load(weights_only=True): "
                              f"{str(e).splitlines()[0][:200]}") from None

    def tonp(o):
        if isinstance(o, torch.Tensor):
            o = o.detach().cpu()
            return (o.float() if o.dtype == torch.bfloat16 else o).numpy().copy()
        if isinstance(o, dict):
            return type(o)((k, tonp(v)) for k, v in o.items())
        if isinstance(o, (list, tuple)):
            return type(o)(tonp(v) for v in o)
        return o
    return tonp(obj)


def load_raw(path):
    """(object, file_format, safetensors_metadata) of any checkpoint file, read without running code."""
    path = os.fspath(path)
    fmt = sniff_format(path)
    if fmt == 'torch-zip':
        return load_torch_file_safe(path), fmt, None
    if fmt == 'safetensors':
        tensors, meta = load_safetensors(path)
        return tensors, fmt, meta
    if fmt == 'pickle':
        try:
            return load_checkpoint(path), fmt, None
        except CheckpointError as e:
            if 'legacy PyTorch' in str(e):
                return _load_legacy_torch(path), 'torch-legacy', None
            raise
    size = os.path.getsize(path)
    raise CheckpointError(f"'{path}' is not a checkpoint ({size} bytes that are neither a PyTorch zip, a "
                          f"pickle nor safetensors)")


def _is_array(v):
    return isinstance(v, (np.ndarray, np.generic))


def _unwrap(obj, path):
    """(flat state dict, container, other top-level entries)."""
    if not isinstance(obj, dict):
        raise CheckpointError(f"'{path}' holds a {type(obj).__name__}, not a checkpoint dict")
    if 'state_dict' in obj and isinstance(obj['state_dict'], dict):
        return obj['state_dict'], 'official', {k: v for k, v in obj.items() if k != 'state_dict'}
    if 'model' in obj and isinstance(obj['model'], dict):
        return obj['model'], 'deit', {k: v for k, v in obj.items() if k != 'model'}
    if obj and all(_is_array(v) for v in obj.values()):
        return obj, 'flat', {}
    keys = ', '.join(map(repr, list(obj)[:8]))
    raise CheckpointError(f"'{path}' holds a dict with keys {keys}: no state dict in it ('state_dict', "
                          f"'model' or a flat name -> tensor dict); not a MoCo v3 checkpoint")


def _strip_prefixes(sd):
    for p in _PREFIXES:
        if sd and all(k.startswith(p) for k in sd):
            sd = keymap.strip_prefix(sd, p)
    return sd


def framework_of_output(path, default=None):
    p = os.fspath(path).lower()
    if p.endswith(PADDLE_EXTS):
        return 'paddle'
    if p.endswith(TORCH_EXTS):
        return 'torch'
    if p.endswith('.safetensors'):
        return default
    raise CheckpointError(f"'{path}': unknown output type; name it .pdparams or .safetensors (Paddle) or "
                          f".pth / .pth.tar (PyTorch)")


def _size(path):
    n = os.path.getsize(path)
    for unit in ('B', 'KB', 'MB', 'GB'):
        if n < 1024 or unit == 'GB':
            return f'{n:.0f} {unit}' if unit == 'B' else f'{n:.1f} {unit}'
        n /= 1024
