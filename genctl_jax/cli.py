"""What every command-line entry point shares: quiet library logs, clean user errors."""

from __future__ import annotations

import logging as std_logging
import sys
from collections.abc import Callable

from absl import logging

from genctl_jax.errors import GenctlError


class _OwnInfoOnly(std_logging.Filter):
    """INFO lines from genctl_jax only; warnings and errors from everyone."""

    def filter(self, record: std_logging.LogRecord) -> bool:
        return record.levelno >= std_logging.WARNING or "genctl_jax" in record.pathname


def run(fn: Callable[[], object]) -> None:
    """Runs `fn` with quiet library logs; a user error ends the process with one line."""
    logging.get_absl_handler().addFilter(_OwnInfoOnly())
    try:
        fn()
    except GenctlError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(1)
