"""`python -m bilevel ...`: the same command line as the `bilevel` script."""

import os
import sys

from bilevel.cli import main

if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
