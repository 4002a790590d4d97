"""The installed package, as users get it from `pip install .` and `pip install -e .`.

pyproject.toml maps four source folders (engine/, schemas/, projections/,
consumers/) onto one import namespace, `stepline`. These tests install the
project into fresh virtualenvs and import it from a directory outside the
repository, so the source tree is not on sys.path and only what pip
installed can be imported.

How the venvs stay fast and offline: each one is created without pip and
sees the dev venv's site-packages through a `.pth` file, so the runtime
dependencies (fastavro, pydantic, typer, ...) and the build backend
(setuptools, wheel) come from there. Stepline itself is installed with the
dev venv's pip (`pip --python <venv>`), `--no-deps --no-build-isolation`
and `--check-build-dependencies` (the backend in the dev venv must satisfy
[build-system].requires; `make setup` upgrades it). The build runs in a
copy of the source tree so no build/ or *.egg-info lands in the checkout.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import textwrap
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
GENERIC_NAMES = ["engine", "schemas", "projections", "consumers"]
SUBPACKAGES = ["stepline.schemas", "stepline.projections", "stepline.consumers", "stepline.log"]

# Run inside each venv; prints what the tests assert on as JSON.
PROBE = textwrap.dedent(
    """
    import importlib, importlib.resources, importlib.util, json, sys, sysconfig

    import stepline
    for name in %(subpackages)r:
        importlib.import_module(name)

    schemas = importlib.resources.files("stepline.schemas")
    event = json.loads(schemas.joinpath("Event.avsc").read_text(encoding="utf-8"))
    history = sorted(p.name for p in schemas.joinpath("history").iterdir() if p.name.endswith(".avsc"))
    print(json.dumps({
        "stepline_file": stepline.__file__,
        "purelib": sysconfig.get_paths()["purelib"],
        "event_schema_name": event.get("name"),
        "history_schemas": history,
        "generic_importable": [n for n in %(generic)r if importlib.util.find_spec(n) is not None],
    }))
    """
) % {"subpackages": SUBPACKAGES, "generic": GENERIC_NAMES}

IGNORED = shutil.ignore_patterns(
    ".git", ".venv", "venv", "build", "dist", "*.egg-info", "__pycache__",
    ".pytest_cache", ".hypothesis", ".stepline", ".kafka", "node_modules", "*.jsonl",
)


def _run(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "PIP_REQUIRE_VIRTUALENV")}
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, (
        f"{' '.join(map(str, cmd))} exited {proc.returncode}\n"
        f"--- stdout ---\n{proc.stdout}\n--- stderr ---\n{proc.stderr}"
    )
    return proc


def _install(tmp_path: Path, *, editable: bool) -> tuple[Path, dict]:
    """Copy the source tree, install it into a fresh venv, and probe the venv from outside the repo."""
    for backend in ("setuptools", "wheel"):
        if importlib.util.find_spec(backend) is None:
            pytest.fail(f"{backend} is not installed in the dev venv; run `make setup`")

    src = tmp_path / "src"
    shutil.copytree(REPO, src, ignore=IGNORED)

    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)], cwd=tmp_path)
    python = venv / "bin" / "python"
    purelib = Path(
        _run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], cwd=tmp_path).stdout.strip()
    )
    # The dev venv's site-packages, appended after the new venv's own.
    (purelib / "_stepline_test_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")

    target = ["-e", str(src)] if editable else [str(src)]
    _run(
        [
            sys.executable, "-m", "pip", "--python", str(python), "install", "--quiet",
            "--no-deps", "--no-build-isolation", "--check-build-dependencies", *target,
        ],
        cwd=tmp_path,
    )

    outside = tmp_path / "elsewhere"
    outside.mkdir()
    # -I: ignore PYTHONPATH and the user site, and do not put the cwd on sys.path.
    probe = json.loads(_run([str(python), "-I", "-c", PROBE], cwd=outside).stdout)
    assert Path(probe["purelib"]) == purelib
    return venv, probe


def _assert_console_script_works(venv: Path, cwd: Path) -> None:
    script = venv / "bin" / "stepline"
    assert script.is_file(), f"no `stepline` console script in {script.parent}"
    proc = _run([str(script), "--help"], cwd=cwd)
    assert "Usage" in proc.stdout


def test_wheel_install_imports_all_four_packages_from_site_packages(tmp_path: Path) -> None:
    venv, probe = _install(tmp_path, editable=False)

    stepline_file = Path(probe["stepline_file"])
    assert stepline_file.is_relative_to(Path(probe["purelib"]) / "stepline"), stepline_file
    assert probe["event_schema_name"] == "Event"
    assert probe["history_schemas"], "history/*.avsc is missing from the wheel"
    assert probe["generic_importable"] == [], "generic top-level modules leaked into site-packages"
    leaked = [n for n in GENERIC_NAMES if (Path(probe["purelib"]) / n).exists()]
    assert leaked == [], f"wheel installed generic top-level folders: {leaked}"
    _assert_console_script_works(venv, tmp_path / "elsewhere")


def test_editable_install_imports_all_four_packages_from_the_source_folders(tmp_path: Path) -> None:
    venv, probe = _install(tmp_path, editable=True)

    stepline_file = Path(probe["stepline_file"])
    assert stepline_file == tmp_path / "src" / "engine" / "__init__.py", stepline_file
    assert probe["event_schema_name"] == "Event"
    assert probe["history_schemas"], "history/*.avsc is not reachable through the editable install"
    assert probe["generic_importable"] == [], "editable install exposes generic top-level modules"
    _assert_console_script_works(venv, tmp_path / "elsewhere")


def test_the_wheel_builds_without_warnings_and_carries_license_version_and_data(tmp_path: Path) -> None:
    """What `pip wheel .` makes: no setuptools warning (data folders are
    packages, the license is an SPDX expression), the LICENSE file, the
    version of engine/version.py, the dashboard's files and the old schemas."""
    src = tmp_path / "src"
    shutil.copytree(REPO, src, ignore=IGNORED)
    out = tmp_path / "wheel"
    proc = _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                 "--check-build-dependencies", str(src), "-w", str(out)], cwd=tmp_path)
    said = proc.stdout + proc.stderr
    assert "Warning" not in said and "deprecated" not in said, said
    (wheel,) = out.glob("stepline-*.whl")
    version = re.search(r'__version__ = "([^"]+)"', (REPO / "engine" / "version.py").read_text())
    assert version is not None
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        metadata = zf.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    assert f"\nVersion: {version.group(1)}\n" in metadata
    assert "\nLicense-Expression: Apache-2.0\n" in metadata
    assert "\nProvides-Extra: testing\n" in metadata
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names), names
    for js in (REPO / "engine" / "server" / "dashboard" / "static").iterdir():
        assert f"stepline/server/dashboard/static/{js.name}" in names
    for avsc in (REPO / "schemas" / "history").glob("*.avsc"):
        assert f"stepline/schemas/history/{avsc.name}" in names
