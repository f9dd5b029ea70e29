"""The torch side built from a user's checkout of the original facebookresearch/moco-v3 code.

    python -m parity --reference official --official-src DIR [--timm-src DIR]

DIR holds the original's ``moco/builder.py``, ``moco/optimizer.py`` and ``vits.py`` (nothing of it is copied
into this project: its licence is CC-BY-NC 4.0). What the original needs on a CPU, done here without
editing its files:
- timm 0.4.9 for ``vits.py`` (it imports ``timm.models.layers.helpers``, gone in timm 1.0): a side folder
  made with ``pip install --target TIMM timm==0.4.9``. It shadows the project's timm only while the
  original's ``vits.py`` is imported; afterwards ``sys.modules`` holds the project's timm again, and the
  original's classes keep their references to the 0.4.9 modules.
- a process group: its loss gathers keys with ``torch.distributed.all_gather`` and reads the rank; a
  1-process gloo group is created when none exists.
- its loss calls ``.cuda()`` on the labels: while its model runs, ``Tensor.cuda`` returns the tensor itself
  when no CUDA device is present.
The model is built as the original's main_moco builds it (``MoCo_ViT(partial(vits.<arch>,
stop_grad_conv1=...))``, ``MoCo_ResNet(partial(torchvision resnet50, zero_init_residual=True))``), under
the float64 default dtype in float64 mode and never cast: its tensors keep the dtypes the original gives
them (its ViT pos_embed is float32). A reduced depth (``--depth``) builds the original's
``VisionTransformerMoCo`` class with the arch's other settings, as its factory does.
"""
import contextlib
import functools
import importlib.util
import os
import sys
import tempfile

import numpy as np

REQUIRED = ('moco/builder.py', 'moco/optimizer.py', 'vits.py')


class OfficialError(Exception):
    """A one-line message for the user (bad --official-src / --timm-src)."""


class Official:
    """The original's modules: ``builder``, ``optimizer`` and (for ViTs) ``vits``."""

    def __init__(self, src, timm_src=None):
        self.src = os.path.abspath(src) if src else src
        self.timm_src = os.path.abspath(timm_src) if timm_src else None
        check_src(src)
        if timm_src is not None:
            check_timm_src(timm_src)
        tag = abs(hash(self.src))
        self.builder = _load_file(f'_moco_official_{tag}.builder', os.path.join(self.src, 'moco', 'builder.py'))
        self.optimizer = _load_file(f'_moco_official_{tag}.optimizer', os.path.join(self.src, 'moco', 'optimizer.py'))
        self._vits = None
        self._tag = tag

    @property
    def vits(self):
        if self._vits is None:
            self._vits = load_vits(os.path.join(self.src, 'vits.py'), self.timm_src, f'_moco_official_{self._tag}.vits')
        return self._vits


def check_src(src):
    if not src or not os.path.isdir(src):
        raise OfficialError(f'--official-src {src}: not a folder; expected a checkout of facebookresearch/moco-v3 '
                            f'holding {", ".join(REQUIRED)}')
    missing = [f for f in REQUIRED if not os.path.isfile(os.path.join(src, f))]
    if missing:
        raise OfficialError(f'--official-src {src}: no {", ".join(missing)} there; expected a checkout of '
                            f'facebookresearch/moco-v3 holding {", ".join(REQUIRED)}')


def check_timm_src(timm_src):
    if not os.path.isfile(os.path.join(timm_src, 'timm', '__init__.py')):
        raise OfficialError(f'--timm-src {timm_src}: no timm/__init__.py there; make the folder with '
                            f'`pip install --target {timm_src} timm==0.4.9`')


def _load_file(name, path):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(mod)
    except Exception as e:  # noqa: BLE001  (any import failure of the user's file becomes one line)
        raise OfficialError(f'{path}: could not be imported ({type(e).__name__}: {e})') from e
    return mod


def _is_timm(name):
    return name == 'timm' or name.startswith('timm.')


def load_vits(path, timm_src, name):
    """Import the original's vits.py with timm 0.4.9 from ``timm_src`` shadowing the project's timm for
    that import only."""
    if timm_src is None:
        raise OfficialError(f'{path} needs timm 0.4.9 (it imports timm.models.layers.helpers, gone in timm 1.0): '
                            f'make a side folder with `pip install --target DIR timm==0.4.9` and pass --timm-src DIR')
    saved = {k: v for k, v in sys.modules.items() if _is_timm(k)}
    for k in saved:
        del sys.modules[k]
    sys.path.insert(0, timm_src)
    try:
        import timm
        if not os.path.abspath(timm.__file__).startswith(timm_src + os.sep):
            raise OfficialError(f'--timm-src {timm_src}: timm was imported from {timm.__file__} instead')
        version = getattr(timm, '__version__', '?')
        mod = _load_file(name, path)
        mod.TIMM_VERSION = version
        return mod
    finally:
        sys.path.remove(timm_src)
        for k in [k for k in sys.modules if _is_timm(k)]:
            del sys.modules[k]
        sys.modules.update(saved)


# ------------------------------------------------------------------------------------------ CPU shims
_GROUP_FILE = None


def ensure_process_group():
    """A 1-process gloo group (the original's loss gathers keys over the group and reads the rank)."""
    global _GROUP_FILE
    import torch.distributed as dist
    if dist.is_available() and not dist.is_initialized():
        fd, _GROUP_FILE = tempfile.mkstemp(prefix='moco_official_pg_')
        os.close(fd)
        os.unlink(_GROUP_FILE)
        dist.init_process_group('gloo', init_method=f'file://{_GROUP_FILE}', rank=0, world_size=1)


@contextlib.contextmanager
def cuda_as_cpu():
    """While the original's model runs: ``Tensor.cuda()`` returns the tensor itself (no CUDA device here)."""
    import torch
    if torch.cuda.is_available():
        yield
        return
    old = torch.Tensor.cuda
    torch.Tensor.cuda = lambda self, *a, **k: self
    try:
        yield
    finally:
        torch.Tensor.cuda = old


def _run_on_cpu(forward, *args, **kwargs):
    with cuda_as_cpu():
        return forward(*args, **kwargs)


# ------------------------------------------------------------------------------------------ models
def build_official_moco(off, arch, dim=256, mlp_dim=4096, T=1.0, img_size=224, stop_grad_conv1=False,
                        dtype='float64', seed=0, **vit_kwargs):
    """The original's MoCo model as its main_moco builds it, under ``dtype`` as the default dtype."""
    import torch
    import torchvision.models as tvm

    from torch_ref import vits as tvits
    from .scenarios import torch_dtype
    ensure_process_group()
    torch.manual_seed(seed)
    with torch_dtype(dtype):
        if arch.startswith('vit'):
            if not hasattr(off.vits, arch):
                raise OfficialError(f"the original vits.py has no '{arch}' (it has {', '.join(off.vits.__all__)})")
            patch, emb, depth, heads, conv = tvits.ARCH_CONFIGS[arch]
            depth = vit_kwargs.pop('depth', depth)
            if vit_kwargs:
                raise OfficialError(f'--reference official: unsupported ViT settings {sorted(vit_kwargs)}')
            if depth == tvits.ARCH_CONFIGS[arch][2]:
                factory = functools.partial(getattr(off.vits, arch), img_size=img_size, stop_grad_conv1=stop_grad_conv1)
            else:  # the original factory with another depth: its class with the factory's other settings
                kw = dict(patch_size=patch, embed_dim=emb, depth=depth, num_heads=heads, mlp_ratio=4, qkv_bias=True,
                          norm_layer=functools.partial(torch.nn.LayerNorm, eps=1e-6), img_size=img_size,
                          stop_grad_conv1=stop_grad_conv1)
                if conv:
                    kw['embed_layer'] = off.vits.ConvStem
                factory = functools.partial(off.vits.VisionTransformerMoCo, **kw)
            model = off.builder.MoCo_ViT(factory, dim, mlp_dim, T)
        else:
            model = off.builder.MoCo_ResNet(functools.partial(getattr(tvm, arch), zero_init_residual=True),
                                            dim, mlp_dim, T)
    model.forward = functools.partial(_run_on_cpu, model.forward)
    return model


def build_official_pair(off, arch, dtype='float64', img_size=32, dim=256, mlp_dim=1024, T=0.2, seed=0,
                        stop_grad_conv1=False, **vit_kwargs):
    """(the original's model, a paddle_impl twin holding its weights): the pair of ``scenarios.build_pair``."""
    import paddle

    from convert import bridge
    from paddle_impl import models as pm
    from .scenarios import paddle_dtype
    tmod = build_official_moco(off, arch, dim, mlp_dim, T, img_size, stop_grad_conv1, dtype, seed, **dict(vit_kwargs))
    paddle.seed(seed)
    with paddle_dtype(dtype):
        pmod = pm.build_moco(arch, dim, mlp_dim, T, img_size=img_size, stop_grad_conv1=stop_grad_conv1, **vit_kwargs)
    bridge.torch_to_paddle_model(tmod, pmod)
    return tmod, pmod


def official_optimizer(off):
    """The optimizers of the original's main_moco: its LARS (moco/optimizer.py), torch's AdamW."""
    import torch

    def build(name, params, lr, weight_decay, momentum=0.9):
        if name == 'lars':
            return off.optimizer.LARS(params, lr=lr, weight_decay=weight_decay, momentum=momentum)
        return torch.optim.AdamW(params, lr, weight_decay=weight_decay)
    return build


def dtype_rows(tmod, pmod, reference='torch_ref'):
    """A judged row: every Paddle parameter/buffer holds the dtype the reference gives the same tensor."""
    from convert.keymap import torch_to_paddle

    from .compare import flag
    tdt = torch_to_paddle({k: np.zeros(1, dtype=str(v.dtype).replace('torch.', '')) for k, v in tmod.state_dict().items()
                           if v.is_floating_point()})[0]
    pdt = {k: str(v.dtype).replace('paddle.', '') for k, v in pmod.state_dict().items()}
    diff = [f'{k}: {reference} {tdt[k].dtype}, paddle {pdt.get(k)}' for k in sorted(tdt) if str(tdt[k].dtype) != pdt.get(k)]
    kinds = sorted({f'{v.dtype}' for v in tdt.values()})
    odd = sorted(k for k, v in tdt.items() if str(v.dtype) != kinds[-1]) if len(kinds) > 1 else []
    return [flag(f'dtypes: every tensor as {reference} has it', not diff,
                 note='; '.join(diff[:3]) or f'{len(tdt)} tensors, dtypes {kinds}' + (f' ({odd[:2]} ...)' if odd else ''))]
