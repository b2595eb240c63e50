"""``python -m peft_lyco``: the ``peft-lyco`` command line (inspect, convert, merge, extract, resize)."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
