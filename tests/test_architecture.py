"""The package's layering, read from the source: every module in a layer, imports only downwards (also
those inside functions and under TYPE_CHECKING), no import circle, the CLI imported by nobody, each
layer's ``__init__`` saying what it may import, no private name imported across modules, one
registry that the config and the command line read, one place per option default, and no library
code that assumes a repository checkout."""

from __future__ import annotations

import ast
import dataclasses
import re
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "plmetric"

# The layers, bottom to top: a module may import its own layer and the layers before it.
LAYERS = (
    "core",  # validation, options and the method registry, devices, DDP, faults, checkpoint I/O
    "manifold",  # distances, nearest neighbours (exact and faiss), linear pieces, similarities
    "data",  # data set layouts, backbones and preprocessing, the decode-once pipeline
    "evaluation",  # retrieval metrics, similarity estimators, label-free selection criteria
    "config",  # the run configuration and the presets
    "methods",  # one module per training method, with its loss terms
    "training",  # the loop, passes, run folder and state, optimiser, networks, sampling
    "retrieval",  # index and search, embedding files, export, the web page
    "studies",  # the similarity study (it trains)
    "cli",  # the command line, one module per command
)
LIBRARY_LAYERS = LAYERS[:-1]


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_module(dotted: str) -> bool:
    relative = Path(*dotted.split(".")[1:]) if "." in dotted else Path()
    return (PACKAGE / relative).with_suffix(".py").is_file() or (PACKAGE / relative / "__init__.py").is_file()


def _imports() -> dict[str, list[tuple[str, list[str]]]]:
    """module -> [(imported plmetric module, imported names)]: module level, inside functions and
    under ``if TYPE_CHECKING:`` alike."""
    graph: dict[str, list[tuple[str, list[str]]]] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        module = _module_name(path)
        edges = []
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("plmetric"):
                names = [alias.name for alias in node.names]
                edges.append((node.module, names))
                # ``from plmetric.core import faults``: the names are modules
                edges += [(f"{node.module}.{n}", []) for n in names if _is_module(f"{node.module}.{n}")]
            elif isinstance(node, ast.Import):
                edges += [(alias.name, []) for alias in node.names if alias.name.startswith("plmetric")]
        graph[module] = edges
    return graph


def _layer(module: str) -> int | None:
    """The index of ``module``'s layer in LAYERS; None for the package root ``plmetric``."""
    parts = module.split(".")
    if len(parts) > 1 and parts[1] not in LAYERS:
        raise AssertionError(f"{module} is in no layer of {LAYERS}")
    return LAYERS.index(parts[1]) if len(parts) > 1 else None


def test_every_module_belongs_to_a_layer() -> None:
    """Only the package root (the version and this map) sits outside the layers."""
    loose = [
        _module_name(p)
        for p in PACKAGE.rglob("*.py")
        if p.parent == PACKAGE and p.name != "__init__.py" or p.relative_to(PACKAGE).parts[0] not in (*LAYERS, "__init__.py")
    ]
    assert not loose, f"modules outside the layers {LAYERS}: {loose}"
    assert {p.name for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").is_file()} == set(LAYERS)


def test_imports_run_down_the_layers() -> None:
    upward = [
        f"{module} ({LAYERS[_layer(module)]}) imports {target} ({LAYERS[_layer(target)]})"
        for module, edges in _imports().items()
        for target, _ in edges
        if _layer(target) is not None and _layer(module) is not None and _layer(target) > _layer(module)
    ]
    assert not upward, upward
    # the package root imports nothing of its own: importing plmetric stays cheap
    assert not _imports()["plmetric"]


def test_the_architecture_test_fails_on_an_upward_import(tmp_path) -> None:
    """The layer check reads what it should: a planted upward import is found."""
    tree = ast.parse("from plmetric.training.loop import train\n")
    node = tree.body[0]
    assert isinstance(node, ast.ImportFrom) and _layer(node.module) > _layer("plmetric.methods.plm")
    assert _layer("plmetric.core.validation") == 0 and _layer("plmetric.cli.dispatch") == len(LAYERS) - 1


def test_no_import_circle() -> None:
    graph = _imports()
    edges = {m: {t for t, _ in e if t in graph and t != m and t != "plmetric"} for m, e in graph.items()}
    # a package's __init__ that re-exports its modules is not a circle with them
    edges = {m: {t for t in targets if not t.startswith(m + ".")} for m, targets in edges.items()}
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
    for module, edges in _imports().items():
        targets = {t for t, _ in edges}
        if not module.startswith("plmetric.cli"):
            assert not any(t.startswith("plmetric.cli") for t in targets), module
            assert not any(t.startswith("plmetric.studies") for t in targets) or module.startswith(
                "plmetric.studies"
            ), f"{module} imports the study (an application)"


def test_each_layer_says_what_it_holds_and_what_it_may_import() -> None:
    """Each layer's ``__init__`` docstring has a "May import:" sentence naming exactly the layers
    below it (the bottom layer: nothing), so the text cannot drift from LAYERS."""
    for index, layer in enumerate(LAYERS):
        doc = ast.get_docstring(ast.parse((PACKAGE / layer / "__init__.py").read_text()))
        assert doc and len(doc.split("May import:")[0].split()) >= 12, f"{layer}: no description"
        assert "May import:" in doc, f"plmetric.{layer}.__init__ does not say what it may import"
        allowed = re.split(r"\.\s", doc.split("May import:")[1] + " ")[0]  # up to the sentence's end
        named = {name for name in LAYERS if re.search(rf"\b{name}\b", allowed)}
        assert named == set(LAYERS[:index]), f"plmetric.{layer}: 'May import:' names {sorted(named)}"


def test_no_library_module_assumes_a_checkout() -> None:
    """Installed from a wheel there is no repository around the package: nothing reads one."""
    offenders = [
        f"{_module_name(p)}: {pattern}"
        for p in PACKAGE.rglob("*.py")
        for pattern in ("REPO_ROOT", "parents[2]", "parents[3]", '"configs"', "shared/data", '"shared"')
        if pattern in p.read_text()
    ]
    assert not offenders, offenders


def test_no_command_module_is_over_300_lines() -> None:
    commands = sorted((PACKAGE / "cli" / "commands").glob("*.py"))
    assert len([c for c in commands if c.name != "__init__.py"]) >= 9, "one module per command"
    long = {c.name: n for c in commands if (n := len(c.read_text().splitlines())) > 300}
    assert not long, long


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
    assert definitions["resolve_device"] == ["plmetric.core.devices"]
    assert definitions["pairwise_distances"] == ["plmetric.manifold.distances"]
    assert not {"_exact_pairwise_distance", "_squared_distances", "_row_normalised_distances"} & set(definitions)


def test_the_registry_drives_the_config_and_the_command_line() -> None:
    from plmetric.cli import build_parser
    from plmetric.config.schema import Config, load_config
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
    """The PLM defaults live in plmetric.core.options; no function repeats them as literals."""
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


def test_the_readme_python_example_imports_what_it_names() -> None:
    """The public names users import (the README's Python example) keep working."""
    readme = (PACKAGE.parents[1] / "README.md").read_text()
    block = readme.split("```python\n", 1)[1].split("```", 1)[0]
    imports = [line for line in block.splitlines() if line.startswith(("from plmetric", "import plmetric"))]
    assert len(imports) >= 3, imports
    namespace: dict[str, object] = {}
    exec("\n".join(imports), namespace)  # noqa: S102: the repository's own README
    assert {"plm_similarity", "PLMLoss", "evaluate"} <= set(namespace)


MAX_FUNCTION_LINES = 80
# Functions still over the limit, each to be split in named steps as the training loop's stages are.
LONG_FUNCTIONS_ALLOWED: set[str] = set()


def _long_functions(source: str, module: str) -> dict[str, int]:
    """``module.function`` -> lines (``def`` to its last line, docstring included) of every function
    and method in ``source`` longer than MAX_FUNCTION_LINES (methods named by their own name)."""
    return {
        f"{module}.{node.name}": node.end_lineno - node.lineno + 1
        for node in ast.walk(ast.parse(source))
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
        and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES
    }


def test_no_library_function_is_over_80_lines() -> None:
    """Issue 32: a long function is split into named steps that read like its docstring."""
    long = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        long |= _long_functions(path.read_text(), _module_name(path))
    over = {name: lines for name, lines in long.items() if name not in LONG_FUNCTIONS_ALLOWED}
    assert not over, f"functions over {MAX_FUNCTION_LINES} lines: {over}"
    stale = {name for name in LONG_FUNCTIONS_ALLOWED if name not in long}
    assert not stale, f"allowed long functions that are short now (drop them from the list): {stale}"


def test_the_function_length_check_counts_lines() -> None:
    """The check reads what it should: an 81-line function is found, an 80-line one is not."""
    body = "".join(f"    x{i} = {i}\n" for i in range(79))
    assert _long_functions(f"def short():\n{body}", "m") == {}
    assert _long_functions(f"def long():\n{body}    y = 0\n", "m") == {"m.long": 81}
