"""Reading a checkpoint into a Checkpoint: which framework's layout, which kind (from key names), which arch
and image size (from shapes), then every key and shape checked against what that kind of that arch holds."""
import json
import math
import os
import re

import numpy as np

from paddle_impl.io import CheckpointError

from . import keymap
from .formats import _OUR_META, _is_array, _strip_prefixes, _unwrap, load_raw
from .keymap import KeyMapError, check_state_dict
from .spec import KIND_WORDS, KINDS, NBT, Checkpoint, _arch_configs, _known_archs, expected_shapes
from .translate import _nbt_from_meta, _optimizer_in, _scaler_paddle_to_torch


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
    sd, framework = _torch_layout(sd, path, meta, fmt, expect_framework)
    kind = _resolve_kind(path, _detect_kind(sd, container), kind)
    enc = keymap.strip_prefix(sd, 'base_encoder.') if kind == 'pretrain' else sd
    got_arch, got_img = _resolve_arch(path, enc, arch, img_size)
    ck = Checkpoint(path=path, kind=kind, arch=got_arch, img_size=got_img, framework=framework)
    _read_widths(ck, sd)
    spec = expected_shapes(kind, got_arch, got_img or 224, ck.dim, ck.mlp_dim, ck.num_classes)
    try:
        check_state_dict(sd, spec, f"'{path}' ({KIND_WORDS[kind]}, {got_arch})")
    except KeyMapError as e:
        raise CheckpointError(str(e)) from None
    ck.state_dict = {k: sd[k] for k in spec}  # the official order
    _read_rest(ck, dict(meta), fmt)
    return ck


def _torch_layout(sd, path, meta, fmt, expect_framework):
    """(the state dict in the torch layout without prefixes, the framework of the file)."""
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
    if framework == 'paddle':
        sd = keymap.paddle_to_torch(sd, _nbt_from_meta(meta, fmt))
    return sd, framework


def _resolve_kind(path, found, kind):
    """The kind found in the file, checked against the one asked for."""
    if found == 'encoder+projector':
        raise CheckpointError(f"'{path}' holds one encoder with its MoCo projector but no momentum encoder or "
                              f"predictor: not a pre-training, linear or backbone checkpoint")
    if kind != 'auto':
        if kind not in KINDS:
            raise CheckpointError(f"unknown --kind '{kind}'; one of: auto, {', '.join(KINDS)}")
        _kind_clash(path, found, kind)
        if {found, kind} <= {'deit', 'backbone'}:
            found = kind
    return found


def _resolve_arch(path, enc, arch, img_size):
    """(arch, image size) found in the encoder's shapes, checked against the ones asked for."""
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
    return got_arch, got_img


def _read_widths(ck, sd):
    """The MoCo dim / mlp_dim (pretrain) or the class count (linear), from the shapes."""
    head = 'fc' if ck.arch == 'resnet50' else 'head'
    if ck.kind == 'pretrain':
        w0 = sd.get(f'base_encoder.{head}.0.weight')
        wl = sd.get(f'base_encoder.{head}.{3 if head == "fc" else 6}.weight')
        if w0 is None or wl is None:
            raise CheckpointError(f"'{ck.path}': a pre-training checkpoint without the projector "
                                  f"base_encoder.{head}.* ")
        ck.mlp_dim, ck.dim = int(np.shape(w0)[0]), int(np.shape(wl)[0])
    elif ck.kind == 'linear':
        ck.num_classes = int(np.shape(sd[f'{head}.weight'])[0])


def _read_rest(ck, meta, fmt):
    """Everything else in the file: epoch, best_acc1, the stored arch, optimizer, scaler, other entries."""
    ck.epoch = meta.pop('epoch', None)
    ck.best_acc1 = meta.pop('best_acc1', None)
    stored_arch = meta.pop('arch', None)
    if isinstance(stored_arch, str) and stored_arch != ck.arch and stored_arch in _known_archs():
        raise CheckpointError(f"'{ck.path}' says arch '{stored_arch}' but its weights are a {ck.arch}")
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
        ck.optimizer, ck.optimizer_note = _optimizer_in(opt, ck.framework, ck,
                                                        args if isinstance(args, dict) else None,
                                                        meta.get('global_step'))
    if scaler is not None:
        ck.scaler = scaler if ck.framework == 'torch' else _scaler_paddle_to_torch(scaler)
