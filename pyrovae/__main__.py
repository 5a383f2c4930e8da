"""``python -m pyrovae`` runs the command-line interface."""

import sys

from pyrovae.cli import main

sys.exit(main())
