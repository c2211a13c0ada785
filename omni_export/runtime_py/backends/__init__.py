"""Backend sessions (eager, ExecuTorch, ONNX Runtime, TensorRT, Core ML) behind one interface."""
