"""``python -m trainer`` is ``sam-train``."""

from trainer.cli import console_main

console_main()
