"""The import directions between bmrs's packages (docs/architecture.md, "Layers").

Every module under src/bmrs falls into a layer by its name (the longest matching prefix in
LAYERS: a package covers its submodules, a top-level module is named whole); a module in no
layer fails the test. A module may import modules of its own layer and of the layers below it,
never above. Integrations with optional libraries are imported by no library module. The
check reads the source: every ``import`` statement, at module level or inside a function, and
every ``importlib.import_module`` / ``__import__`` of a literal name, so an import hidden in
a function or done by name to get around the layering fails it too; a module imported by a
name the check cannot read fails it as well. No two modules import each other, directly or
through others.
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
    ("core", ("bmrs.reduction", "bmrs.structures", "bmrs.gates")),
    ("tools", ("bmrs.pruning", "bmrs.compaction")),
    ("components", ("bmrs.training", "bmrs.models", "bmrs.datasets", "bmrs.deploy", "bmrs.rundir", "bmrs.calibration",
                    "bmrs")),
    ("reporting", ("bmrs.reporting",)),
    ("experiments", ("bmrs.experiments",)),
    ("cli", ("bmrs.cli", "bmrs.commands", "bmrs.__main__")),
]
#: The library: what ``import bmrs`` may load. The layers above it are the application.
LIBRARY = ("foundation", "core", "tools", "components")
#: Integrations with optional libraries: they may import the library; no library module
#: imports them (they are imported only when used).
INTEGRATIONS = ("bmrs.integrations",)

RANK = {name: i for i, (name, _) in enumerate(LAYERS)}

#: Modules that import by a computed name, with what they import: the only way in from the
#: library to an integration is a model of the integration's library, whose top-level package
#: names the integration module (bmrs.structures.adapters.INTEGRATIONS, checked below).
BY_NAME = {"bmrs.structures.adapters": "the integration of a model's package"}


def layer_of(module: str) -> str:
    """The layer of a bmrs module (``"integration"`` for an integration), by its name."""
    if any(module == p or module.startswith(p + ".") for p in INTEGRATIONS):
        return "integration"
    best = None
    for name, prefixes in LAYERS:
        for p in prefixes:
            # "bmrs" itself is the package's __init__, not a prefix of every module
            covers = module == p or (p != "bmrs" and module.startswith(p + "."))
            if covers and (best is None or len(p) > len(best[1])):
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
        if isinstance(node, ast.Call) and _imports_by_name(node):
            name = node.args[0] if node.args else None
            if not (isinstance(name, ast.Constant) and isinstance(name.value, str)):
                if module in BY_NAME:
                    continue
                raise AssertionError(f"{module} imports a module by a name the layer check cannot read (line {node.lineno})")
            found.add(name.value)
        elif isinstance(node, ast.Import):
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


def _imports_by_name(call: ast.Call) -> bool:
    """Whether ``call`` is ``importlib.import_module(...)``, ``import_module(...)`` or ``__import__(...)``."""
    f = call.func
    return (isinstance(f, ast.Attribute) and f.attr == "import_module") or \
        (isinstance(f, ast.Name) and f.id in ("import_module", "__import__"))


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


def test_a_module_missing_from_the_table_is_refused():
    with pytest.raises(LookupError, match="bmrs.newthing is in no layer"):
        layer_of("bmrs.newthing")
    assert layer_of("bmrs") == "components" and layer_of("bmrs.pruning.newthing") == "tools"


def test_imports_point_down_the_layers():
    bad = [line for module, source, is_package in _modules() for line in violations(module, source, is_package)]
    assert bad == []


def _import_graph() -> dict[str, set[str]]:
    """bmrs module -> the bmrs modules it imports (a package's name stands for its __init__)."""
    modules = {module: (source, is_package) for module, source, is_package in _modules()}
    graph = {}
    for module, (source, is_package) in modules.items():
        targets = set()
        for target in imported(module, source, is_package):
            while target not in modules and "." in target:  # "from .x import name": the module x
                target = target.rpartition(".")[0]
            if target in modules and target != module:
                targets.add(target)
        graph[module] = targets
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The import cycles of ``graph`` (its strongly connected components of more than one
    module), by Tarjan's algorithm. A package's ``__init__`` importing its own submodules,
    which import siblings through the package, is the usual shape of a package and is left out:
    edges from a package to its submodules are not followed."""
    index, low, stack, on, found = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w.startswith(v + "."):
                continue
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_import_cycle_between_modules():
    # a package's submodules import each other's names through the package (bmrs.pruning's
    # __init__ re-exports); what must not exist is two modules that need each other
    graph = {m: {t for t in targets if not (m.rpartition(".")[0] == t)} for m, targets in _import_graph().items()}
    assert _cycles(graph) == []


def test_the_cycle_check_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"p": {"p.x"}, "p.x": {"p"}}) == []  # a package and its own submodule


@pytest.mark.parametrize(
    "module, source, expected",
    [
        ("bmrs.reporting.tables", "def f():\n    from ..experiments.runs import load_run\n", "imports bmrs.experiments.runs"),
        ("bmrs.pruning.criteria", "import bmrs.cli\n", "imports bmrs.cli"),
        ("bmrs.gates", "from .pruning import decide\n", "imports bmrs.pruning"),
        ("bmrs.compaction.core", "from ..integrations.lightning import Module\n", "the integration bmrs.integrations.lightning"),
        ("bmrs.integrations.transformers", "from ..experiments import runs\n", "not part of the library"),
        ("bmrs.compaction.storage", "import importlib\nimportlib.import_module('bmrs.models')\n", "imports bmrs.models"),
        ("bmrs.rundir", "def f():\n    __import__('bmrs.experiments.runs')\n", "imports bmrs.experiments.runs"),
    ],
)
def test_the_check_finds_imports_against_the_layering(module, source, expected):
    bad = violations(module, source)
    assert len(bad) == 1 and expected in bad[0]


def test_integrations_are_imported_by_name_only_from_their_table():
    from bmrs.structures.adapters import INTEGRATIONS

    assert INTEGRATIONS and all(layer_of(m) == "integration" and (SRC / (m.replace(".", "/") + ".py")).is_file()
                                for m in INTEGRATIONS.values())


def test_an_import_by_a_computed_name_is_refused():
    with pytest.raises(AssertionError, match="by a name the layer check cannot read"):
        violations("bmrs.gates", "import importlib\nname = 'bmrs.cli'\nimportlib.import_module(name)\n")


def test_the_check_allows_imports_down_and_within_a_layer():
    assert violations("bmrs.experiments.analysis", "from ..reporting.collect import method_label\n") == []
    assert violations("bmrs.gates", "from .structures import couple\nfrom .math import gate_kernel\n") == []
    assert violations("bmrs.math.gate_kernel", "from . import special as sp\n") == []
    assert violations("bmrs.integrations.lightning", "from ..gates import model_kl\nfrom ..training import elbo_loss\n") == []


def test_importing_bmrs_loads_no_application_module():
    code = ("import sys, bmrs; print(' '.join(sorted(m for m in sys.modules "
            "if m.startswith(('bmrs.experiments', 'bmrs.reporting', 'bmrs.cli')))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""
