"""The gates: parity against the PyTorch reference (verify), the same gates on a device without torch (verify_device),
and the report shapes both write."""
