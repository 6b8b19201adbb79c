"""The engines a compressed model is built for: ONNX Runtime on CPUs (``ort``) and TensorRT (``tensorrt``)."""
