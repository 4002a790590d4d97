#!/usr/bin/env bash
# mypy --strict on the `stepline` package as it installs.
#
# pyproject's package-dir builds one package from four folders (engine/ ->
# stepline, projections/ -> stepline.projections, ...). mypy follows neither
# that mapping nor the import hook of the editable install, so this lays the
# package out under build/typecheck/ as symlinks, read from package-dir itself,
# and runs mypy there ([tool.mypy] in pyproject.toml: strict, `-p stepline`).
# Messages name the source files (engine/runtime/worker.py), not the links.
#
# Usage: scripts/typecheck.sh [mypy args...]   (PY=... picks the interpreter)
set -euo pipefail
cd "$(dirname "$0")/.."

PY="${PY:-.venv/bin/python}"
ROOT=build/typecheck

# Lay out the tree and print one sed expression per package folder, longest
# link prefix first, to map the links back to the source folders.
sed_args=()
while IFS= read -r expr; do
  sed_args+=(-e "$expr")
done < <("$PY" - "$ROOT" <<'EOF'
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
EOF
)

"$PY" -m mypy "$@" | sed "${sed_args[@]}"
