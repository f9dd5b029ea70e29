"""The official MoCo v3 semantics (facebookresearch/moco-v3) on torch + timm 1.0 + torchvision.

This package is the reference that paddle_impl is proven against. It never imports paddle.
"""
