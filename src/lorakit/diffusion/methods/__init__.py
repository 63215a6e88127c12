"""Built-in composition methods, one per file; importing this package registers them."""

from . import cmlora, composer, composite, merge, switch  # noqa: F401

__all__ = ["cmlora", "composer", "composite", "merge", "switch"]
