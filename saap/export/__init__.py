"""Exporters of saap checkpoints to edge runtimes (GGUF for llama.cpp, ONNX for ONNX Runtime)."""
