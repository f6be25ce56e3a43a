"""
What the harness tells the person running it: progress on stderr (stdout carries
only the report), and BenchError, a setup step that failed.
"""

from __future__ import annotations

import sys


def say(message: str) -> None:
    """Progress goes to stderr; stdout carries only the report."""
    print(message, file=sys.stderr, flush=True)


class BenchError(Exception):
    """A setup step failed; the message says what to do."""
