"""MoCo v3 Vision Transformers on timm 1.0, with the behaviour of the official code (timm 0.4.9).

Official: moco-v3/vits.py. Kept: pre-norm blocks, qkv bias, LayerNorm eps 1e-6, exact GELU, class token,
final norm, head on the class token, fixed 2-D sin-cos position embedding, the MoCo v3 init, the conv
stem and stop-grad-conv1. Added: every factory takes ``img_size``; the paper's ViT-L/16 and ViT-H/14.
"""
import math
from functools import partial, reduce
from operator import mul

import torch
import torch.nn as nn
from timm.models.vision_transformer import VisionTransformer
from timm.layers import PatchEmbed

__all__ = ['vit_small', 'vit_base', 'vit_conv_small', 'vit_conv_base', 'vit_large', 'vit_huge',
           'VisionTransformerMoCo', 'ConvStem', 'build_2d_sincos_position_embedding', 'ARCH_CONFIGS']

# name: (patch, embed_dim, depth, num_heads, conv_stem)
ARCH_CONFIGS = {
    'vit_small': (16, 384, 12, 12, False),
    'vit_base': (16, 768, 12, 12, False),
    'vit_conv_small': (16, 384, 11, 12, True),
    'vit_conv_base': (16, 768, 11, 12, True),
    'vit_large': (16, 1024, 24, 16, False),
    'vit_huge': (14, 1280, 32, 16, False),
}


def build_2d_sincos_position_embedding(grid_h, grid_w, embed_dim, temperature=10000.):
    """[1, 1 + h*w, dim] float32: a zero class-token slot, then sin/cos of the (w, h) grid."""
    if embed_dim % 4 != 0:
        raise ValueError(f'embed_dim {embed_dim} must be divisible by 4 for the 2-D sin-cos position embedding')
    gw = torch.arange(grid_w, dtype=torch.float32)
    gh = torch.arange(grid_h, dtype=torch.float32)
    gw, gh = torch.meshgrid(gw, gh, indexing='ij')
    pos_dim = embed_dim // 4
    omega = torch.arange(pos_dim, dtype=torch.float32) / pos_dim
    omega = 1. / (temperature ** omega)
    out_w = torch.einsum('m,d->md', gw.flatten(), omega)
    out_h = torch.einsum('m,d->md', gh.flatten(), omega)
    pos_emb = torch.cat([torch.sin(out_w), torch.cos(out_w), torch.sin(out_h), torch.cos(out_h)], dim=1)[None]
    pe_token = torch.zeros([1, 1, embed_dim], dtype=torch.float32)
    return torch.cat([pe_token, pos_emb], dim=1)


class VisionTransformerMoCo(VisionTransformer):
    def __init__(self, stop_grad_conv1=False, **kwargs):
        super().__init__(**kwargs)
        # fixed sin-cos embedding, not trained
        h, w = self.patch_embed.grid_size
        self.pos_embed = nn.Parameter(build_2d_sincos_position_embedding(h, w, self.embed_dim), requires_grad=False)

        # MoCo v3 weight init
        for name, m in self.named_modules():
            if isinstance(m, nn.Linear):
                if 'qkv' in name:
                    # treat the weights of Q, K, V separately
                    val = math.sqrt(6. / float(m.weight.shape[0] // 3 + m.weight.shape[1]))
                    nn.init.uniform_(m.weight, -val, val)
                else:
                    nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.normal_(self.cls_token, std=1e-6)

        if isinstance(self.patch_embed, PatchEmbed):
            # xavier_uniform initialization
            val = math.sqrt(6. / float(3 * reduce(mul, self.patch_embed.patch_size, 1) + self.embed_dim))
            nn.init.uniform_(self.patch_embed.proj.weight, -val, val)
            nn.init.zeros_(self.patch_embed.proj.bias)

            if stop_grad_conv1:
                self.patch_embed.proj.weight.requires_grad = False
                self.patch_embed.proj.bias.requires_grad = False


class ConvStem(nn.Module):
    """4 x (3x3 stride-2 conv, BN, ReLU) then a 1x1 conv: the ViT-C stem (arXiv 2106.14881)."""

    def __init__(self, img_size=224, patch_size=16, in_chans=3, embed_dim=768, norm_layer=None, flatten=True,
                 **kwargs):
        super().__init__()
        if patch_size != 16:
            raise ValueError('ConvStem only supports patch size 16')
        if embed_dim % 8 != 0:
            raise ValueError('Embed dimension must be divisible by 8 for ConvStem')
        img_size = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
        self.img_size = img_size
        self.patch_size = (patch_size, patch_size)
        self.grid_size = (img_size[0] // patch_size, img_size[1] // patch_size)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.flatten = flatten
        self.dynamic_img_pad = False

        stem = []
        input_dim, output_dim = in_chans, embed_dim // 8
        for _ in range(4):
            stem.append(nn.Conv2d(input_dim, output_dim, kernel_size=3, stride=2, padding=1, bias=False))
            stem.append(nn.BatchNorm2d(output_dim))
            stem.append(nn.ReLU(inplace=True))
            input_dim = output_dim
            output_dim *= 2
        stem.append(nn.Conv2d(input_dim, embed_dim, kernel_size=1))
        self.proj = nn.Sequential(*stem)
        self.norm = norm_layer(embed_dim) if norm_layer else nn.Identity()

    def feat_ratio(self, as_scalar=True):
        return self.patch_size[0] if as_scalar else self.patch_size

    def forward(self, x):
        B, C, H, W = x.shape
        if (H, W) != self.img_size:
            raise ValueError(f"Input image size ({H}*{W}) doesn't match model ({self.img_size[0]}*{self.img_size[1]}).")
        x = self.proj(x)
        if self.flatten:
            x = x.flatten(2).transpose(1, 2)  # BCHW -> BNC
        return self.norm(x)


def _check_img_size(name, img_size, patch):
    if not isinstance(img_size, int) or img_size <= 0 or img_size % patch != 0:
        raise ValueError(f'{name}: img_size {img_size} is not a positive multiple of the patch size {patch}; '
                         f'pass an --img-size divisible by {patch} (e.g. {patch * 14})')


def _vit(name, img_size=224, **kwargs):
    patch, dim, depth, heads, conv = ARCH_CONFIGS[name]
    _check_img_size(name, img_size, kwargs.get('patch_size', patch))
    cfg = dict(img_size=img_size, patch_size=patch, embed_dim=dim, depth=depth, num_heads=heads, mlp_ratio=4,
               qkv_bias=True, norm_layer=partial(nn.LayerNorm, eps=1e-6), act_layer=nn.GELU)
    if conv:
        cfg['embed_layer'] = ConvStem
    cfg.update(kwargs)
    return VisionTransformerMoCo(**cfg)


def vit_small(**kwargs):
    return _vit('vit_small', **kwargs)


def vit_base(**kwargs):
    return _vit('vit_base', **kwargs)


def vit_conv_small(**kwargs):
    return _vit('vit_conv_small', **kwargs)


def vit_conv_base(**kwargs):
    return _vit('vit_conv_base', **kwargs)


def vit_large(**kwargs):
    return _vit('vit_large', **kwargs)


def vit_huge(**kwargs):
    return _vit('vit_huge', **kwargs)
