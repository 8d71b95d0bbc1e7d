"""Triton kernels for the GHN's message passing and parameter decoding (see README.md)."""
