"""``python -m src``: see ``src.cli``."""

import sys

from src.cli import main

sys.exit(main())
