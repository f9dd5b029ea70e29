"""Parity harness: torch_ref and paddle_impl on identical weights and inputs, compared tensor by tensor."""
