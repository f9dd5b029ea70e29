"""What a MoCo v3 checkpoint holds: its kinds, the Checkpoint record (torch layout, whatever file it came
from), and the name -> shape table each kind of each arch must have, built from the arch table alone."""
from dataclasses import dataclass, field

import numpy as np

from paddle_impl.io import CheckpointError

from . import keymap

KINDS = ('pretrain', 'linear', 'deit', 'backbone')
KIND_WORDS = {'pretrain': 'MoCo pre-training', 'linear': 'linear-classification (classifier)',
              'deit': 'DeiT-format backbone', 'backbone': 'bare backbone'}
NBT = keymap.NBT
_BUFFER_SUFFIXES = ('.running_mean', '.running_var', NBT)


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


def build_classes(kind, arch, num_classes):
    """num_classes of the model to build for a file of ``kind``: a linear file's own head; otherwise none
    (ViTs: 0; ResNet-50 is built with torchvision's 1000-way fc, replaced by Identity afterwards)."""
    return num_classes if kind == 'linear' else (0 if arch != 'resnet50' else 1000)
