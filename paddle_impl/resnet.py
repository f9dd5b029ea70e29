"""ResNet-50 as torchvision's ``resnet50(zero_init_residual=True)``, built on paddle.vision.models.

paddle.vision's ResNet has torchvision's layout and key names; what differs is put right here:
BatchNorm gets torch's unbiased running variance (layers.BatchNorm2D), and the init follows torchvision
(conv kaiming_normal fan_out/relu, BN 1/0, the last BN of each block 0, fc as torch's nn.Linear).
"""
import math

import paddle
import paddle.nn as nn
from paddle.vision.models import resnet as _pv_resnet

from .layers import Linear, relu_, replace_batchnorm2d, use_fast_conv


def _kaiming_normal_fan_out_(conv):
    out_ch, _, kh, kw = conv.weight.shape
    std = math.sqrt(2.0 / (out_ch * kh * kw))
    conv.weight.set_value(paddle.normal(0., std, conv.weight.shape).astype(conv.weight.dtype))


class ReLU(nn.ReLU):
    """ReLU in place, as torchvision's ``ReLU(inplace=True)``. On CPU Paddle's out-of-place relu costs
    ~10x the in-place one (the fresh output's first touch): [8, 256, 56, 56] forward + backward, 2 threads:
    17 ms vs 4 ms. The backward is layers.relu_'s (multi-threaded on CPU)."""

    def forward(self, x):
        return relu_(x)


def resnet50(num_classes=1000, zero_init_residual=False):
    model = _pv_resnet.ResNet(_pv_resnet.BottleneckBlock, 50, num_classes=num_classes)
    replace_batchnorm2d(model)
    model.relu = ReLU()
    for m in model.sublayers():
        if isinstance(m, _pv_resnet.BottleneckBlock):
            m.relu = ReLU()
    for m in model.sublayers():
        if isinstance(m, nn.Conv2D):
            _kaiming_normal_fan_out_(m)
        elif isinstance(m, nn.BatchNorm2D):
            m.weight.set_value(paddle.ones_like(m.weight))
            m.bias.set_value(paddle.zeros_like(m.bias))
    if zero_init_residual:
        for m in model.sublayers():
            if isinstance(m, _pv_resnet.BottleneckBlock):
                m.bn3.weight.set_value(paddle.zeros_like(m.bn3.weight))
    model.fc = Linear(2048, num_classes)
    return use_fast_conv(model)
