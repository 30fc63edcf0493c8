"""``python -m a2mim ...``: the same command line as the ``a2mim`` script."""

import sys

from a2mim.cli import main

if __name__ == "__main__":
    sys.exit(main())
