"""Writing a Checkpoint in either framework's layout (atomically, never a partial file) and verifying a
conversion by running the torch_ref and paddle_impl models it describes on the same batch."""
import json
import os

import numpy as np

from paddle_impl.io import CheckpointError, atomic_write, save_checkpoint

from . import keymap
from .formats import FORMAT
from .spec import _num, build_classes
from .translate import _scaler_torch_to_paddle, optimizer_to_paddle, paddle_state_dict


def _official_prefix(ck):
    return 'module.' if ck.kind in ('pretrain', 'linear') else ''


def build_output(ck, framework):
    """The object to save for ``framework`` (arrays, not tensors) and the lines to print about it."""
    notes = []
    if ck.optimizer_note:
        notes.append(f'optimizer: {ck.optimizer_note}')
    if framework == 'paddle':
        sd, extras = paddle_state_dict(ck)
        if ck.kind == 'backbone':
            return sd, notes
        out = {'format': FORMAT, 'kind': ck.kind, 'arch': ck.arch, 'img_size': ck.img_size}
        if ck.kind == 'deit':
            out['model'] = sd
        else:
            if ck.epoch is not None:
                out['epoch'] = ck.epoch
            out['state_dict'] = sd
            if ck.best_acc1 is not None:
                out['best_acc1'] = ck.best_acc1
            if ck.optimizer is not None:
                out['optimizer'] = optimizer_to_paddle(ck)
                notes.append(f"optimizer: converted ({len(ck.optimizer['state'])} parameter states, "
                             f"{out['optimizer']['type']}, keyed by parameter name)")
            if ck.scaler is not None:
                out['scaler'] = _scaler_torch_to_paddle(ck.scaler)
        out.update({k: v for k, v in ck.extra.items() if k not in out})
        if extras:
            out['torch_extras'] = {'num_batches_tracked': extras}
        return out, notes
    # torch, official layouts
    sd = keymap.add_prefix(ck.state_dict, _official_prefix(ck))
    if ck.kind == 'backbone':
        return sd, notes
    if ck.kind == 'deit':
        return {'model': sd}, notes
    out = {}
    if ck.epoch is not None:
        out['epoch'] = ck.epoch
    out['arch'] = ck.arch
    out['state_dict'] = sd
    if ck.kind == 'linear' and ck.best_acc1 is not None:
        out['best_acc1'] = ck.best_acc1
    if ck.optimizer is not None:
        out['optimizer'] = ck.optimizer
        notes.append(f"optimizer: converted ({len(ck.optimizer['state'])} parameter states)")
    if ck.kind == 'pretrain' and ck.scaler is not None:
        out['scaler'] = ck.scaler
    if ck.kind == 'pretrain' and ck.best_acc1 is not None:
        out['best_acc1'] = ck.best_acc1
    left = [k for k in ck.extra if k not in out]
    if left:  # the official layout has no room for them (run state of the Paddle trainer, DeiT's args ...)
        notes.append(f"not written (no place in the official layout): {', '.join(map(str, left))}")
    return out, notes


def _safetensors_output(ck, framework):
    notes = []
    if framework == 'paddle':
        sd, extras = paddle_state_dict(ck)
    else:
        sd, extras = dict(ck.state_dict), {}
    meta = {'format': 'mocov3', 'framework': framework, 'kind': ck.kind, 'arch': ck.arch}
    if ck.img_size:
        meta['img_size'] = str(ck.img_size)
    for k in ('epoch', 'best_acc1'):
        v = getattr(ck, k)
        if v is not None:
            meta[k] = json.dumps(_num(v))
    if extras:
        meta['num_batches_tracked'] = json.dumps({k: int(v) for k, v in extras.items()})
    if ck.optimizer is not None or ck.optimizer_note:
        notes.append('optimizer: dropped (.safetensors holds weights only; write .pdparams / .pth to keep it)')
    if ck.scaler:
        notes.append('scaler: dropped (.safetensors holds weights only)')
    return sd, meta, notes


def _to_torch(obj):
    import torch
    if isinstance(obj, np.ndarray):
        return torch.from_numpy(obj if obj.flags.c_contiguous and obj.flags.writeable else obj.copy(order="C"))
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, dict):
        return {k: _to_torch(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_to_torch(v) for v in obj]
    if isinstance(obj, tuple):
        return tuple(_to_torch(v) for v in obj)
    return obj


def write_checkpoint(ck, path, framework, before_replace=None, build=None):
    """Write ``ck`` to ``path`` (atomically) in ``framework``'s layout; .pdparams / .safetensors need no torch,
    .pth needs torch. ``build``: what makes the object to save (default build_output). Returns the lines to
    print."""
    path = os.fspath(path)
    if path.lower().endswith('.safetensors'):
        sd, meta, notes = _safetensors_output(ck, framework)
        save_checkpoint(sd, path, metadata=meta, before_replace=before_replace)
        return notes
    obj, notes = (build or build_output)(ck, framework)
    if framework == 'paddle':
        save_checkpoint(obj, path, before_replace=before_replace)
        return notes
    try:
        import torch
    except ImportError:
        raise CheckpointError(f"writing '{path}' (PyTorch) needs torch; write .safetensors instead") from None
    tobj = _to_torch(obj)
    atomic_write(path, lambda f: torch.save(tobj, f), before_replace)
    return notes


# ------------------------------------------------------------------------------------------ verification

class VerifyError(CheckpointError):
    """--verify found the torch and Paddle models disagreeing past the tolerance."""


def torch_model(ck, dtype='float32'):
    """The torch_ref model a Checkpoint holds, with its weights, in eval mode."""
    import torch
    from torch_ref import models as tm

    from .bridge import load_into_torch
    img = ck.img_size or 224
    if ck.kind == 'pretrain':
        m = tm.build_moco(ck.arch, dim=ck.dim, mlp_dim=ck.mlp_dim, img_size=img)
    else:
        nc = build_classes(ck.kind, ck.arch, ck.num_classes)
        m = tm.encoder_factory(ck.arch, img_size=img)(num_classes=nc)
        if ck.kind != 'linear' and ck.arch == 'resnet50':
            m.fc = torch.nn.Identity()
    m = m.to(getattr(torch, dtype))
    load_into_torch(m, ck.state_dict, f"'{ck.path}'")
    return m.eval()


def paddle_model(ck, dtype='float32'):
    """The paddle_impl model a Checkpoint holds, with its weights, in eval mode."""
    import paddle
    from paddle_impl import models as pm

    from .bridge import load_into_paddle
    img = ck.img_size or 224
    prev = paddle.get_default_dtype()
    paddle.set_default_dtype(dtype)
    try:
        if ck.kind == 'pretrain':
            m = pm.build_moco(ck.arch, dim=ck.dim, mlp_dim=ck.mlp_dim, img_size=img)
        else:
            nc = build_classes(ck.kind, ck.arch, ck.num_classes)
            m = pm.encoder_factory(ck.arch, img_size=img)(num_classes=nc)
            if ck.kind != 'linear' and ck.arch == 'resnet50':
                m.fc = paddle.nn.Identity()
    finally:
        paddle.set_default_dtype(prev)
    psd, _ = paddle_state_dict(ck)
    load_into_paddle(m, psd, f"'{ck.path}'")
    m.eval()
    return m


def model_outputs(model, kind, x):
    """{name: numpy float64} of a model (torch or Paddle) on the batch ``x`` (numpy), no gradient."""
    if type(model).__module__.startswith('paddle') or hasattr(model, 'sublayers'):
        import paddle
        xt, ctx = paddle.to_tensor(x), paddle.no_grad()
    else:
        import torch
        xt, ctx = torch.from_numpy(x), torch.no_grad()
    with ctx:
        if kind == 'pretrain':
            outs = {'predictor(base_encoder(x))': model.predictor(model.base_encoder(xt)),
                    'momentum_encoder(x)': model.momentum_encoder(xt)}
        else:
            outs = {'logits' if kind == 'linear' else 'features': model(xt)}
    return {k: np.asarray(v.numpy(), dtype=np.float64) for k, v in outs.items()}


def compare_models(ck_torch, ck_paddle, dtype='float32', batch=2, seed=0):
    """Run one random batch through the torch model of ``ck_torch`` and the Paddle model of ``ck_paddle``
    (same kind/arch), eval mode. Returns {output name: (max abs diff, max abs diff / max abs value)}."""
    tmod = torch_model(ck_torch, dtype)
    pmod = paddle_model(ck_paddle, dtype)
    img = ck_torch.img_size or 224
    x = np.random.default_rng(seed).standard_normal((batch, 3, img, img)).astype(dtype)
    ta, pa = model_outputs(tmod, ck_torch.kind, x), model_outputs(pmod, ck_paddle.kind, x)
    return relative_differences(ta, pa)


def relative_differences(ref, other):
    """{name: (max abs diff, max abs diff / max abs ref)} of two {name: array} dicts."""
    res = {}
    for name in ref:
        a, b = ref[name], other[name]
        d = float(np.abs(a - b).max())
        res[name] = (d, d / max(float(np.abs(a).max()), 1e-30))
    return res


def verify(ck_torch, ck_paddle, tol=1e-4, dtype='float32', log=print):
    res = compare_models(ck_torch, ck_paddle, dtype)
    worst = max(r for _, r in res.values())
    for name, (d, r) in res.items():
        log(f'verify: {name}: max |torch - paddle| = {d:.3g} (relative {r:.3g}, tolerance {tol:g})')
    if not worst <= tol:
        raise VerifyError(f"verification failed: relative difference {worst:.3g} > {tol:g} between "
                          f"'{ck_torch.path}' (torch) and '{ck_paddle.path}' (Paddle); output not written")
    return res
