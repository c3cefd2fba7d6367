"""Entry point for `accelerate launch train_memmit.py --config configs/<recipe>.yaml [--flag value ...]`."""

import sys

from memmit.cli import train_main

if __name__ == "__main__":
    sys.exit(train_main())
