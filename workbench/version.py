"""The workbench's version (its own module: the checkpoint writer records it without importing the package)."""
__version__ = "0.1.0"
