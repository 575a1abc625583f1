"""File formats: GGUF and ONNX read, write, validate and describe (used by export, backends, inspect and bench),
and the one table of quantizations (`quants`). Nothing here converts a checkpoint or runs a model."""
