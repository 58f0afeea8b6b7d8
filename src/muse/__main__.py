"""`python -m muse ...` (what torchrun launches) is the same as the `muse` command."""

import sys

from muse.cli.main import main

if __name__ == "__main__":
    sys.exit(main())
