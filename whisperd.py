#!/usr/bin/env python3
"""whisperd: `python whisperd.py` serves; `python whisperd.py --help` lists the admin commands."""

import sys

from whisperd.cli import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
