"""Loading the new code a shadow runs, beside the code already loaded.

`load_code(target)` imports a module fresh, under a private name, and
returns the tasks it declares in a registry of their own: the new version
of `process-order` must not collide with the old one a server or a test
already holds in the default registry, and must be the code on disk now,
not a cached import. `load_code_under(root, name)` is the HTTP API's
variant: only a dotted module name that resolves to a file inside `root`
(`stepline serve --shadow-path`), never a path or a module found elsewhere
on sys.path, since importing a module runs its code.
"""

from __future__ import annotations

import importlib
import importlib.util
import itertools
import re
import sys
import threading
from pathlib import Path
from types import ModuleType
from typing import Any

from stepline.errors import TaskDefinitionError
from stepline.sdk.task import Registry, Task

# The module, not the `task` decorator that stepline/__init__.py exports
# under its name; typed as Any, since its attribute is swapped below.
task_module: Any = importlib.import_module("stepline.sdk.task")
_counter = itertools.count(1)
# The default registry is swapped while a module is imported; one import at a time.
_lock = threading.Lock()
_MODULE_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*")


def _import_file(path: Path, package: str | None) -> Registry:
    stem = path.parent.name if path.name == "__init__.py" else path.stem
    private = f"_stepline_shadow_{next(_counter)}_{stem}"
    name = f"{package}.{private}" if package else private
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise TaskDefinitionError(f"cannot import {path}")
    module = importlib.util.module_from_spec(spec)
    fresh = Registry()
    with _lock:
        saved = task_module.default_registry
        # Decorators without registry= land in `fresh`, not in the registry
        # the running code uses (the same task ids would collide there).
        task_module.default_registry = fresh
        sys.modules[name] = module  # pydantic and dataclasses look their module up
        parent = str(path.parent)
        added = parent not in sys.path
        if added:
            sys.path.insert(0, parent)  # sibling imports, as `load_app` allows
        try:
            spec.loader.exec_module(module)
        except Exception as exc:
            sys.modules.pop(name, None)
            raise TaskDefinitionError(f"importing {path} failed: {type(exc).__name__}: {exc}") from exc
        finally:
            task_module.default_registry = saved
            if added:
                sys.path.remove(parent)
    return _registry_of(module, fresh)


def _registry_of(module: ModuleType, fresh: Registry) -> Registry:
    own = getattr(module, "registry", None)
    if isinstance(own, Registry):
        return own
    if len(fresh):
        return fresh
    # Tasks built with an explicit registry the module does not expose.
    found = Registry(t for t in vars(module).values() if isinstance(t, Task))
    return found


def load_code(target: str) -> Registry:
    """The tasks of `target` (a file path or a dotted module name), freshly imported."""
    path = Path(target)
    if target.endswith(".py") or path.exists():
        if not path.is_file():
            raise TaskDefinitionError(f"no such module file: {target}")
        return _import_file(path.resolve(), None)
    if not _MODULE_NAME.fullmatch(target):
        raise TaskDefinitionError(f"{target!r} is neither a .py file nor a dotted module name")
    try:
        spec = importlib.util.find_spec(target)
    except (ImportError, ValueError) as exc:
        raise TaskDefinitionError(f"cannot find module {target!r}: {exc}") from exc
    if spec is None or spec.origin is None or not spec.origin.endswith(".py"):
        raise TaskDefinitionError(f"cannot find the source of module {target!r}")
    package = target.rpartition(".")[0] or None
    return _import_file(Path(spec.origin), package)


def resolve_under(root: str | Path, name: str) -> Path:
    """The file of dotted module `name` inside `root`; TaskDefinitionError otherwise."""
    if not _MODULE_NAME.fullmatch(name):
        raise TaskDefinitionError(f"module must be a dotted module name (e.g. app_v2), got {name!r}")
    base = Path(root).resolve()
    rel = Path(*name.split("."))
    for candidate in (base / rel.with_suffix(".py"), base / rel / "__init__.py"):
        resolved = candidate.resolve()  # a symlink out of root does not count
        if resolved.is_file() and resolved.is_relative_to(base):
            return resolved
    raise TaskDefinitionError(f"no module {name!r} under the shadow path {base}")


def load_code_under(root: str | Path, name: str) -> Registry:
    """The tasks of module `name`, which must be a file inside `root`."""
    return _import_file(resolve_under(root, name), None)


__all__ = ["load_code", "load_code_under", "resolve_under"]
