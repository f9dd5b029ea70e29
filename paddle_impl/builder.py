"""MoCo v3 builder in Paddle: the twin of torch_ref/builder.py (official moco-v3/moco/builder.py)."""
import paddle
import paddle.distributed as dist
import paddle.nn as nn
import paddle.nn.functional as F

from . import cpu_kernels
from .layers import BatchNorm1D, Linear, model_parameters


class MoCo(nn.Layer):
    """Build a MoCo model with a base encoder, a momentum encoder, and two MLPs.

    https://arxiv.org/abs/1911.05722
    """

    def __init__(self, base_encoder, dim=256, mlp_dim=4096, T=1.0):
        """
        dim: feature dimension (default: 256)
        mlp_dim: hidden dimension in MLPs (default: 4096)
        T: softmax temperature (default: 1.0)
        """
        super().__init__()
        self.T = T
        # build encoders
        self.base_encoder = base_encoder(num_classes=mlp_dim)
        self.momentum_encoder = base_encoder(num_classes=mlp_dim)
        self._build_projector_and_predictor_mlps(dim, mlp_dim)
        for param_b, param_m in zip(model_parameters(self.base_encoder), model_parameters(self.momentum_encoder)):
            param_m.set_value(param_b)  # initialize
            param_m.stop_gradient = True  # not update by gradient

    def _build_mlp(self, num_layers, input_dim, mlp_dim, output_dim, last_bn=True):
        mlp = []
        for l in range(num_layers):
            dim1 = input_dim if l == 0 else mlp_dim
            dim2 = output_dim if l == num_layers - 1 else mlp_dim
            mlp.append(Linear(dim1, dim2, bias=False))
            if l < num_layers - 1:
                mlp.append(BatchNorm1D(dim2))
                mlp.append(nn.ReLU())
            elif last_bn:
                # follow SimCLR's design
                mlp.append(BatchNorm1D(dim2, affine=False))
        return nn.Sequential(*mlp)

    def _build_projector_and_predictor_mlps(self, dim, mlp_dim):
        pass

    @paddle.no_grad()
    def _update_momentum_encoder(self, m):
        """Momentum update of the momentum encoder"""
        for param_b, param_m in zip(model_parameters(self.base_encoder), model_parameters(self.momentum_encoder)):
            if param_b.stop_gradient:  # frozen (pos_embed, float32 as in the original): the official op sequence
                param_m.set_value(param_m * m + param_b * (1. - m))  # bit-equal to torch's, in float32 too
            elif cpu_kernels.usable(param_m, param_b):  # param_m * m + param_b * (1 - m), in place
                cpu_kernels.run_inplace(cpu_kernels.get().moco_ema_, param_m, param_b, float(m))
            else:
                # the same as param_m + (1 - m) * (param_b - param_m), in place: 10x faster than building
                # the sum and set_value (measured); equal up to rounding
                param_m.lerp_(param_b, 1. - m)

    def contrastive_loss(self, q, k):
        # normalize
        q = F.normalize(q, axis=1)
        k = F.normalize(k, axis=1)
        # gather all targets
        k = concat_all_gather(k)
        logits = paddle.einsum('nc,mc->nm', q, k) / self.T
        N = logits.shape[0]  # batch size per process
        labels = paddle.arange(N, dtype='int64') + N * _rank()
        if logits.dtype in (paddle.float16, paddle.bfloat16):  # AMP: the softmax in float32 (fp16 overflows)
            logits = logits.astype('float32')
        return F.cross_entropy(logits, labels) * (2 * self.T)

    def forward(self, x1, x2, m):
        """
        Input:
            x1: first views of images
            x2: second views of images
            m: moco momentum
        Output:
            loss
        """
        if self._draws_random_numbers():  # the official order: the random numbers are drawn in its sequence
            q1, q2 = self._features(x1, x2)
            k1, k2 = self._targets(x1, x2, m)
        else:
            # The targets first: the same numbers, bit for bit (the momentum update reads parameters only, which
            # the forward leaves unchanged, and no random number is drawn), while the momentum encoder's working
            # memory no longer comes on top of both views' saved activations: the step's peak is that much
            # lower (ResNet-50, 8 images per view, CPU: 77 MiB of live tensors; docs/benchmarks.md).
            k1, k2 = self._targets(x1, x2, m)
            q1, q2 = self._features(x1, x2)
        return self.contrastive_loss(q1, k2) + self.contrastive_loss(q2, k1)

    def _features(self, x1, x2):
        # compute features
        q1 = self.predictor(self.base_encoder(x1))
        q2 = self.predictor(self.base_encoder(x2))
        return q1, q2

    @paddle.no_grad()  # no gradient
    def _targets(self, x1, x2, m):
        self._update_momentum_encoder(m)  # update the momentum encoder
        # compute momentum features as targets
        k1 = self.momentum_encoder(x1)
        k2 = self.momentum_encoder(x2)
        return k1, k2

    def _draws_random_numbers(self):
        """True where a layer of the encoders draws random numbers in training (stochastic depth, dropout)."""
        return self.training and any(
            layer.training and getattr(layer, 'p', 0) > 0 and type(layer).__name__.startswith(('DropPath', 'Dropout'))
            for enc in (self.base_encoder, self.momentum_encoder) for layer in enc.sublayers())


class MoCo_ResNet(MoCo):
    def _build_projector_and_predictor_mlps(self, dim, mlp_dim):
        hidden_dim = self.base_encoder.fc.weight.shape[0]  # Paddle Linear weight is [in, out]
        del self.base_encoder.fc, self.momentum_encoder.fc  # remove original fc layer

        # projectors
        self.base_encoder.fc = self._build_mlp(2, hidden_dim, mlp_dim, dim)
        self.momentum_encoder.fc = self._build_mlp(2, hidden_dim, mlp_dim, dim)

        # predictor
        self.predictor = self._build_mlp(2, dim, mlp_dim, dim, False)


class MoCo_ViT(MoCo):
    def _build_projector_and_predictor_mlps(self, dim, mlp_dim):
        hidden_dim = self.base_encoder.head.weight.shape[0]  # Paddle Linear weight is [in, out]
        del self.base_encoder.head, self.momentum_encoder.head  # remove original fc layer

        # projectors
        self.base_encoder.head = self._build_mlp(3, hidden_dim, mlp_dim, dim)
        self.momentum_encoder.head = self._build_mlp(3, hidden_dim, mlp_dim, dim)

        # predictor
        self.predictor = self._build_mlp(2, dim, mlp_dim, dim)


def _distributed():
    return dist.is_initialized() and dist.get_world_size() > 1


def _rank():
    return dist.get_rank() if _distributed() else 0


@paddle.no_grad()
def concat_all_gather(tensor):
    """all_gather of ``tensor`` from every rank; no gradient flows through it. Identity on one process."""
    if not _distributed():
        return tensor
    tensors_gather = []
    dist.all_gather(tensors_gather, tensor)
    return paddle.concat(tensors_gather, axis=0)
