"""MoCo v3 Vision Transformers in Paddle: the twin of torch_ref/vits.py (official moco-v3/vits.py).

Pre-norm blocks, qkv bias, LayerNorm eps 1e-6, exact GELU, class token, final norm, head on the class
token, fixed 2-D sin-cos position embedding, the MoCo v3 init, the conv stem, stop-grad-conv1.
Parameter names equal timm's so one key map serves both.
"""
import math
from functools import reduce
from operator import mul

import paddle
import paddle.nn as nn
import paddle.nn.functional as F

from . import cpu_kernels
from .layers import (GELU, BatchNorm2D, FastLinear, LayerNorm, attention_k, fused_attention,
                     patch_conv_applies, patch_embed_k, torch_default_init_, transpose, use_fast_conv)

__all__ = ['vit_small', 'vit_base', 'vit_conv_small', 'vit_conv_base', 'vit_large', 'vit_huge',
           'VisionTransformerMoCo', 'ConvStem', 'PatchEmbed', 'build_2d_sincos_position_embedding',
           'ARCH_CONFIGS']

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
    gw = paddle.arange(grid_w, dtype='float32')
    gh = paddle.arange(grid_h, dtype='float32')
    gw, gh = paddle.meshgrid(gw, gh)  # 'ij' indexing
    pos_dim = embed_dim // 4
    omega = paddle.arange(pos_dim, dtype='float32') / pos_dim
    omega = 1. / (temperature ** omega)
    out_w = paddle.einsum('m,d->md', gw.flatten(), omega)
    out_h = paddle.einsum('m,d->md', gh.flatten(), omega)
    pos_emb = paddle.concat([paddle.sin(out_w), paddle.cos(out_w), paddle.sin(out_h), paddle.cos(out_h)],
                            axis=1)[None]
    pe_token = paddle.zeros([1, 1, embed_dim], dtype='float32')
    return paddle.concat([pe_token, pos_emb], axis=1)


def _uniform_(param, bound):
    param.set_value(paddle.uniform(param.shape, dtype=param.dtype, min=-bound, max=bound))


def _zeros_(param):
    param.set_value(paddle.zeros(param.shape, dtype=param.dtype))


def _xavier_uniform_linear_(weight):
    fan_in, fan_out = weight.shape  # Paddle Linear weight is [in, out]
    _uniform_(weight, math.sqrt(6. / float(fan_in + fan_out)))


class PatchEmbed(nn.Layer):
    def __init__(self, img_size=224, patch_size=16, in_chans=3, embed_dim=768):
        super().__init__()
        self.img_size = (img_size, img_size)
        self.patch_size = (patch_size, patch_size)
        self.grid_size = (img_size // patch_size, img_size // patch_size)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.proj = nn.Conv2D(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x):
        _check_input(x, self.img_size)
        if patch_conv_applies(self.proj, x):  # CPU: one GEMM over the patches, output already BNC
            return patch_embed_k(x, self.proj.weight, self.proj.bias)
        return transpose(self.proj(x).flatten(2), [0, 2, 1])  # BCHW -> BNC


class ConvStem(nn.Layer):
    """4 x (3x3 stride-2 conv, BN, ReLU) then a 1x1 conv: the ViT-C stem (arXiv 2106.14881)."""

    def __init__(self, img_size=224, patch_size=16, in_chans=3, embed_dim=768):
        super().__init__()
        if patch_size != 16:
            raise ValueError('ConvStem only supports patch size 16')
        if embed_dim % 8 != 0:
            raise ValueError('Embed dimension must be divisible by 8 for ConvStem')
        self.img_size = (img_size, img_size)
        self.patch_size = (patch_size, patch_size)
        self.grid_size = (img_size // patch_size, img_size // patch_size)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        stem = []
        input_dim, output_dim = in_chans, embed_dim // 8
        for _ in range(4):
            stem.append(torch_default_init_(
                nn.Conv2D(input_dim, output_dim, kernel_size=3, stride=2, padding=1, bias_attr=False)))
            stem.append(BatchNorm2D(output_dim))
            stem.append(nn.ReLU())
            input_dim = output_dim
            output_dim *= 2
        stem.append(torch_default_init_(nn.Conv2D(input_dim, embed_dim, kernel_size=1)))
        self.proj = use_fast_conv(nn.Sequential(*stem))

    def forward(self, x):
        _check_input(x, self.img_size)
        return transpose(self.proj(x).flatten(2), [0, 2, 1])


def _check_input(x, img_size):
    if tuple(x.shape[2:]) != img_size:
        raise ValueError(f"Input image size ({x.shape[2]}*{x.shape[3]}) doesn't match model "
                         f"({img_size[0]}*{img_size[1]}).")


class Attention(nn.Layer):
    def __init__(self, dim, num_heads=8, qkv_bias=True):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.qkv = FastLinear(dim, dim * 3, bias_attr=None if qkv_bias else False)
        self.proj = FastLinear(dim, dim)

    def forward(self, x):
        B, N, C = x.shape
        y = self.qkv(x)
        if cpu_kernels.attention(y):  # our fused kernel: no transposes, no attention matrix kept
            return self.proj(fused_attention(y, self.num_heads, self.scale))
        # layers.transpose: contiguous on CPU; unbind (not indexing) so the backward is one concat
        qkv = transpose(y.reshape([B, N, 3, self.num_heads, self.head_dim]), [2, 0, 3, 1, 4])
        q, k, v = paddle.unbind(qkv, axis=0)
        if cpu_kernels.usable(q):  # our softmax kernel; the attention matrix is not kept for the backward
            x = attention_k(q, k, v, self.scale)
        else:
            x = paddle.matmul(F.softmax(paddle.matmul(q * self.scale, k, transpose_y=True), axis=-1), v)
        x = transpose(x, [0, 2, 1, 3]).reshape([B, N, C])
        return self.proj(x)


class Mlp(nn.Layer):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1 = FastLinear(dim, hidden)
        self.act = GELU()
        self.fc2 = FastLinear(hidden, dim)

    def forward(self, x):
        # on CPU GELU keeps its slope and fc2 its input, GELU's output (layers._GeluK, layers.linear)
        return self.fc2(self.act(self.fc1(x)))


class DropPath(nn.Layer):
    """Stochastic depth per sample (used by fine-tuning; identity when p == 0 or in eval)."""

    def __init__(self, p=0.):
        super().__init__()
        self.p = p

    def forward(self, x):
        if self.p == 0. or not self.training:
            return x
        keep = 1. - self.p
        mask = paddle.bernoulli(paddle.full([x.shape[0]] + [1] * (x.ndim - 1), keep, dtype=x.dtype))
        return x * mask / keep


class Block(nn.Layer):
    def __init__(self, dim, num_heads, mlp_ratio=4., qkv_bias=True, drop_path=0.):
        super().__init__()
        self.norm1 = LayerNorm(dim, epsilon=1e-6)
        self.attn = Attention(dim, num_heads, qkv_bias)
        self.norm2 = LayerNorm(dim, epsilon=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x):
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class VisionTransformerMoCo(nn.Layer):
    def __init__(self, img_size=224, patch_size=16, in_chans=3, num_classes=1000, embed_dim=768, depth=12,
                 num_heads=12, mlp_ratio=4., qkv_bias=True, drop_path_rate=0., embed_layer=PatchEmbed,
                 stop_grad_conv1=False, pos_embed_dtype='float32'):
        super().__init__()
        self.num_classes = num_classes
        self.embed_dim = self.num_features = embed_dim
        self.num_prefix_tokens = 1
        self.patch_embed = embed_layer(img_size=img_size, patch_size=patch_size, in_chans=in_chans,
                                       embed_dim=embed_dim)
        self.cls_token = self.create_parameter([1, 1, embed_dim], default_initializer=nn.initializer.Constant(0.))
        h, w = self.patch_embed.grid_size
        pe = build_2d_sincos_position_embedding(h, w, embed_dim)
        # float32 in every dtype mode, as the official vits.py builds it (explicit float32 even under a float64
        # default dtype; its momentum update then rounds this tensor in float32): dtype fidelity to the original.
        # pos_embed_dtype=None: the default dtype, as in fine-tuning's reference (DeiT's timm ViT, whose
        # pos_embed is a learned parameter created in the default dtype)
        self.pos_embed = self.create_parameter(pe.shape, dtype=pos_embed_dtype or paddle.get_default_dtype(),
                                               default_initializer=nn.initializer.Assign(pe.numpy()))
        self.pos_embed.stop_gradient = True  # fixed, not trained
        dpr = [float(x) for x in paddle.linspace(0, drop_path_rate, depth).numpy()] if depth > 1 else [drop_path_rate]
        self.blocks = nn.LayerList([Block(embed_dim, num_heads, mlp_ratio, qkv_bias, dpr[i]) for i in range(depth)])
        self.norm = LayerNorm(embed_dim, epsilon=1e-6)
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()

        # MoCo v3 weight init
        for name, m in self.named_sublayers():
            if isinstance(m, nn.Linear):
                if 'qkv' in name:
                    # treat the weights of Q, K, V separately; Paddle weight is [in, out]
                    val = math.sqrt(6. / float(m.weight.shape[1] // 3 + m.weight.shape[0]))
                    _uniform_(m.weight, val)
                else:
                    _xavier_uniform_linear_(m.weight)
                _zeros_(m.bias)
        self.cls_token.set_value(paddle.normal(std=1e-6, shape=self.cls_token.shape).astype(self.cls_token.dtype))

        if isinstance(self.patch_embed, PatchEmbed):
            val = math.sqrt(6. / float(3 * reduce(mul, self.patch_embed.patch_size, 1) + self.embed_dim))
            _uniform_(self.patch_embed.proj.weight, val)
            _zeros_(self.patch_embed.proj.bias)
            if stop_grad_conv1:
                self.patch_embed.proj.weight.stop_gradient = True
                self.patch_embed.proj.bias.stop_gradient = True

    def forward_features(self, x):
        x = self.patch_embed(x)
        cls = self.cls_token.expand([x.shape[0], -1, -1])
        pe = self.pos_embed if self.pos_embed.dtype == x.dtype else self.pos_embed.astype(x.dtype)  # torch promotes
        x = paddle.concat([cls, x], axis=1) + pe
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x)

    def forward(self, x):
        return self.head(self.forward_features(x)[:, 0])


def _check_img_size(name, img_size, patch):
    if not isinstance(img_size, int) or img_size <= 0 or img_size % patch != 0:
        raise ValueError(f'{name}: img_size {img_size} is not a positive multiple of the patch size {patch}; '
                         f'pass an --img-size divisible by {patch} (e.g. {patch * 14})')


def _vit(name, img_size=224, **kwargs):
    patch, dim, depth, heads, conv = ARCH_CONFIGS[name]
    _check_img_size(name, img_size, kwargs.get('patch_size', patch))
    cfg = dict(img_size=img_size, patch_size=patch, embed_dim=dim, depth=depth, num_heads=heads, mlp_ratio=4,
               qkv_bias=True)
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
