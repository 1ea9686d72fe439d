"""The Python recipes of docs/distributed.md run as written: the plain loop in this process,
its DDP variant under torchrun with 2 processes, the Lightning script in a subprocess."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import bmrs

DOC = Path(__file__).resolve().parents[1] / "docs" / "distributed.md"
BLOCKS = re.findall(r"```python\n(.*?)```", DOC.read_text(), re.S)


def block(marker: str) -> str:
    """The one recipe that contains ``marker``."""
    found = [b for b in BLOCKS if marker in b]
    assert len(found) == 1, f"{len(found)} python blocks of {DOC.name} contain {marker!r}"
    return found[0]


def run(args, cwd):  # the timeout guards against hangs; it is no speed test
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, *map(str, args)], capture_output=True, text=True, timeout=900, env=env,
                          cwd=cwd)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def test_every_block_is_one_of_the_tested_recipes():
    assert len(BLOCKS) == 3
    assert {id(block("model_kl(model,")), id(block("DistributedDataParallel(model)")), id(block("BMRSPruning("))} == {
        id(b) for b in BLOCKS
    }


@pytest.mark.slow
def test_plain_loop_recipe(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(block("model_kl(model,"), "docs/distributed.md plain loop", "exec"), namespace)
    model, small, x = namespace["model"], namespace["small"], namespace["x"]
    assert bmrs.parameter_compression(model) > 0.1 and not bmrs.gates(small)
    model.eval()
    torch.testing.assert_close(small(x[:64]), model(x[:64]))


# run after the DDP recipe, on both ranks
DDP_CHECKS = """
rows = bmrs.distributed.gather_rows(torch.cat([t.flatten().double() for t in model.state_dict().values()]))
assert torch.equal(rows[0], rows[1]), "the ranks differ"
assert bmrs.parameter_compression(ddp) > 0.1 and not bmrs.gates(small)
model.eval()
torch.testing.assert_close(small(data.tensors[0][:64]), model(data.tensors[0][:64]))
torch.distributed.destroy_process_group()
print("checked on rank", bmrs.distributed.rank())
"""


@pytest.mark.slow
def test_ddp_recipe_with_two_processes(tmp_path):
    script = tmp_path / "recipe.py"
    script.write_text(block("DistributedDataParallel(model)") + DDP_CHECKS)
    proc = run(["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", script], tmp_path)
    assert proc.stdout.count("checked on rank") == 2


LIGHTNING_CHECKS = """
import bmrs
assert bmrs.parameter_compression(trainer.lightning_module.net) > 0.1 and not bmrs.gates(small)
"""


@pytest.mark.slow
def test_lightning_recipe(tmp_path):
    pytest.importorskip("lightning")
    script = tmp_path / "lightning_recipe.py"
    script.write_text(block("BMRSPruning(") + LIGHTNING_CHECKS)
    run([script], tmp_path)
