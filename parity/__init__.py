"""Parity harness: torch_ref and paddle_impl on identical weights and inputs, compared tensor by tensor.

``parity.trace(torch_module, paddle_layer, inputs, key_map=None, loss_fn=None)`` traces any model pair
module by module and names the first divergent module (parity/tracing.py, docs/trace.md).
"""


def trace(torch_module, paddle_layer, inputs, key_map=None, loss_fn=None, **kwargs):
    """See parity.tracing.trace (imported here on first use: torch and paddle load only when needed)."""
    from parity.tracing import trace as _trace
    return _trace(torch_module, paddle_layer, inputs, key_map=key_map, loss_fn=loss_fn, **kwargs)
