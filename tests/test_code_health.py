"""The package's shape: layers import downwards only, no import circle, the engine reads no Hydra state,
no function longer than a screenful or two."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT

PACKAGE = ROOT / "cbam"
MAX_FUNCTION_LINES = 120
# Lower layers never import higher ones: what a module is, where it goes and how it is trained come before
# the reports, figures and command lines built on them.
LAYERS = [
    {"cbam.errors", "cbam.resolvers"},
    {"cbam.attention", "cbam.models", "cbam.data", "cbam.tracking"},
    {"cbam.engine"},
    {"cbam.report", "cbam.viz"},
    {"cbam.cli"},
]


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imported(name: str, path: Path, known: set[str]) -> set[str]:
    """The cbam modules `name` imports, anywhere in the file (function-level imports count: they run too)."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            # `from pkg import sub` imports the submodule when there is one, else a name of pkg
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        else:
            continue
        found |= {t for t in targets if t in known and t != name}
    return found


def layer(name: str) -> int:
    found = [i for i, group in enumerate(LAYERS) if any(name == g or name.startswith(g + ".") for g in group)]
    assert found, f"{name} is in no layer: add it to LAYERS"
    return found[0]


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    mods = modules()
    return {name: imported(name, path, set(mods)) for name, path in mods.items() if name != "cbam"}


def test_layers_import_only_downwards(graph):
    upward = [
        f"{a} imports {b}" for a, targets in graph.items() for b in targets if b != "cbam" and layer(b) > layer(a)
    ]
    assert not upward


def test_no_import_circle(graph):
    done, path = set(), []

    def visit(name: str) -> None:
        if name in path:
            raise AssertionError("import circle: " + " -> ".join([*path[path.index(name) :], name]))
        if name in done:
            return
        path.append(name)
        for target in sorted(graph.get(name, ())):
            visit(target)
        path.pop()
        done.add(name)

    for name in sorted(graph):
        visit(name)


def test_the_engine_reads_no_hydra_runtime_state():
    for path in (PACKAGE / "engine").rglob("*.py"):
        source = path.read_text()
        assert "HydraConfig" not in source and "hydra.core" not in source, path


def test_no_function_is_longer_than_the_limit():
    long = []
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({lines} lines)")
    assert not long


def test_the_comparison_reads_records_without_importing_torch():
    """scripts/compare.py only reads JSON and YAML: without torch (and what it pulls in) it starts in a
    second or two instead of five or more, and its errors come as fast."""
    code = "import sys, cbam.report, cbam.engine.records; print(sorted({'torch', 'timm'} & set(sys.modules)))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


def test_a_default_training_run_starts_without_timm(tmp_path):
    """timm loads its whole model zoo on import, about a second of every start; only the recipes that use its
    mixup, EMA or weight-decay grouping import it."""
    result = subprocess.run(
        [
            sys.executable, "-X", "importtime", str(ROOT / "train.py"), "data=synthetic", "data.source.train_size=64",
            "data.source.val_size=64", "data.batch_size=32", "trainer.epochs=1", "trainer.device=cpu", "logger=none",
            f"hydra.run.dir={tmp_path}",
        ],
        cwd=tmp_path, capture_output=True, text=True,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    timings = [line for line in result.stderr.splitlines() if line.startswith("import time:")]
    imported = {line.rsplit("|", 1)[1].strip() for line in timings}
    assert {"torch", "torchvision"} <= imported and "timm" not in imported
    assert (tmp_path / "summary.json").exists()
