"""What the commands share: the parser classes, option types and checks, printing."""

from __future__ import annotations

import argparse
import textwrap

import torch

from ..errors import BMRSError
from ..pruning.criteria import CRITERIA

class Formatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the descriptions' line breaks and shows the defaults that are values."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "%(default)" not in text and action.default not in (None, False, argparse.SUPPRESS) and action.option_strings:
            text += " (default: %(default)s)"
        return text


class Parser(argparse.ArgumentParser):
    """An argument parser whose errors become :class:`~bmrs.BMRSError` (one line, exit 2)."""

    def error(self, message):
        raise BMRSError(f"{self.prog}: {message} (see '{self.prog} --help')")


def say(*parts) -> None:
    print(*parts, flush=True)


def set_threads(args) -> None:
    threads = getattr(args, "threads", None)
    if threads is not None:
        if threads < 1:
            raise BMRSError(f"--threads must be >= 1, got {threads}")
        torch.set_num_threads(threads)


def positive(name: str, value, minimum=1) -> None:
    if value is not None and value < minimum:
        raise BMRSError(f"{name} must be >= {minimum}, got {value}")


def dataset_name(text: str) -> str:
    return text.lower().replace("_", "-")


def float_list(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.replace(" ", ",").split(",") if v]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None
    if not values:
        raise argparse.ArgumentTypeError("expected at least one number")
    return values


def out_path(text: str) -> str:
    if not text.strip():
        raise argparse.ArgumentTypeError("expected a path, got an empty string")
    return text


def percent(x: float) -> str:
    return f"{100 * x:.2f} %"


def criteria_with(need: str) -> str:
    """The criteria that take ``need`` from a run, e.g. ``bmrs-u`` for ``bits``."""
    return ", ".join(name for name, c in CRITERIA.items() if need in c.needs)


def wrap(text: str, width: int, indent: int) -> str:
    """``text`` broken at spaces into lines of at most ``width``, continued at ``indent``."""
    return ("\n" + " " * indent).join(textwrap.wrap(text, width))
