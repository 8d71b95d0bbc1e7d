"""Trained GHN checkpoints shipped with the package (safetensors with the config in the header)."""
