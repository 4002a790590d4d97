"""The house rules that import-linter's contracts do not cover (docs/architecture.md):

- no import cycle anywhere inside `stepline`, between any two modules, counting
  function-level imports and those under `if TYPE_CHECKING:`;
- no private name (`_name`) imported from another package: siblings of one
  package may share them, across packages a name is public or it moves.

Read from the source folders as pyproject's package-dir maps them, so the test
sees the package as it installs without importing any of it.
"""

from __future__ import annotations

import ast
import tomllib
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _modules() -> dict[str, Path]:
    """Every module of the installed package, by dotted name."""
    package_dir = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
    found: dict[str, Path] = {}
    for package, folder in package_dir.items():
        base = ROOT / folder
        for path in base.rglob("*.py"):
            parts = list(path.relative_to(base).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join([package, *parts])] = path
    return found


def _imports(name: str, path: Path, modules: dict[str, Path]) -> Iterator[tuple[str, str | None, int]]:
    """(imported module, imported name or None, line) of every import in the file, nested ones too."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, None, node.lineno
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            for alias in node.names:
                # `from pkg import module` imports the module itself.
                sub = f"{source}.{alias.name}"
                yield (sub, None, node.lineno) if sub in modules else (source, alias.name, node.lineno)


def _owner(target: str, modules: dict[str, Path]) -> str | None:
    """The module of the package that an import of `target` loads (its longest known prefix)."""
    while target and target not in modules:
        target = target.rpartition(".")[0]
    return target or None


def _graph() -> tuple[dict[str, set[str]], list[str]]:
    modules = _modules()
    edges: dict[str, set[str]] = {m: set() for m in modules}
    private: list[str] = []
    for name, path in modules.items():
        for target, imported, line in _imports(name, path, modules):
            owner = _owner(target, modules)
            if owner is None or owner == name:
                continue
            edges[name].add(owner)
            home = name if path.name == "__init__.py" else name.rpartition(".")[0]
            if imported and imported.startswith("_") and not imported.startswith("__") \
                    and owner.rpartition(".")[0] != home and owner != home:
                private.append(f"{path.relative_to(ROOT)}:{line}: {imported} from {owner}")
    return edges, private


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan, iteratively)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    for start in edges:
        if start in index:
            continue
        work = [(start, iter(sorted(edges[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(edges[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def test_the_package_has_no_import_cycle_counting_lazy_and_type_checking_imports() -> None:
    edges, _ = _graph()
    assert len(edges) > 50, "the package's modules were not found"
    assert _cycles(edges) == []


def test_no_private_name_is_imported_from_another_package() -> None:
    _, private = _graph()
    assert private == []


def test_the_cycle_finder_finds_a_cycle() -> None:
    # The check above is only as good as this: a lazy import back is a cycle.
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []
