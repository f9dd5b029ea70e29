"""MoCo v3 checkpoints between PyTorch and Paddle: read any of them safely, say what they are, convert.

Kinds (what a file holds):
  pretrain  the whole MoCo model (base + momentum encoder with projectors, predictor), as main_moco saves:
            {'epoch', 'arch', 'state_dict' (module.base_encoder. / module.momentum_encoder. / module.predictor.),
             'optimizer', 'scaler'}
  linear    a classifier (ViT head / ResNet fc), as main_lincls saves:
            {'epoch', 'arch', 'state_dict' (module.), 'best_acc1', 'optimizer'}
  deit      the base encoder without its projector, as convert_to_deit writes: {'model': backbone}
  backbone  the same weights as a bare state dict

Everything is read with numpy alone (paddle_impl.io: no code in a file is ever run) and kept internally in
the torch layout (names, [out, in] Linear weights, num_batches_tracked), in the official module order; the
Paddle layout is produced through convert.keymap, the one place that knows the mapping.

Paddle files we write (.pdparams, our safe pickle, paddle_impl.io.load_checkpoint):
  pretrain / linear: {'format', 'kind', 'arch', 'img_size', 'epoch', 'state_dict' (Paddle names, no prefix),
                      'optimizer' (keyed by parameter name, see below), 'scaler' (Paddle GradScaler form),
                      'best_acc1', 'torch_extras': {'num_batches_tracked': {...}}}
  deit: {'format', 'kind', 'arch', 'img_size', 'model', 'torch_extras'};  backbone: the bare state dict.
Optimizer state: torch's is keyed by the index of a parameter in model.parameters(), a Paddle optimizer's by
run-time tensor names; neither survives the other framework. Paddle files carry the form of the Paddle
trainer (paddle_impl.utils.optimizer_state: {'type', 'lr', 'accumulators': {name: {parameter: array}}}, so
main_moco --resume continues a converted run), with torch's AdamW exp_avg/exp_avg_sq/step as Paddle's
moment1/moment2/beta pows, LARS mu as mu, SGD momentum_buffer as Momentum velocity, Linear-weight states
transposed, plus a 'torch' entry with what only torch has, so that paddle2torch restores the original exactly.
A Paddle-trained optimizer goes to torch when its weight decay is known (the checkpoint's 'args'). Anything
else (several param groups, Paddle's own tensor-name state dict) is dropped with a printed line: the weights
still convert; only resuming the optimizer is lost.
"""
import json
import math
import os
import re
from dataclasses import dataclass, field

import numpy as np

from paddle_impl.io import (CheckpointError, atomic_write, load_checkpoint, load_safetensors,
                            load_torch_file_safe, save_checkpoint, sniff_format)

from . import keymap
from .keymap import KeyMapError, check_state_dict

KINDS = ('pretrain', 'linear', 'deit', 'backbone')
KIND_WORDS = {'pretrain': 'MoCo pre-training', 'linear': 'linear-classification (classifier)',
              'deit': 'DeiT-format backbone', 'backbone': 'bare backbone'}
FORMAT = 'mocov3-paddle/1'
TORCH_EXTS = ('.pth', '.pth.tar', '.pt', '.tar', '.bin')
PADDLE_EXTS = ('.pdparams',)
NBT = keymap.NBT
_BUFFER_SUFFIXES = ('.running_mean', '.running_var', NBT)
_PREFIXES = ('module.', '_layers.')
_OUR_META = ('format', 'kind', 'img_size', 'torch_extras', 'framework')


def _arch_configs():
    from paddle_impl.vits import ARCH_CONFIGS  # one table for both sides (torch_ref/vits.py has the same)
    return ARCH_CONFIGS


def _known_archs():
    return list(_arch_configs()) + ['resnet50']


@dataclass
class Checkpoint:
    """A checkpoint read into the torch layout (whatever file it came from)."""
    path: str
    kind: str
    arch: str
    img_size: int = None              # None for ResNet (any multiple of 32 works)
    state_dict: dict = field(default_factory=dict)   # torch names and layout, no 'module.' prefix
    framework: str = 'torch'          # layout of the file it was read from
    dim: int = None                   # MoCo projector output (pretrain)
    mlp_dim: int = None               # MoCo MLP hidden width (pretrain)
    num_classes: int = None           # classifier width (linear)
    epoch: object = None
    best_acc1: object = None
    optimizer: dict = None            # torch form ({'state': {index: ...}, 'param_groups': [...]}) or None
    optimizer_note: str = None        # why the optimizer was not kept, if it was not
    scaler: dict = None               # torch GradScaler form or None
    extra: dict = field(default_factory=dict)  # other plain top-level entries, passed through

    def describe(self):
        bits = [self.arch]
        if self.img_size:
            bits.append(f'img {self.img_size}')
        if self.kind == 'pretrain':
            bits.append(f'dim {self.dim}, mlp_dim {self.mlp_dim}')
        if self.kind == 'linear':
            bits.append(f'{self.num_classes} classes')
        if self.epoch is not None:
            bits.append(f'epoch {_num(self.epoch)}')
        fw = {'torch': 'PyTorch', 'paddle': 'Paddle'}[self.framework]
        return f'{fw} {KIND_WORDS[self.kind]} checkpoint, ' + ', '.join(bits)


def _num(x):
    x = np.asarray(x) if isinstance(x, np.ndarray) else x
    return x.item() if isinstance(x, (np.ndarray, np.generic)) else x


# ------------------------------------------------------------------------------------- expected shapes

def _bn(prefix, n, affine=True):
    out = {}
    if affine:
        out[prefix + '.weight'] = (n,)
        out[prefix + '.bias'] = (n,)
    out[prefix + '.running_mean'] = (n,)
    out[prefix + '.running_var'] = (n,)
    out[prefix + NBT] = ()
    return out


def _mlp(prefix, num_layers, input_dim, mlp_dim, output_dim, last_bn):
    """Shapes of builder.MoCo._build_mlp (torch layout): Linear / BN1d / ReLU triples."""
    out, i = {}, 0
    for l in range(num_layers):
        d1 = input_dim if l == 0 else mlp_dim
        d2 = output_dim if l == num_layers - 1 else mlp_dim
        out[f'{prefix}.{i}.weight'] = (d2, d1)
        i += 1
        if l < num_layers - 1:
            out.update(_bn(f'{prefix}.{i}', d2))
            i += 2
        elif last_bn:
            out.update(_bn(f'{prefix}.{i}', d2, affine=False))
    return out


def _vit_spec(arch, img_size):
    patch, D, depth, _, conv = _arch_configs()[arch]
    g = img_size // patch
    s = {'cls_token': (1, 1, D), 'pos_embed': (1, 1 + g * g, D)}
    if conv:
        cin, cout = 3, D // 8
        for i in range(4):
            s[f'patch_embed.proj.{3 * i}.weight'] = (cout, cin, 3, 3)
            s.update(_bn(f'patch_embed.proj.{3 * i + 1}', cout))
            cin, cout = cout, cout * 2
        s['patch_embed.proj.12.weight'] = (D, cin, 1, 1)
        s['patch_embed.proj.12.bias'] = (D,)
    else:
        s['patch_embed.proj.weight'] = (D, 3, patch, patch)
        s['patch_embed.proj.bias'] = (D,)
    for b in range(depth):
        p = f'blocks.{b}.'
        s.update({p + 'norm1.weight': (D,), p + 'norm1.bias': (D,),
                  p + 'attn.qkv.weight': (3 * D, D), p + 'attn.qkv.bias': (3 * D,),
                  p + 'attn.proj.weight': (D, D), p + 'attn.proj.bias': (D,),
                  p + 'norm2.weight': (D,), p + 'norm2.bias': (D,),
                  p + 'mlp.fc1.weight': (4 * D, D), p + 'mlp.fc1.bias': (4 * D,),
                  p + 'mlp.fc2.weight': (D, 4 * D), p + 'mlp.fc2.bias': (D,)})
    s['norm.weight'] = (D,)
    s['norm.bias'] = (D,)
    return s, D


def _resnet50_spec():
    s = {'conv1.weight': (64, 3, 7, 7)}
    s.update(_bn('bn1', 64))
    inplanes = 64
    for li, (planes, blocks) in enumerate(zip((64, 128, 256, 512), (3, 4, 6, 3)), 1):
        for j in range(blocks):
            p = f'layer{li}.{j}.'
            s[p + 'conv1.weight'] = (planes, inplanes, 1, 1)
            s.update(_bn(p + 'bn1', planes))
            s[p + 'conv2.weight'] = (planes, planes, 3, 3)
            s.update(_bn(p + 'bn2', planes))
            s[p + 'conv3.weight'] = (planes * 4, planes, 1, 1)
            s.update(_bn(p + 'bn3', planes * 4))
            if j == 0:
                s[p + 'downsample.0.weight'] = (planes * 4, inplanes, 1, 1)
                s.update(_bn(p + 'downsample.1', planes * 4))
            inplanes = planes * 4
    return s, 2048


def expected_shapes(kind, arch, img_size=224, dim=256, mlp_dim=4096, num_classes=1000):
    """name -> shape of the state dict a ``kind`` checkpoint of ``arch`` holds, torch layout, in the order of
    the official model's state_dict (no 'module.' prefix). Built from the arch table, no model needed."""
    if arch == 'resnet50':
        enc, width = _resnet50_spec()
        head, proj_layers, pred_last_bn = 'fc', 2, False
    elif arch in _arch_configs():
        enc, width = _vit_spec(arch, img_size)
        head, proj_layers, pred_last_bn = 'head', 3, True
    else:
        raise CheckpointError(f"unknown arch '{arch}'; known: {', '.join(_known_archs())}")
    if kind in ('deit', 'backbone'):
        return dict(enc)
    if kind == 'linear':
        return {**enc, f'{head}.weight': (num_classes, width), f'{head}.bias': (num_classes,)}
    if kind == 'pretrain':
        one = {**enc, **_mlp(head, proj_layers, width, mlp_dim, dim, True)}
        out = {f'base_encoder.{k}': v for k, v in one.items()}
        out.update({f'momentum_encoder.{k}': v for k, v in one.items()})
        out.update(_mlp('predictor', 2, dim, mlp_dim, dim, pred_last_bn))
        return out
    raise CheckpointError(f"unknown kind '{kind}'; known: {', '.join(KINDS)}")


def torch_shapes_to_paddle(shapes):
    """The Paddle layout of a torch name -> shape table (the key map's rules, on shapes only)."""
    out = {}
    for k, shp in shapes.items():
        if k.endswith(NBT):
            continue
        if k.endswith('.weight') and len(shp) == 2:
            shp = tuple(reversed(shp))
        out[keymap._swap_suffix(k, keymap._TORCH_TO_PADDLE_SUFFIX)] = tuple(shp)
    return out


def is_buffer(name):
    return name.endswith(_BUFFER_SUFFIXES)


# ------------------------------------------------------------------------------------------ reading files

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


def detect_framework(sd, path, meta=None):
    if meta and meta.get('framework') in ('torch', 'paddle'):
        return meta['framework']
    if any(k.endswith(('.running_mean', '.running_var', NBT)) for k in sd):
        return 'torch'
    if any(k.endswith(('._mean', '._variance')) for k in sd):
        return 'paddle'
    for k, v in sd.items():
        if k.endswith('attn.qkv.weight') and np.ndim(v) == 2:
            a, b = np.shape(v)
            if a == 3 * b:
                return 'torch'
            if b == 3 * a:
                return 'paddle'
    raise CheckpointError(f"'{path}': cannot tell whether this state dict is in the PyTorch or the Paddle layout "
                          f"(no BatchNorm buffers, no attention weights): not a MoCo v3 model")


def _detect_kind(sd, container):
    if any(k.startswith(('base_encoder.', 'momentum_encoder.', 'predictor.')) for k in sd):
        return 'pretrain'
    if 'head.weight' in sd or 'fc.weight' in sd:
        return 'linear'
    if 'head.0.weight' in sd or 'fc.0.weight' in sd:
        return 'encoder+projector'
    return 'deit' if container == 'deit' else 'backbone'


def _blocks(sd, pattern):
    idx = set()
    for k in sd:
        m = re.match(pattern, k)
        if m:
            idx.add(tuple(int(g) for g in m.groups()))
    return idx


def detect_arch(enc, path):
    """(arch, img_size or None) of an encoder state dict (torch layout, no prefix) from its shapes."""
    if 'conv1.weight' in enc and any(k.startswith('layer1.') for k in enc):
        blocks = _blocks(enc, r'layer(\d+)\.(\d+)\.')
        counts = [1 + max([j for (i, j) in blocks if i == L], default=-1) for L in (1, 2, 3, 4)]
        if counts == [3, 4, 6, 3] and tuple(np.shape(enc['conv1.weight'])) == (64, 3, 7, 7):
            return 'resnet50', None
        raise CheckpointError(f"'{path}' holds a ResNet with {counts} blocks per stage, which is not resnet50 "
                              f"(the only ResNet of MoCo v3)")
    if 'cls_token' in enc and 'pos_embed' in enc:
        D = int(np.shape(enc['cls_token'])[-1])
        depth = 1 + max([b for (b,) in _blocks(enc, r'blocks\.(\d+)\.')], default=-1)
        conv = 'patch_embed.proj.0.weight' in enc
        if conv:
            patch = 16
        elif 'patch_embed.proj.weight' in enc:
            patch = int(np.shape(enc['patch_embed.proj.weight'])[-1])
        else:
            raise CheckpointError(f"'{path}': a ViT without a patch embedding (patch_embed.proj.*)")
        found = [a for a, (p, d, dep, _, c) in _arch_configs().items() if (p, d, dep, c) == (patch, D, depth, conv)]
        if not found:
            raise CheckpointError(f"'{path}' holds a ViT of width {D}, depth {depth}, patch {patch}"
                                  f"{', conv stem' if conv else ''}: none of the known archs "
                                  f"({', '.join(_known_archs())})")
        n = int(np.shape(enc['pos_embed'])[1]) - 1
        g = math.isqrt(n)
        if g * g != n:
            raise CheckpointError(f"'{path}': pos_embed has {n} patch tokens, not a square grid")
        return found[0], g * patch
    raise CheckpointError(f"'{path}' holds neither a ViT (cls_token, pos_embed) nor a ResNet (conv1, layer1): "
                          f"not a MoCo v3 model")


def _kind_clash(path, found, wanted):
    if found == wanted or {found, wanted} <= {'deit', 'backbone'}:
        return
    hint = {
        ('linear', 'pretrain'): 'released linear-*.pth.tar files are classifiers; pre-training files are the '
                                'other ones (e.g. vit-b-300ep.pth.tar)',
        ('pretrain', 'linear'): "a pre-training file holds no classifier; to train one, start from it "
                                "(its backbone: 'python -m convert extract')",
    }.get((found, wanted), f"pass --kind {found} or --kind auto")
    raise CheckpointError(f"'{path}' is a {KIND_WORDS[found]} checkpoint, not a {KIND_WORDS[wanted]} one "
                          f"(--kind {wanted}); {hint}")


def read_checkpoint(path, kind='auto', arch='auto', img_size='auto', expect_framework=None):
    """Read any MoCo v3 checkpoint (torch or Paddle, any kind) into a Checkpoint in the torch layout,
    after checking every key and shape against the detected (or given) kind and arch."""
    path = os.fspath(path)
    obj, fmt, st_meta = load_raw(path)
    return from_object(obj, path, kind, arch, img_size, expect_framework, fmt, st_meta)


def from_object(obj, path='<memory>', kind='auto', arch='auto', img_size='auto', expect_framework=None,
                fmt='pickle', st_meta=None):
    """read_checkpoint on an object already loaded (``path`` only names it in messages)."""
    sd, container, meta = _unwrap(obj, path)
    if st_meta:
        meta = {k: v for k, v in st_meta.items()}
    bad = [k for k, v in sd.items() if not _is_array(v)]
    if bad:
        raise CheckpointError(f"'{path}': state dict entry '{bad[0]}' is a {type(sd[bad[0]]).__name__}, "
                              f"not a tensor")
    sd = _strip_prefixes(dict(sd))
    framework = detect_framework(sd, path, meta if fmt == 'safetensors' else None)
    if expect_framework and framework != expect_framework:
        other = {'torch': 'torch2paddle', 'paddle': 'paddle2torch'}[framework]
        word = {'torch': 'PyTorch', 'paddle': 'Paddle'}
        raise CheckpointError(f"'{path}' is already a {word[framework]} checkpoint, not a "
                              f"{word[expect_framework]} one; use 'python -m convert {other}'")

    extras = {}
    if framework == 'paddle':
        extras = _nbt_from_meta(meta, fmt)
        sd = keymap.paddle_to_torch(sd, extras)

    found = _detect_kind(sd, container)
    if found == 'encoder+projector':
        raise CheckpointError(f"'{path}' holds one encoder with its MoCo projector but no momentum encoder or "
                              f"predictor: not a pre-training, linear or backbone checkpoint")
    if kind != 'auto':
        if kind not in KINDS:
            raise CheckpointError(f"unknown --kind '{kind}'; one of: auto, {', '.join(KINDS)}")
        _kind_clash(path, found, kind)
        if {found, kind} <= {'deit', 'backbone'}:
            found = kind
    kind = found

    enc = keymap.strip_prefix(sd, 'base_encoder.') if kind == 'pretrain' else sd
    got_arch, got_img = detect_arch(enc, path)
    if arch not in ('auto', None) and arch != got_arch:
        if arch not in _known_archs():
            raise CheckpointError(f"unknown --arch '{arch}'; known: {', '.join(_known_archs())}")
        raise CheckpointError(f"'{path}' holds a {got_arch}, not a {arch} (--arch {arch}); pass --arch "
                              f"{got_arch} or --arch auto")
    if img_size not in ('auto', None):
        img_size = int(img_size)
        if got_img is not None and img_size != got_img:
            raise CheckpointError(f"'{path}' is a {got_arch} for {got_img}x{got_img} images (its pos_embed), "
                                  f"not {img_size}; pass --img-size {got_img} or --img-size auto")
        if got_img is None and img_size % 32:
            raise CheckpointError(f'--img-size {img_size}: a ResNet needs a multiple of 32')
        got_img = img_size

    ck = Checkpoint(path=path, kind=kind, arch=got_arch, img_size=got_img, framework=framework)
    head = 'fc' if got_arch == 'resnet50' else 'head'
    if kind == 'pretrain':
        w0 = sd.get(f'base_encoder.{head}.0.weight')
        wl = sd.get(f'base_encoder.{head}.{3 if head == "fc" else 6}.weight')
        if w0 is None or wl is None:
            raise CheckpointError(f"'{path}': a pre-training checkpoint without the projector "
                                  f"base_encoder.{head}.* ")
        ck.mlp_dim, ck.dim = int(np.shape(w0)[0]), int(np.shape(wl)[0])
    elif kind == 'linear':
        ck.num_classes = int(np.shape(sd[f'{head}.weight'])[0])
    spec = expected_shapes(kind, got_arch, got_img or 224, ck.dim, ck.mlp_dim, ck.num_classes)
    try:
        check_state_dict(sd, spec, f"'{path}' ({KIND_WORDS[kind]}, {got_arch})")
    except KeyMapError as e:
        raise CheckpointError(str(e)) from None
    ck.state_dict = {k: sd[k] for k in spec}  # the official order

    # everything else in the file
    meta = dict(meta)
    ck.epoch = meta.pop('epoch', None)
    ck.best_acc1 = meta.pop('best_acc1', None)
    stored_arch = meta.pop('arch', None)
    if isinstance(stored_arch, str) and stored_arch != got_arch and stored_arch in _known_archs():
        raise CheckpointError(f"'{path}' says arch '{stored_arch}' but its weights are a {got_arch}")
    opt = meta.pop('optimizer', None)
    scaler = meta.pop('scaler', None)
    if fmt == 'safetensors':
        for k in ('epoch', 'best_acc1'):
            v = getattr(ck, k)
            if isinstance(v, str):
                setattr(ck, k, json.loads(v))
        meta = {}
    for k in _OUR_META:
        meta.pop(k, None)
    args = meta.get('args')
    ck.extra = meta
    if opt is not None:
        ck.optimizer, ck.optimizer_note = _optimizer_in(opt, framework, ck, args if isinstance(args, dict) else None,
                                                        meta.get('global_step'))
    if scaler is not None:
        ck.scaler = scaler if framework == 'torch' else _scaler_paddle_to_torch(scaler)
    return ck


def _nbt_from_meta(meta, fmt):
    ex = meta.get('torch_extras') if meta else None
    if isinstance(ex, dict):
        return _strip_prefixes(dict(ex.get('num_batches_tracked', {})))
    if fmt == 'safetensors' and meta and 'num_batches_tracked' in meta:
        return {k: np.array(v, dtype=np.int64) for k, v in json.loads(meta['num_batches_tracked']).items()}
    return {}


# ------------------------------------------------------------------------------- optimizer and scaler

def _opt_param_names(ck, n):
    """Names of the ``n`` parameters an optimizer of ``ck`` was given, in order: model.parameters() order
    (= the official state_dict order without buffers), or the classifier alone (main_lincls)."""
    names = [k for k in ck.state_dict if not is_buffer(k)]
    if n == len(names):
        return names
    head = 'fc' if ck.arch == 'resnet50' else 'head'
    if ck.kind == 'linear' and n == 2:  # main_lincls optimises only the classifier
        return [f'{head}.weight', f'{head}.bias']
    return None


def _transposed_like(name, v, shape):
    """A state entry of Linear weight ``name`` shaped like it (shape given in the source layout) -> transposed."""
    if name.endswith('.weight') and len(shape) == 2 and isinstance(v, np.ndarray) and v.shape == tuple(shape):
        return np.ascontiguousarray(v.T)
    return v


def _optimizer_in(opt, framework, ck, args=None, global_step=None):
    """The file's optimizer state -> (torch form or None, note why it was dropped)."""
    if not isinstance(opt, dict):
        return None, f'optimizer entry is a {type(opt).__name__}; dropped'
    if framework == 'torch':
        groups, state = opt.get('param_groups'), opt.get('state')
        if not isinstance(groups, list) or not isinstance(state, dict):
            return None, 'optimizer state is not a torch optimizer state_dict; dropped'
        ids = [i for g in groups for i in g.get('params', [])]
        names = _opt_param_names(ck, len(ids))
        if len(groups) != 1 or names is None or sorted(ids) != list(range(len(ids))):
            return None, (f'optimizer with {len(groups)} param group(s) over {len(ids)} parameters: cannot tell '
                          f'which parameter each entry belongs to; dropped')
        shapes = {k: np.shape(ck.state_dict[k]) for k in names}
        for i, st in state.items():
            if not isinstance(st, dict) or not (isinstance(i, int) and 0 <= i < len(names)):
                return None, 'optimizer state entries are not per-parameter dicts; dropped'
            for v in st.values():
                if isinstance(v, np.ndarray) and v.ndim > 0 and v.shape != shapes[names[i]]:
                    return None, (f'optimizer state of parameter {i} has shape {v.shape}, not that of '
                                  f'{names[i]} {shapes[names[i]]}: its order is not the model order; dropped')
        return opt, None
    if 'accumulators' not in opt:
        return None, ("optimizer state is in Paddle's own form (keyed by run-time tensor names, which no other "
                      "process can map to parameters); dropped")
    try:
        return _optimizer_paddle_to_torch(opt, ck, args or {}, global_step), None
    except _Drop as e:
        return None, f'{e}; dropped'


class _Drop(Exception):
    pass


# torch optimizer -> the Paddle trainer's optimizer (paddle_impl.utils.optimizer_state):
# {'type', 'lr', 'accumulators': {accumulator: {parameter name: array}}}; Linear-weight states transposed.
_ACCS = {'AdamW': {'exp_avg': 'moment1', 'exp_avg_sq': 'moment2'}, 'LARS': {'mu': 'mu'},
         'Momentum': {'momentum_buffer': 'velocity'}}


def _torch_opt_type(group):
    if 'betas' in group:
        return 'AdamW' if group.get('decoupled_weight_decay', True) else None
    if 'trust_coefficient' in group:
        return 'LARS'
    if 'momentum' in group and 'nesterov' in group and not group.get('nesterov') and not group.get('dampening'):
        return 'Momentum'
    return None


def optimizer_to_paddle(ck):
    """ck.optimizer (torch form) in the Paddle trainer's form (paddle_impl.utils.load_optimizer_state reads
    it), plus a 'torch' entry that takes paddle2torch back to the original exactly."""
    opt = ck.optimizer
    group = opt['param_groups'][0]
    names = _opt_param_names(ck, len(group['params']))
    typ = _torch_opt_type(group)
    accmap = _ACCS.get(typ, {})
    shapes = {k: np.shape(ck.state_dict[k]) for k in names}
    accs, rest = {}, {}
    for i, st in opt['state'].items():
        name = names[i]
        kept = {}
        for key, v in st.items():
            if key in accmap and isinstance(v, np.ndarray):
                accs.setdefault(accmap[key], {})[name] = _transposed_like(name, v, shapes[name])
                kept[key] = '@' + accmap[key]
            else:
                kept[key] = v
        if typ == 'AdamW' and 'step' in st:  # Paddle keeps beta**(step + 1) instead of the step
            step = float(np.asarray(st['step']))
            for b, acc in zip(group['betas'], ('beta1_pow_acc', 'beta2_pow_acc')):
                accs.setdefault(acc, {})[name] = np.array([b ** (step + 1)], dtype=np.float32)
        rest[name] = kept
    out = {'type': typ or 'unknown', 'lr': float(group['lr']), 'accumulators': accs}
    out['torch'] = {'param_groups': [dict(g, params=[names[i] for i in g['params']]) for g in opt['param_groups']],
                    'state': rest}
    return out


def _optimizer_paddle_to_torch(opt, ck, args, global_step):
    accs = opt['accumulators']
    names_all = [k for k in ck.state_dict if not is_buffer(k)]
    pshapes = torch_shapes_to_paddle({k: np.shape(ck.state_dict[k]) for k in names_all})

    def acc_value(acc, name):
        try:
            return _transposed_like(name, np.asarray(accs[acc][name]), pshapes[name])
        except KeyError:
            raise _Drop(f"optimizer state lacks '{acc}' of {name}") from None

    if 'torch' in opt:  # written by torch2paddle: the exact way back
        groups = opt['torch']['param_groups']
        order = [n for g in groups for n in g['params']]
        if _opt_param_names(ck, len(order)) != order:
            raise _Drop('optimizer parameter names do not match the model')
        index = {n: i for i, n in enumerate(order)}
        state = {}
        for name, st in opt['torch']['state'].items():
            if name not in index:
                raise _Drop(f'optimizer state for unknown parameter {name}')
            state[index[name]] = {k: acc_value(v[1:], name) if isinstance(v, str) and v.startswith('@') else v
                                  for k, v in st.items()}
        return {'state': dict(sorted(state.items())),
                'param_groups': [dict(g, params=[index[n] for n in g['params']]) for g in groups]}

    # written by the Paddle trainer: rebuild what torch's optimizer would hold
    typ = opt.get('type')
    if typ not in _ACCS:
        raise _Drop(f'a Paddle {typ} optimizer has no torch counterpart in MoCo v3')
    wd = args.get('weight_decay') if isinstance(args, dict) else None
    momentum = args.get('momentum', 0.9) if isinstance(args, dict) else 0.9
    if wd is None:
        raise _Drop("its weight decay is unknown (no 'args' in the checkpoint)")
    lr = float(opt.get('lr', 0.0))
    if typ == 'AdamW':
        group = {'lr': lr, 'betas': (0.9, 0.999), 'eps': 1e-08, 'weight_decay': float(wd), 'amsgrad': False,
                 'maximize': False, 'foreach': None, 'capturable': False, 'differentiable': False, 'fused': None,
                 'decoupled_weight_decay': True}
    elif typ == 'LARS':
        group = {'lr': lr, 'weight_decay': float(wd), 'momentum': float(momentum), 'trust_coefficient': 0.001}
    else:
        group = {'lr': lr, 'momentum': float(momentum), 'dampening': 0, 'weight_decay': float(wd),
                 'nesterov': False, 'maximize': False, 'foreach': None, 'differentiable': False, 'fused': None}
    inv = {v: k for k, v in _ACCS[typ].items()}
    first = inv[next(iter(inv))]
    with_state = [n for n in names_all if n in accs.get(_ACCS[typ][first], {})]
    unknown = set(n for per in accs.values() for n in per) - set(names_all)
    if unknown:
        raise _Drop(f'optimizer state for unknown parameter {sorted(unknown)[0]}')
    index = {n: i for i, n in enumerate(names_all)}
    state = {}
    for name in with_state:
        st = {}
        if typ == 'AdamW':
            b1pow = float(np.asarray(acc_value('beta1_pow_acc', name)).reshape(-1)[0])
            if b1pow > 1e-30:
                step = round(math.log(b1pow) / math.log(0.9)) - 1
            elif global_step is not None:
                step = int(global_step)
            else:
                raise _Drop('the AdamW step count is lost (beta powers underflowed, no global_step)')
            st['step'] = np.array(float(step), dtype=np.float32)
        for tkey, acc in _ACCS[typ].items():
            st[tkey] = acc_value(acc, name)
        state[index[name]] = st
    group['params'] = list(range(len(names_all)))
    return {'state': state, 'param_groups': [group]}


_SCALER_T2P = {'growth_factor': 'incr_ratio', 'backoff_factor': 'decr_ratio', 'growth_interval': 'incr_every_n_steps',
               '_growth_tracker': 'incr_count'}


def _scaler_torch_to_paddle(s):
    """torch.amp.GradScaler.state_dict() -> paddle.amp.GradScaler.state_dict() (same dynamic loss scaling:
    torch backs off on every overflow, so decr_every_n_nan_or_inf is 1)."""
    if not s:
        return {}
    if set(s) != {'scale', *_SCALER_T2P}:
        return dict(s)  # unknown form: carried as it is
    out = {'scale': np.array([s['scale']], dtype=np.float64)}
    out.update({p: s[t] for t, p in _SCALER_T2P.items()})
    out.update(decr_every_n_nan_or_inf=1, decr_count=0, use_dynamic_loss_scaling=True)
    return out


TORCH_SCALER_DEFAULT = {'scale': 65536.0, 'growth_factor': 2.0, 'backoff_factor': 0.5, 'growth_interval': 2000,
                        '_growth_tracker': 0}


def _scaler_paddle_to_torch(s):
    if isinstance(s, dict) and not s:  # a disabled Paddle GradScaler (CPU, bfloat16): a fresh torch one
        return dict(TORCH_SCALER_DEFAULT)
    if not isinstance(s, dict) or 'incr_ratio' not in s:
        return s
    out = {'scale': float(np.asarray(s['scale']).reshape(-1)[0])}
    out.update({t: s[p] for t, p in _SCALER_T2P.items()})
    return out


# ------------------------------------------------------------------------------------------- writing

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


def paddle_state_dict(ck):
    """(Paddle-layout state dict, num_batches_tracked extras) of a Checkpoint."""
    return keymap.torch_to_paddle(ck.state_dict)


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


def write_checkpoint(ck, path, framework, before_replace=None):
    """Write ``ck`` to ``path`` (atomically) in ``framework``'s layout; .pdparams / .safetensors need no torch,
    .pth needs torch. Returns the lines to print."""
    path = os.fspath(path)
    if path.lower().endswith('.safetensors'):
        sd, meta, notes = _safetensors_output(ck, framework)
        save_checkpoint(sd, path, metadata=meta, before_replace=before_replace)
        return notes
    obj, notes = build_output(ck, framework)
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
        nc = ck.num_classes if ck.kind == 'linear' else (0 if ck.arch != 'resnet50' else 1000)
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
            nc = ck.num_classes if ck.kind == 'linear' else (0 if ck.arch != 'resnet50' else 1000)
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


# -------------------------------------------------------------------------------------- the commands

def _size(path):
    n = os.path.getsize(path)
    for unit in ('B', 'KB', 'MB', 'GB'):
        if n < 1024 or unit == 'GB':
            return f'{n:.0f} {unit}' if unit == 'B' else f'{n:.1f} {unit}'
        n /= 1024


def _convert(input, output, src, dst, kind, arch, img_size, do_verify, log, tol=1e-4):
    out_fw = framework_of_output(output, default=dst)
    if out_fw != dst:
        raise CheckpointError(f"'{output}' is a {'PyTorch' if out_fw == 'torch' else 'Paddle'} file name; "
                              f"{'torch2paddle' if dst == 'paddle' else 'paddle2torch'} writes "
                              f"{'.pdparams or .safetensors' if dst == 'paddle' else '.pth / .pth.tar or .safetensors'}")
    _check_output_folder(output)
    ck = read_checkpoint(input, kind, arch, img_size, expect_framework=src)
    log(f"read '{input}': {ck.describe()}")
    def check_written(tmp):  # --verify: the file as written, before it takes the output's name
        back = read_checkpoint(tmp, ck.kind, ck.arch, ck.img_size or 'auto', expect_framework=dst)
        back.path = output
        if dst == 'paddle':
            verify(ck, back, tol, log=log)
        else:
            verify(back, ck, tol, log=log)
    notes = write_checkpoint(ck, output, dst, before_replace=check_written if do_verify else None)
    for n in notes:
        log(n)
    log(f"wrote '{output}' ({'Paddle' if dst == 'paddle' else 'PyTorch'} {ck.kind}, "
        f"{len(ck.state_dict)} tensors, {_size(output)})")
    return ck


def _check_output_folder(output):
    folder = os.path.dirname(os.path.abspath(output))
    if not os.path.isdir(folder):
        raise CheckpointError(f"cannot write '{output}': folder '{folder}' does not exist (create it first)")


def torch2paddle(input, output, kind='auto', arch='auto', img_size='auto', verify=False, log=print):
    """A PyTorch MoCo v3 checkpoint (pretrain / linear / deit / backbone) -> .pdparams or .safetensors."""
    return _convert(input, output, 'torch', 'paddle', kind, arch, img_size, verify, log)


def paddle2torch(input, output, kind='auto', arch='auto', img_size='auto', verify=False, log=print):
    """A Paddle checkpoint -> the official PyTorch layout (.pth / .pth.tar) or .safetensors."""
    return _convert(input, output, 'paddle', 'torch', kind, arch, img_size, verify, log)


def backbone_of(ck, kind='deit'):
    """The base encoder of a pretrain Checkpoint without its projector (what convert_to_deit keeps)."""
    if ck.kind != 'pretrain':
        raise CheckpointError(f"'{ck.path}' is a {KIND_WORDS[ck.kind]} checkpoint ({ck.arch}); extracting a "
                              f"backbone needs a MoCo pre-training checkpoint (module.base_encoder.*)")
    head = 'fc.' if ck.arch == 'resnet50' else 'head.'
    sd = {k[len('base_encoder.'):]: v for k, v in ck.state_dict.items()
          if k.startswith('base_encoder.') and not k.startswith('base_encoder.' + head)}
    return Checkpoint(path=ck.path, kind=kind, arch=ck.arch, img_size=ck.img_size, state_dict=sd,
                      framework=ck.framework)


def extract(input, output, kind='deit', arch='auto', img_size='auto', log=print):
    """Backbone of a pre-training checkpoint (torch or Paddle) for fine-tuning: torch output {'model': sd}
    (convert_to_deit), Paddle output the same in our format; ``kind='backbone'``: the bare state dict."""
    if kind not in ('deit', 'backbone'):
        raise CheckpointError(f"extract writes --kind deit or backbone, not '{kind}'")
    _check_output_folder(output)
    ck = read_checkpoint(input, 'auto', arch, img_size)
    log(f"read '{input}': {ck.describe()}")
    bb = backbone_of(ck, kind)
    fw = framework_of_output(output, default=ck.framework)
    for n in write_checkpoint(bb, output, fw):
        log(n)
    log(f"wrote '{output}' ({'Paddle' if fw == 'paddle' else 'PyTorch'} {kind} backbone of {ck.arch}, "
        f"{len(bb.state_dict)} tensors, {_size(output)})")
    return bb


def load_backbone(path, arch='auto'):
    """For Paddle fine-tuning / linear classification: (Paddle-layout backbone state dict, Checkpoint) from a
    pretrain, deit or backbone file of either framework (a pretrain file gives its base encoder)."""
    ck = read_checkpoint(path, 'auto', arch)
    if ck.kind == 'linear':
        raise CheckpointError(f"'{path}' is a {KIND_WORDS['linear']} checkpoint; a backbone comes from a "
                              f"pre-training (or DeiT-format) checkpoint")
    if ck.kind == 'pretrain':
        ck = backbone_of(ck)
    sd, _ = paddle_state_dict(ck)
    return sd, ck
