"""`python -m diffkern`: the command line (diffkern.cli)."""
import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
