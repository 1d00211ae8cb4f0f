"""The shape of the code: one source for each option, no import cycle, earlier module names kept."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

from lenet import options
from lenet.errors import ConfigError
from lenet.options import TrainConfig
from lenet.training import optim

SRC = Path(__file__).resolve().parents[1] / "src" / "lenet"


def test_every_named_optimizer_and_schedule_has_a_builder_and_nothing_else():
    assert sorted(optim.OPTIMIZER_BUILDERS) == sorted(options.OPTIMIZERS)
    assert sorted(optim.SCHEDULE_BUILDERS) == sorted(options.SCHEDULES)


@pytest.mark.parametrize("field, value, message", [
    ("epochs", 0, "--epochs 0: must be an integer >= 1"),
    ("batch_size", 2.5, "--batch-size 2.5: must be an integer >= 1"),
    ("lr", float("inf"), "--lr inf: must be a number"),
    ("lr", -0.1, "--lr -0.1: must be a positive number"),
    ("momentum", -1.0, "--momentum -1.0: must be in [0, 1)"),
    ("weight_decay", -1e-4, "--weight-decay -0.0001: must be a number >= 0"),
    ("optimizer", "lbfgs", "--optimizer 'lbfgs': choose one of sgd, momentum, adam, adamw, sdlm"),
    ("schedule", "step", "--schedule 'step': choose one of constant, cosine, onecycle, lecun"),
    ("amp", "fp8", "--amp 'fp8': choose one of off, bf16, fp16"),
    ("compile_mode", "fast", "--compile-mode 'fast': choose one of default, reduce-overhead, max-autotune"),
    ("seed", -1, "--seed -1: must be an integer >= 0"),
    ("shift", -2, "--shift -2: must be an integer >= 0"),
    ("flip", "yes", "--flip 'yes': must be true or false"),
    ("label_smoothing", 1.0, "--label-smoothing 1.0: must be in [0, 1)"),
    ("device", "tpu", "--device 'tpu': not a device name"),
])
def test_the_python_api_refuses_what_the_cli_refuses(field, value, message):
    with pytest.raises(ConfigError, match="^" + message.replace("[", r"\[").replace("(", r"\(")
                       .replace(")", r"\)").replace("+", r"\+").replace(".", r"\.")):
        TrainConfig(**{field: value}).validate()


def _imports(path: Path, package: str) -> set[str]:
    """The lenet modules ``path`` imports, anywhere in it (module level or inside functions)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
            target = f"{base}.{node.module}" if node.module else base
            for alias in node.names:  # `from . import runs` imports the module lenet.x.runs
                sub = f"{target}.{alias.name}"
                found.add(sub if (SRC.parent / sub.replace(".", "/")).with_suffix(".py").exists() else target)
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("lenet"):
            found.add(node.module)
    return found


def test_no_import_cycle_between_modules():
    graph = {}
    for path in SRC.rglob("*.py"):
        rel = path.relative_to(SRC.parent).with_suffix("")
        name = ".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)
        package = name if rel.name == "__init__" else name.rpartition(".")[0]
        # A module importing names from its own parent package (e.g. lenet.__version__) is how
        # packages work; Python finishes the parent first. Every other import is an edge.
        graph[name] = {m for m in _imports(path, package) if m != name and not name.startswith(m + ".")}
    state: dict[str, int] = {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in graph.get(node, ()):
            assert state.get(nxt) != 1, "import cycle: " + " -> ".join(path + [nxt])
            if nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])


@pytest.mark.parametrize("old, new", [
    ("lenet.blconv", "lenet.kernels.ops"), ("lenet.evaluation", "lenet.inspect.evaluation"),
    ("lenet.predict", "lenet.use.predict"), ("lenet.runs", "lenet.training.runs"),
    ("lenet.compare", "lenet.experiments.compare"), ("lenet.lenet5", "lenet.models.lenet5"),
])
def test_earlier_module_names_import_the_same_module(old, new):
    assert importlib.import_module(old) is importlib.import_module(new)


def test_public_api_names_resolve():
    import lenet

    for name in lenet.__all__:
        assert getattr(lenet, name) is not None
    assert lenet.train is importlib.import_module("lenet.training").train
