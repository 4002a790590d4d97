"""Lay the `stepline` package out as it installs, as symlinks, for tools that read source trees.

pyproject's package-dir builds one package from four folders (engine/ ->
stepline, projections/ -> stepline.projections, ...). mypy and import-linter
follow neither that mapping nor the import hook of the editable install, so
this builds ROOT/stepline/ from symlinks, read from package-dir itself, and
prints one sed expression per package folder (longest link prefix first) that
maps the links back to the source folders, so messages name engine/... files.

Usage: python scripts/package_tree.py ROOT
"""

import shutil
import sys
import tomllib
from pathlib import Path

root = Path(sys.argv[1])
package_dir = tomllib.loads(Path("pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
shutil.rmtree(root, ignore_errors=True)
mapping = []
# Parents before children: a sub-package folder (projections/) becomes a
# directory inside its parent's (engine/'s) links.
for package, folder in sorted(package_dir.items(), key=lambda item: item[0].count(".")):
    target = root.joinpath(*package.split("."))
    target.mkdir(parents=True)
    for entry in sorted(Path(folder).iterdir()):
        if entry.name != "__pycache__":
            (target / entry.name).symlink_to(entry.resolve())
    mapping.append((f"{target}/", f"{folder}/"))
for link, folder in sorted(mapping, key=lambda item: -len(item[0])):
    print(f"s|^{link}|{folder}|")
