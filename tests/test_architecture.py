"""The import directions between bmrs's packages (docs/architecture.md, "Layers").

Every module under src/bmrs falls into a layer by its name (the longest matching prefix in
LAYERS); a module may import modules of its own layer and of the layers below it, never
above. Integrations with optional libraries are imported by no library module. The check
reads the source (every ``import`` statement, at module level or inside a function), so an
import hidden in a function to get around the layering fails it too.
"""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"

#: Layers from the bottom up: (name, module-name prefixes). A new module falls into the layer
#: of its package; a new top-level module must be added here.
LAYERS = [
    ("foundation", ("bmrs._io", "bmrs.errors", "bmrs.math", "bmrs.distributed")),
    ("core", ("bmrs.reduction", "bmrs.structure", "bmrs.gates", "bmrs.attention", "bmrs.adapters")),
    ("tools", ("bmrs.pruning", "bmrs.compaction")),
    ("components", ("bmrs.training", "bmrs.models", "bmrs.datasets", "bmrs")),
    ("reporting", ("bmrs.reporting",)),
    ("experiments", ("bmrs.experiments",)),
    ("cli", ("bmrs.cli", "bmrs.__main__")),
]
#: The library: what ``import bmrs`` may load. The layers above it are the application.
LIBRARY = ("foundation", "core", "tools", "components")
#: Integrations with optional libraries: they may import the library; no library module
#: imports them (they are imported only when used).
INTEGRATIONS = ("bmrs.lightning", "bmrs.transformers")

RANK = {name: i for i, (name, _) in enumerate(LAYERS)}

#: Known imports against the layering, each with why it is still there; the test fails for
#: any other, and for an entry here that is no longer needed.
EXCEPTIONS = {
    # reports check a run's config.json with RunConfig's field types and its metrics.json with
    # check_metrics (added with the damaged-file checks); both should move into a run-file
    # format module that reporting and experiments can import
    ("bmrs.reporting.collect", "bmrs.experiments.runs"),
}


def layer_of(module: str) -> str:
    """The layer of a bmrs module (``"integration"`` for an integration), by its name."""
    if any(module == p or module.startswith(p + ".") for p in INTEGRATIONS):
        return "integration"
    best = None
    for name, prefixes in LAYERS:
        for p in prefixes:
            if (module == p or module.startswith(p + ".")) and (best is None or len(p) > len(best[1])):
                best = (name, p)
    if best is None:
        raise LookupError(f"{module} is in no layer: add it to LAYERS or INTEGRATIONS in {Path(__file__).name}")
    return best[0]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imported(module: str, source: str, is_package: bool) -> set[str]:
    """The bmrs modules ``source`` (the text of ``module``) imports, anywhere in it."""
    package = module if is_package else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            found.add(target)
            if node.module is None:  # "from . import special": the module bmrs.math.special
                found.update(f"{target}.{a.name}" for a in node.names)
    return {m for m in found if m == "bmrs" or m.startswith("bmrs.")}


def violations(module: str, source: str, is_package: bool = False) -> list[str]:
    """The imports of ``module`` that break the layering, as readable lines."""
    own = layer_of(module)
    bad = []
    for target in sorted(imported(module, source, is_package)):
        try:
            layer = layer_of(target)
        except LookupError:
            continue  # "from . import name" of a name that is not a module
        if layer == "integration":
            if own in LIBRARY:
                bad.append(f"{module} ({own}) imports the integration {target}")
            continue
        if own == "integration":
            if layer not in LIBRARY:
                bad.append(f"{module} (integration) imports {target} ({layer}), not part of the library")
            continue
        if RANK[layer] > RANK[own]:
            bad.append(f"{module} ({own}) imports {target} ({layer}), a layer above it")
    return bad


def _modules():
    for path in sorted((SRC / "bmrs").rglob("*.py")):
        yield module_name(path), path.read_text(encoding="utf-8"), path.name == "__init__.py"


def test_every_module_has_a_layer():
    for module, _, _ in _modules():
        layer_of(module)


def test_imports_point_down_the_layers():
    bad = [line for module, source, is_package in _modules() for line in violations(module, source, is_package)]
    excepted = [line for line in bad if any(line.startswith(f"{a} (") and f" imports {b} (" in line for a, b in EXCEPTIONS)]
    assert [line for line in bad if line not in excepted] == []
    assert len(excepted) == len(EXCEPTIONS)  # an exception no longer needed must leave the list


@pytest.mark.parametrize(
    "module, source, expected",
    [
        ("bmrs.reporting.tables", "def f():\n    from ..experiments.runs import load_run\n", "imports bmrs.experiments.runs"),
        ("bmrs.pruning.criteria", "import bmrs.cli\n", "imports bmrs.cli"),
        ("bmrs.gates", "from .pruning import decide\n", "imports bmrs.pruning"),
        ("bmrs.compaction.core", "from ..lightning import Module\n", "the integration bmrs.lightning"),
        ("bmrs.transformers", "from .experiments import runs\n", "not part of the library"),
    ],
)
def test_the_check_finds_imports_against_the_layering(module, source, expected):
    bad = violations(module, source)
    assert len(bad) == 1 and expected in bad[0]


def test_the_check_allows_imports_down_and_within_a_layer():
    assert violations("bmrs.experiments.analysis", "from ..reporting.collect import method_label\n") == []
    assert violations("bmrs.gates", "from .structure import couple\nfrom .math import fast\n") == []
    assert violations("bmrs.math.fast", "from . import special as sp\n") == []
    assert violations("bmrs.lightning", "from .gates import model_kl\nfrom .training import elbo_loss\n") == []


def test_importing_bmrs_loads_no_application_module():
    code = ("import sys, bmrs; print(' '.join(sorted(m for m in sys.modules "
            "if m.startswith(('bmrs.experiments', 'bmrs.reporting', 'bmrs.cli')))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""
