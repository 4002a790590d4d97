#!/usr/bin/env bash
# mypy --strict on the `stepline` package as it installs ([tool.mypy] in
# pyproject.toml: strict, `-p stepline`), laid out under build/typecheck/ by
# scripts/package_tree.py. Messages name the source files (engine/...), not the links.
#
# Usage: scripts/typecheck.sh [mypy args...]   (PY=... picks the interpreter)
set -euo pipefail
cd "$(dirname "$0")/.."

PY="${PY:-.venv/bin/python}"

sed_args=()
while IFS= read -r expr; do
  sed_args+=(-e "$expr")
done < <("$PY" scripts/package_tree.py build/typecheck)

"$PY" -m mypy "$@" | sed "${sed_args[@]}"
