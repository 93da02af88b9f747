"""The one logging setup: `mdland` loggers print `time level name: message` to stderr."""

import logging
import sys


def setup_logging(level: int | str = logging.INFO) -> None:
    root = logging.getLogger("mdland")
    if not root.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
        root.addHandler(handler)
    root.setLevel(level)
    root.propagate = False  # Ray workers add their own root handler; print each line once


def get_logger(name: str) -> logging.Logger:
    return logging.getLogger(name if name.startswith("mdland") else f"mdland.{name}")
