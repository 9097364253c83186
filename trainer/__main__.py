"""``python -m trainer`` is ``sam-train``."""

import sys

from trainer.cli import main

sys.exit(main())
