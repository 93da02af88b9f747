"""The one logging setup: `mdland` loggers print `time level name: message` to stderr."""

import logging
import sys


def _listed_fp32_modules(record: logging.LogRecord) -> bool:
    """Drops diffusers' warning at every dtype cast that "modules ... should be kept in float32: []" when it lists
    none (its check tests the list for None, not for being empty)."""
    return "should be kept in float32: []" not in record.getMessage()


def setup_logging(level: int | str = logging.INFO) -> None:
    root = logging.getLogger("mdland")
    if not root.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
        root.addHandler(handler)
    root.setLevel(level)
    root.propagate = False  # Ray workers add their own root handler; print each line once
    logging.getLogger("diffusers.models.modeling_utils").addFilter(_listed_fp32_modules)


def get_logger(name: str) -> logging.Logger:
    return logging.getLogger(name if name.startswith("mdland") else f"mdland.{name}")
