"""The README's Python examples run as written."""

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


@pytest.mark.parametrize("index", range(len(re.findall(r"```python\n", README.read_text()))))
def test_readme_python_block_runs(index, tmp_path, monkeypatch):
    block = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)[index]
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(block, f"README.md block {index}", "exec"), namespace)
    if "small" in namespace:  # the quick start ends with a compacted network that prunes something
        import bmrs

        assert bmrs.parameter_compression(namespace["model"]) > 0.1
        assert not bmrs.gates(namespace["small"])
