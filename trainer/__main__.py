"""``python -m trainer`` is ``sam-train``."""

from trainer.cli import main
from trainer.dist import run_main

run_main(main)
