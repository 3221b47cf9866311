"""Scenario 3: a LLaMA-class decoder on a board with an INT8-matmul NPU and an FP16 CPU.

Sub-modules: ``assets`` (model and text paths), ``perplexity`` (the one fixed protocol),
``export`` (safetensors -> ONNX with KV cache via onnxruntime-genai's builder, verified against
PyTorch), ``weightonly`` (MatMulNBits INT8/INT4), ``w8a8`` (fake-quantized W8A8 with static
per-tensor activation scales, SmoothQuant, the down_proj rotation and 16-bit activation promotion), ``qdq`` (that
arithmetic written into the ONNX decoder), ``placement`` (the
NPU/CPU planner for ``hybrid-npu-int8-cpu-fp16``), ``memory`` (weights + KV cache + activations).
"""
