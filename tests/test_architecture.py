"""The package's layering, read from the source: no import circle, the CLI at the top (imported by
nobody), the study on top of the library, no private name imported across modules, one registry
that the config and the command line read, and one place per option default."""

from __future__ import annotations

import ast
import dataclasses
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "plmetric"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports() -> dict[str, list[tuple[str, list[str]]]]:
    """module -> [(imported plmetric module, imported names)], module-level and inside functions."""
    graph: dict[str, list[tuple[str, list[str]]]] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        module = _module_name(path)
        edges = []
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("plmetric"):
                names = [alias.name for alias in node.names]
                edges.append((node.module, names))
                # ``from plmetric import faults``: the names are modules
                edges += [(f"{node.module}.{n}", []) for n in names if (PACKAGE / f"{n}.py").exists()]
            elif isinstance(node, ast.Import):
                edges += [(alias.name, []) for alias in node.names if alias.name.startswith("plmetric")]
        graph[module] = edges
    return graph


def _type_checking_only(path: Path) -> set[str]:
    """Modules imported under ``if TYPE_CHECKING:`` (no import at run time)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.If) and getattr(node.test, "id", None) == "TYPE_CHECKING":
            for inner in ast.walk(node):
                if isinstance(inner, ast.ImportFrom) and inner.module:
                    found.add(inner.module)
    return found


def test_no_import_circle() -> None:
    graph = _imports()
    lazy = {_module_name(p): _type_checking_only(p) for p in PACKAGE.rglob("*.py")}
    edges = {m: {t for t, _ in e if t in graph and t != m and t not in lazy[m]} for m, e in graph.items()}
    # the package root and the registry import nothing heavy; ignore edges to the package itself
    edges = {m: {t for t in targets if t != "plmetric"} for m, targets in edges.items()}
    state: dict[str, int] = {}
    cycles = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for target in sorted(edges[node]):
            if state.get(target) == 1:
                cycles.append(path[path.index(target) :] + [target])
            elif target not in state:
                visit(target, [*path, target])
        state[node] = 2

    for node in sorted(edges):
        if node not in state:
            visit(node, [node])
    assert not cycles, cycles


def test_the_cli_is_imported_by_nobody_and_the_study_only_by_the_cli() -> None:
    graph = _imports()
    for module, edges in graph.items():
        targets = {t for t, _ in edges}
        if module != "plmetric.cli":
            assert "plmetric.cli" not in targets, module
            assert "plmetric.study" not in targets, f"{module} imports the study (an application)"


def test_no_private_name_is_imported_across_modules() -> None:
    offenders = [
        f"{module} imports {name} from {target}"
        for module, edges in _imports().items()
        for target, names in edges
        for name in names
        if name.startswith("_") and not name.startswith("__") and target != module
    ]
    assert not offenders, offenders


def test_one_resolve_device_and_one_pairwise_distance_function() -> None:
    definitions: dict[str, list[str]] = {}
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef):
                definitions.setdefault(node.name, []).append(_module_name(path))
    assert definitions["resolve_device"] == ["plmetric.devices"]
    assert definitions["pairwise_distances"] == ["plmetric.distances"]
    assert not {"_exact_pairwise_distance", "_squared_distances", "_row_normalised_distances"} & set(definitions)


def test_the_registry_drives_the_config_and_the_command_line() -> None:
    from plmetric.cli import build_parser
    from plmetric.config import Config, load_config
    from plmetric.methods import REGISTRY, get_method, method_names
    from plmetric.methods.base import Method

    train = next(
        a for a in build_parser()._subparsers._group_actions[0].choices["train"]._actions if a.dest == "method"
    )
    assert tuple(train.choices) == method_names() == tuple(REGISTRY)
    for name in method_names():
        method = get_method(name)
        assert issubclass(method, Method) and method.name == name
        assert load_config(None, [f"train.method={name}"]).train.method == name
    with pytest.raises(ValueError, match="train.method must be none, plm, stml or supervised"):
        load_config(None, ["train.method=magic"])
    assert {f.name for f in dataclasses.fields(Config)} >= {"plm", "stml", "supervised"}


OPTION_NAMES = {
    "m",
    "n_alpha",
    "n_beta",
    "tau",
    "n_max",
    "k_plain",
    "num_proxies",
    "n_proxies",
    "symmetrize",
    "sigma",
    "topk",
}


def test_each_option_default_is_written_once() -> None:
    """The PLM defaults live in plmetric.options; no function repeats them as literals."""
    literal_defaults = []
    for path in PACKAGE.rglob("*.py"):
        if path.name == "options.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef):
                args = node.args.args + node.args.kwonlyargs
                defaults = [None] * (len(node.args.args) - len(node.args.defaults)) + node.args.defaults
                defaults += node.args.kw_defaults
                for arg, default in zip(args, defaults, strict=True):
                    literal = isinstance(default, ast.Constant) and default.value is not None
                    if literal and arg.arg in OPTION_NAMES:
                        literal_defaults.append(f"{_module_name(path)}.{node.name}({arg.arg}={default.value!r})")
    assert not literal_defaults, literal_defaults
