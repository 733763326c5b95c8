"""The package's import graph: no circle between files, and every arrow between packages points down the layers.

The graph is read from the source (``ast``), so an import inside a function counts as much as one at the
top of a file: a lazy import hides a circle from the interpreter, not from a reader.
"""

from __future__ import annotations

import ast
from pathlib import Path

import temde_hf

PACKAGE = Path(temde_hf.__file__).parent

# Lowest first; a module may import its own layer's packages' modules and anything below, never above.
# The same order is written in the README's Layout section.
LAYERS: list[set[str]] = [
    {"models"},  # the model folder (ships as Hub remote code; the package root only re-exports it)
    {"data", "loading", "convert"},
    {"inference"},  # load an encoder (torch / onnxruntime), embed, token sets, rerank scorers
    {"cli_args"},  # command-line flags more than one command takes (over inference's defaults)
    {"export", "evaluation"},
    {"gallery", "hub"},
    {"training"},
    {"cli", "testing"},
]


# The applications over inference: side by side, none imports another (a flag two commands share lives
# in `cli_args`, a layer below them all).
APPLICATIONS = ("export", "evaluation", "gallery", "hub")


def _room(module: str) -> str:
    """``temde_hf.gallery.index`` -> ``gallery``; the package root (``temde_hf``) counts as ``models``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "models"


def _layer(module: str) -> int:
    room = _room(module)
    for depth, rooms in enumerate(LAYERS):
        if room in rooms:
            return depth
    raise AssertionError(f"{module}: its package {room!r} is in no layer; add it to LAYERS and the README")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """Module -> the ``temde_hf`` modules it imports (at any depth: top level, functions, branches; not the
    imports under ``if TYPE_CHECKING:``, which never run).

    Raises:
        AssertionError: When an import names a ``temde_hf`` module that does not exist (a moved file whose
            importers were not updated: an arrow into nowhere).
    """
    files = {_module_name(path): path for path in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    missing = []
    for module, path in files.items():
        package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        targets: set[str] = set()
        tree = ast.parse(path.read_text(encoding="utf-8"))
        type_only = {  # `if TYPE_CHECKING:` imports never run: annotations, not arrows
            id(inner)
            for block in ast.walk(tree)
            if isinstance(block, ast.If) and "TYPE_CHECKING" in ast.unparse(block.test)
            for statement in block.body
            for inner in ast.walk(statement)
        }
        for node in ast.walk(tree):
            if id(node) in type_only:
                continue
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names if alias.name.split(".")[0] == "temde_hf"]
                missing += [f"{module}: import {name}" for name in names if name not in files]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[: len(package.split(".")) - node.level + 1]
                    source = ".".join(base + ([node.module] if node.module else []))
                else:
                    source = node.module or ""
                if source.split(".")[0] != "temde_hf":
                    continue
                if source not in files:
                    missing.append(f"{module}: from {source} import ...")
                    continue
                # `from pkg import submodule` imports the submodule; `from pkg import name`, the package
                names = [
                    f"{source}.{a.name}" if f"{source}.{a.name}" in files else source for a in node.names
                ]
            else:
                continue
            targets.update(name for name in names if name in files and name != module)
        graph[module] = targets
    assert not missing, "imports of modules that do not exist:\n" + "\n".join(sorted(missing))
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One circle of imports, as the list of modules around it, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(module: str) -> list[str] | None:
        state[module] = 1
        path.append(module)
        for target in sorted(graph[module]):
            if state.get(target) == 1:
                return [*path[path.index(target) :], target]
            if target not in state and (found := visit(target)):
                return found
        state[module] = 2
        path.pop()
        return None

    for module in sorted(graph):
        if module not in state and (found := visit(module)):
            return found
    return None


def test_the_graph_sees_lazy_and_relative_imports() -> None:
    graph = import_graph()
    # a relative import at the top of a file, and one inside a function
    assert "temde_hf.inference.encode" in graph["temde_hf.gallery.build"]
    assert "temde_hf.export.tower_graph" in graph["temde_hf.training.features"]
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_every_import_of_the_package_names_a_module_that_exists() -> None:
    import_graph()  # raises, listing them, when one does not


def test_no_import_circle_between_files() -> None:
    cycle = _cycle(import_graph())
    assert cycle is None, "import circle: " + " -> ".join(cycle)


def test_imports_point_down_the_layers() -> None:
    upward = [
        f"{module} -> {target}"
        for module, targets in import_graph().items()
        for target in targets
        if _layer(target) > _layer(module)
    ]
    assert not upward, "imports from a lower layer up to a higher one:\n" + "\n".join(sorted(upward))


def test_the_model_folder_imports_only_itself() -> None:
    # it ships as Hub remote code: nothing else of the package is there
    outside = [
        f"{module} -> {target}"
        for module, targets in import_graph().items()
        if module.startswith("temde_hf.models.temde.")
        for target in targets
        if not target.startswith("temde_hf.models.temde")
    ]
    assert not outside, outside


def test_the_applications_import_none_of_each_other() -> None:
    across = [
        f"{module} -> {target}"
        for module, targets in import_graph().items()
        if _room(module) in APPLICATIONS
        for target in targets
        if _room(target) in APPLICATIONS and _room(target) != _room(module)
    ]
    assert not across, "an application imports another:\n" + "\n".join(sorted(across))
