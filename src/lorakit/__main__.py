"""``python -m lorakit ...`` (and ``torchrun ... -m lorakit train ...``): the same as the ``lorakit`` command."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
