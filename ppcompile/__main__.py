"""`python -m ppcompile ...`: the same as the `ppcompile` command."""
import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
