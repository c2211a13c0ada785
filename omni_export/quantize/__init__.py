"""Quantization: backend-agnostic recipes (which tensors, how many bits) and, later, the
algorithms that compute one QuantResult every target encodes."""
