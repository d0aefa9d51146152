"""``python -m factedit``: the command line (also what ``torchrun ... -m factedit`` runs)."""

import sys

from .cli import main

sys.exit(main())
