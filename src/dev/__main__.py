"""``python -m src.dev``: see ``src.dev.launcher``."""

import sys

from src.dev.launcher import main

sys.exit(main())
