"""``python -m flatkern ...`` (also what ``torchrun -m flatkern reproduce`` runs)."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
