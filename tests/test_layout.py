"""The package's layers (docs/architecture.md): every import, lazy ones included, points to the
same layer or one above it, and no chain of imports leads back to where it started."""
import ast
from pathlib import Path

import pytest

import ddlp

ROOT = Path(ddlp.__file__).parent

# From the bottom up; a module belongs to the first layer with a prefix that names it.
LAYERS = {
    "core": ["ddlp", "ddlp.config", "ddlp.particles", "ddlp.nn", "ddlp.proposals", "ddlp.encoder",
             "ddlp.decoder", "ddlp.pint", "ddlp.losses", "ddlp.model", "ddlp.storage"],
    "data": ["ddlp.data", "ddlp.metrics", "ddlp.viz", "ddlp.baselines"],
    "training": ["ddlp.train", "ddlp.checkpoint", "ddlp.pint_tuning", "ddlp.convert", "ddlp.parity"],
    "applications": ["ddlp.evaluate", "ddlp.predict", "ddlp.whatif", "ddlp.studio", "ddlp.diffusion"],
    "cli": ["ddlp.quickstart", "ddlp.cli", "ddlp.commands", "ddlp.__main__"],
}
ORDER = list(LAYERS)


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in ROOT.rglob("*.py")}


def layer_of(module: str) -> str:
    best = max((prefix for prefixes in LAYERS.values() for prefix in prefixes
                if module == prefix or module.startswith(prefix + ".")), key=len, default=None)
    assert best is not None, f"{module} is in no layer: add it to LAYERS and docs/architecture.md"
    return next(name for name, prefixes in LAYERS.items() if best in prefixes)


def imports_of(module: str) -> set[str]:
    """ddlp modules imported anywhere in `module`, except under `if TYPE_CHECKING:`."""
    path = MODULES[module]
    tree = ast.parse(path.read_text())
    typing_only = {id(n) for node in ast.walk(tree)
                   if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
                   for n in ast.walk(node)}
    package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    found = set()
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name in MODULES}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = ".".join(package[:len(package) - node.level + 1] + ([node.module] if node.module else []))
            elif (node.module or "").startswith("ddlp"):
                base = node.module
            else:
                continue
            for alias in node.names:
                found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base)
    return {m for m in found if m in MODULES and m != module}


GRAPH = {m: imports_of(m) for m in MODULES}


def test_every_import_points_to_its_layer_or_below():
    upward = [f"{m} ({layer_of(m)}) imports {t} ({layer_of(t)})" for m, targets in GRAPH.items()
              for t in targets if ORDER.index(layer_of(t)) > ORDER.index(layer_of(m))]
    assert not upward, "\n".join(sorted(upward))


def test_no_import_cycles():
    state: dict[str, int] = {}

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for t in sorted(GRAPH[m]):
            if state.get(t) == 1:
                pytest.fail("import cycle: " + " -> ".join(path[path.index(t):] + [m, t]))
            if t not in state:
                visit(t, path + [m])
        state[m] = 2

    for m in sorted(GRAPH):
        if m not in state:
            visit(m, [])


def test_only_the_cli_layer_imports_the_trainer():
    users = sorted(m for m, targets in GRAPH.items() if "ddlp.train" in targets
                   and layer_of(m) not in ("training", "cli"))
    assert not users


def test_the_layer_check_sees_lazy_imports():
    # whatif imports the model at module level and the checkpoint loader inside a function
    assert {"ddlp.model", "ddlp.checkpoint"} <= GRAPH["ddlp.whatif"]
    assert layer_of("ddlp.nn.precision") == "core" and layer_of("ddlp.commands.whatif") == "cli"
