"""One place that names every architecture and builds its encoder / MoCo model (torch side)."""
from functools import partial

import torchvision.models as torchvision_models

from . import builder, vits

VIT_ARCHS = list(vits.ARCH_CONFIGS)
RESNET_ARCHS = ['resnet50']
ARCHS = VIT_ARCHS + RESNET_ARCHS


def check_arch(arch):
    if arch not in ARCHS:
        raise ValueError(f"unknown arch '{arch}'; known: {', '.join(ARCHS)}")


def encoder_factory(arch, img_size=224, stop_grad_conv1=False, **vit_kwargs):
    """A callable ``f(num_classes=...)`` as the official main_moco passes to the builder."""
    check_arch(arch)
    if arch in VIT_ARCHS:
        return partial(getattr(vits, arch), img_size=img_size, stop_grad_conv1=stop_grad_conv1, **vit_kwargs)
    if img_size % 32 != 0:
        raise ValueError(f'{arch}: img_size {img_size} must be a multiple of 32')
    return partial(torchvision_models.__dict__[arch], zero_init_residual=True)


def build_moco(arch, dim=256, mlp_dim=4096, T=1.0, img_size=224, stop_grad_conv1=False, **vit_kwargs):
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
