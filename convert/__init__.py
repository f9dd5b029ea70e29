"""The ONE place that knows how a torch MoCo v3 state dict maps to a Paddle one, and back.

keymap: names, Linear transposes, BN buffers, num_batches_tracked, prefixes (framework-free, numpy).
"""
from .keymap import KeyMapError, torch_to_paddle, paddle_to_torch, check_state_dict  # noqa: F401
