"""The package's layering, checked on the source: which layer may import which, no argparse outside cli/, no
import cycles, and the public names. Imports inside functions count as much as those at the top."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import safeinfer_integrations

PACKAGE = "safeinfer_integrations"
ROOT = Path(safeinfer_integrations.__file__).resolve().parent
CORE_LAYERS = ("errors", "models", "method", "runtime")
UPPER = ("training", "evaluation", "cli", "langchain", "llama_index")
ADAPTERS = ("langchain", "llama_index")
# What the adapters may import of the package: its top level, the errors, and the runtime's public modules
# (constrain for response formats, plus the refusal rule, which they report, and the local embedding model's location).
ADAPTER_API = frozenset(
    {
        PACKAGE,
        f"{PACKAGE}.errors",
        f"{PACKAGE}.runtime.config",
        f"{PACKAGE}.runtime.constrain",
        f"{PACKAGE}.runtime.engine",
        f"{PACKAGE}.runtime.engine_cache",
        f"{PACKAGE}.runtime.generation",
        f"{PACKAGE}.runtime.prompts",
        f"{PACKAGE}.runtime.settings",
        f"{PACKAGE}.runtime.streams",
        f"{PACKAGE}.runtime.tools",
        f"{PACKAGE}.method.refusal",
        f"{PACKAGE}.models.embeddings",
    }
)


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path) -> set[str]:
    """Every module of the package that ``path`` imports (``from . import x`` counts as ``pkg.x`` when x is a
    module, else as ``pkg``)."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.startswith(PACKAGE))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            if not module.startswith(PACKAGE):
                continue
            for alias in node.names:
                candidate = f"{module}.{alias.name}"
                as_path = ROOT.parent / Path(*candidate.split("."))
                found.add(candidate if as_path.with_suffix(".py").is_file() or as_path.is_dir() else module)
    return found


SOURCES = {_module_name(path): path for path in sorted(ROOT.rglob("*.py"))}
GRAPH = {name: _imports(path) for name, path in SOURCES.items()}


def _layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def test_the_checks_see_the_imports() -> None:
    """The parser resolves relative imports (so the rules below cannot pass vacuously)."""
    assert f"{PACKAGE}.runtime.decode" in GRAPH[f"{PACKAGE}.runtime.engine"]
    assert f"{PACKAGE}.method.vector" in GRAPH[f"{PACKAGE}.runtime.decode"]
    assert f"{PACKAGE}.runtime.engine_cache" in GRAPH[f"{PACKAGE}.langchain._params"]
    assert any(_layer(m) == "training" for m in GRAPH[f"{PACKAGE}.cli.vectors"])


@pytest.mark.parametrize("module", sorted(m for m in GRAPH if _layer(m) in CORE_LAYERS))
def test_the_core_imports_no_upper_layer(module: str) -> None:
    """errors, models, method and runtime never import training, evaluation, the command line or the adapters."""
    bad = sorted(m for m in GRAPH[module] if _layer(m) in UPPER)
    assert not bad, f"{module} imports {bad}"


@pytest.mark.parametrize("module", sorted(m for m in GRAPH if _layer(m) in ADAPTERS))
def test_the_adapters_import_only_the_public_runtime_api(module: str) -> None:
    layer = _layer(module)
    outside = {m for m in GRAPH[module] if _layer(m) != layer}
    assert outside <= ADAPTER_API, f"{module} imports {sorted(outside - ADAPTER_API)}"


def test_the_core_never_imports_langchain_or_llama_index() -> None:
    """Only the adapters, and the evaluation's framings (which render the frameworks' own prompts), import them."""
    for name, path in SOURCES.items():
        if _layer(name) in ADAPTERS or name == f"{PACKAGE}.evaluation.framings":
            continue
        text = path.read_text(encoding="utf-8")
        assert "import langchain" not in text and "from langchain" not in text, name
        assert "import llama_index" not in text and "from llama_index" not in text, name


def test_argparse_only_in_cli() -> None:
    users = sorted(name for name, path in SOURCES.items() if "argparse" in path.read_text(encoding="utf-8"))
    assert users and all(_layer(name) == "cli" for name in users), users


def test_no_import_cycles() -> None:
    """No module reaches itself through the package's imports (a package's ``__init__`` importing its own
    submodules is not a cycle: Python runs it first)."""

    def reaches(start: str) -> set[str]:
        seen: set[str] = set()
        todo = [m for m in GRAPH[start] if m in GRAPH and not start.startswith(m + ".") and m != start]
        while todo:
            current = todo.pop()
            if current in seen:
                continue
            seen.add(current)
            todo.extend(m for m in GRAPH[current] if m in GRAPH and not current.startswith(m + "."))
        return seen

    cycles = sorted(name for name in GRAPH if not SOURCES[name].name == "__init__.py" and name in reaches(name))
    assert not cycles, f"import cycles through {cycles}"


def test_public_names() -> None:
    """The names importable from the package top level (a change here is a change of the public API)."""
    assert sorted(safeinfer_integrations.__all__) == [
        "AsyncGenerationStream",
        "Generation",
        "GenerationStream",
        "HarmGate",
        "InvalidInputError",
        "InvalidSettingError",
        "InvalidTypeError",
        "SafeInferConfig",
        "SafeInferEngine",
        "SafeInferError",
        "SafetyTelemetry",
        "SafetyVector",
        "SamplingSettings",
        "UnknownSettingError",
        "Usage",
        "VectorFileError",
        "VectorMismatchError",
        "__version__",
    ]
    for name in safeinfer_integrations.__all__:
        assert hasattr(safeinfer_integrations, name), name
    from importlib.metadata import version

    assert safeinfer_integrations.__version__ == version("safeinfer-integrations")


def test_error_types_keep_the_builtin_bases() -> None:
    from safeinfer_integrations import errors

    for name in errors.__all__:
        error = getattr(errors, name)
        assert issubclass(error, errors.SafeInferError)
        if error is errors.NumericalError:  # not bad input: numbers the model produced
            assert issubclass(error, FloatingPointError)
        elif error is not errors.SafeInferError:
            assert issubclass(error, (ValueError, TypeError)), name
