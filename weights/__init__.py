"""Trained AdderSR weights: ``NAME.safetensors`` with a ``NAME.json`` of metadata."""
