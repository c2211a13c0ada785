"""Lowering targets (ExecuTorch, TensorRT, Core ML, ONNX Runtime): arrives with the tracing work."""
