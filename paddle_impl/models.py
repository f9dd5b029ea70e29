"""One place that names every architecture and builds its encoder / MoCo model (Paddle side)."""
from functools import partial

from . import builder, resnet, vits

VIT_ARCHS = list(vits.ARCH_CONFIGS)
RESNET_ARCHS = ['resnet50']
ARCHS = VIT_ARCHS + RESNET_ARCHS

# The arch names of the seed's Paddle MoCo v3 (PASSL / PLSC task/ssl/mocov3, `-a moco_vit_small` ...) and
# the names they mean here. Note: PLSC's own moco_vit_conv_* models build a plain 16x16 patch embedding
# (no conv stem); the names here mean the paper's conv-stem ViTs, as in the official code.
ARCH_ALIASES = {
    'moco_vit_small': 'vit_small',
    'moco_vit_base': 'vit_base',
    'moco_vit_conv_small': 'vit_conv_small',
    'moco_vit_conv_base': 'vit_conv_base',
}


def canonical_arch(name):
    """Our arch name for ``name``: a seed (PASSL/PLSC) alias becomes the arch it stands for; any other value
    is returned unchanged (so an unknown name still fails where it is checked, with its own message)."""
    return ARCH_ALIASES.get(name, name) if isinstance(name, str) else name


def check_arch(arch):
    arch = canonical_arch(arch)
    if arch not in ARCHS:
        raise ValueError(f"unknown arch '{arch}'; known: {', '.join(ARCHS)}")


def encoder_factory(arch, img_size=224, stop_grad_conv1=False, **vit_kwargs):
    """A callable ``f(num_classes=...)`` as the official main_moco passes to the builder."""
    arch = canonical_arch(arch)
    check_arch(arch)
    if arch in VIT_ARCHS:
        return partial(getattr(vits, arch), img_size=img_size, stop_grad_conv1=stop_grad_conv1, **vit_kwargs)
    if img_size % 32 != 0:
        raise ValueError(f'{arch}: img_size {img_size} must be a multiple of 32')
    return partial(getattr(resnet, arch), zero_init_residual=True)


def build_moco(arch, dim=256, mlp_dim=4096, T=1.0, img_size=224, stop_grad_conv1=False, **vit_kwargs):
    arch = canonical_arch(arch)
    enc = encoder_factory(arch, img_size=img_size, stop_grad_conv1=stop_grad_conv1, **vit_kwargs)
    cls = builder.MoCo_ViT if arch in VIT_ARCHS else builder.MoCo_ResNet
    return cls(enc, dim, mlp_dim, T)


def backbone_features(encoder, x):
    """The representation before the head/fc: ViT class token after the final norm; ResNet pooled."""
    if hasattr(encoder, 'forward_features'):
        return encoder.forward_features(x)[:, 0]
    e = encoder
    x = e.maxpool(e.relu(e.bn1(e.conv1(x))))
    x = e.layer4(e.layer3(e.layer2(e.layer1(x))))
    return e.avgpool(x).flatten(1)
