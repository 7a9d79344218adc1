"""The package version, in a module of its own so low layers (``io``) can read it without importing
``mergelab/__init__`` and, with it, the merge registry."""

__version__ = "0.1.0"
