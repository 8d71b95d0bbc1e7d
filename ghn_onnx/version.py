"""The package version, in a module of its own: what writes it into outputs (``writeback``, the
CLI's ``--version``) imports it without importing the package root and its lazy API."""

__version__ = "0.1.0"
