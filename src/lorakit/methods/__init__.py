"""Built-in methods. Importing this package registers them; each file is one method family."""

from . import lora  # noqa: F401
