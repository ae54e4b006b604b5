"""Inference backends (torch, ONNX Runtime) sharing one raw-output layout, and export."""
