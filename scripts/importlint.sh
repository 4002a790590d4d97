#!/usr/bin/env bash
# import-linter's contracts ([tool.importlinter] in pyproject.toml: the layers
# of docs/architecture.md) on the `stepline` package as it installs, laid out
# under build/importlint/ by scripts/package_tree.py, so grimp reads every
# folder of the package (it does not follow package-dir). Fails on a broken contract.
#
# Usage: scripts/importlint.sh   (PY=... picks the interpreter)
set -euo pipefail
cd "$(dirname "$0")/.."

PY="${PY:-.venv/bin/python}"
"$PY" scripts/package_tree.py build/importlint > /dev/null
PYTHONPATH="$PWD/build/importlint" "$(dirname "$PY")/lint-imports" --no-cache
