"""Thin command-line wrappers over library functions (one module per command)."""
