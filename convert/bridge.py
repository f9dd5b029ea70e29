"""Move weights between live torch and Paddle models through the key map (used by parity and --verify)."""
import numpy as np

from .keymap import check_state_dict, paddle_to_torch, torch_to_paddle


def torch_state_numpy(module):
    return {k: v.detach().cpu().numpy() for k, v in module.state_dict().items()}


def paddle_state_numpy(layer):
    return {k: np.asarray(v.numpy()) for k, v in layer.state_dict().items()}


def load_into_paddle(layer, np_sd, what='state dict'):
    """Load a Paddle-named numpy state dict into ``layer`` exactly (keys and shapes checked first),
    casting to each target tensor's dtype."""
    import paddle
    target = layer.state_dict()
    check_state_dict(np_sd, {k: v.shape for k, v in target.items()}, what)
    for k, t in target.items():
        t.set_value(paddle.to_tensor(np_sd[k]).astype(t.dtype))


def load_into_torch(module, np_sd, what='state dict'):
    import torch
    target = module.state_dict()
    check_state_dict(np_sd, {k: tuple(v.shape) for k, v in target.items()}, what)
    with torch.no_grad():
        for k, t in target.items():
            t.copy_(torch.from_numpy(np.asarray(np_sd[k])).to(t.dtype))


def torch_to_paddle_model(torch_module, paddle_layer):
    sd, _ = torch_to_paddle(torch_state_numpy(torch_module))
    load_into_paddle(paddle_layer, sd)


def paddle_to_torch_model(paddle_layer, torch_module, extras=None):
    load_into_torch(torch_module, paddle_to_torch(paddle_state_numpy(paddle_layer), extras))
