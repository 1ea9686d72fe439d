"""The vision zoo tier: the results table, printed at the end of the run and written to a file."""

import os
from pathlib import Path

import pytest

ROWS: list[dict] = []
TABLE = Path(os.environ.get("BMRS_ZOO_TABLE", "zoo-results.md"))
_HEADER = (
    "| model | input | gates | gated structures | not gated (why) | parameters before → after | "
    "FLOPs before → after | max output difference (relative) |"
)


@pytest.fixture(scope="session")
def zoo_rows() -> list[dict]:
    """The table's rows; each test adds its model's."""
    return ROWS


def table() -> str:
    lines = [_HEADER, "|---|---|---|---|---|---|---|---|"]
    for r in sorted(ROWS, key=lambda r: r["order"]):
        lines.append(
            f"| {r['model']} | {r['input']} | {r['gates']} | {r['structures']} | {r['skipped']} | "
            f"{r['params'][0]:,} → {r['params'][1]:,} ({r['params'][1] / r['params'][0]:.0%}) | "
            f"{r['flops'][0]:,} → {r['flops'][1]:,} ({r['flops'][1] / r['flops'][0]:.0%}) | {r['diff']:.1e} |"
        )
    return "\n".join(lines)


def pytest_terminal_summary(terminalreporter):
    if not ROWS:
        return
    text = table()
    TABLE.write_text(text + "\n")
    terminalreporter.write_sep("=", f"vision zoo (also in {TABLE})")
    terminalreporter.write_line(text)
