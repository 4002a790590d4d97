"""The API reference under docs/api/ is generated from the code and kept current.

scripts/apidoc.py writes it (`make apidoc`); these tests fail when the
committed files differ from what the code would generate, when a public
name is missing from them, or when the output depends on the run.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "apidoc.py"


@pytest.fixture(scope="module")
def apidoc() -> ModuleType:
    spec = importlib.util.spec_from_file_location("apidoc", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_committed_api_reference_matches_the_code(apidoc: ModuleType) -> None:
    stale = apidoc.stale()
    assert not stale, f"the generated docs are stale, run make apidoc: {', '.join(stale)}"


def test_every_public_name_has_a_section(apidoc: ModuleType) -> None:
    files = apidoc.render_api()
    for module, _ in apidoc._modules():
        page = files[f"{module.__name__}.md"]
        for name in module.__all__:
            assert f"\n### `{name}`\n" in page, f"{module.__name__}.{name} is missing from docs/api"
        assert f"]({module.__name__}.md)" in files["README.md"], f"the index does not link {module.__name__}"


def test_the_required_modules_are_documented(apidoc: ModuleType) -> None:
    documented = {m.__name__ for m, _ in apidoc._modules()}
    assert {"stepline", "stepline.testing", "stepline.settings"} <= documented


def test_the_index_links_resolve_to_headings(apidoc: ModuleType) -> None:
    files = apidoc.render_api()
    for link in [part for line in files["README.md"].splitlines() for part in line.split(", ")
                 if part.startswith("[`") and "#" in part]:
        target = link[link.index("](") + 2:-1]
        page, anchor = target.split("#")
        seen: dict[str, int] = {}
        anchors = [apidoc._anchor(line.lstrip("#").strip(), seen) for line in files[page].splitlines()
                   if line.startswith("#")]
        assert anchor in anchors, f"{link} points at no heading of {page}"


def test_the_output_does_not_depend_on_hash_seed_or_directory(tmp_path: Path) -> None:
    """`--check` in fresh interpreters with other hash seeds, from another directory."""
    for seed in ("1", "4242"):
        env = dict(os.environ, PYTHONHASHSEED=seed)
        proc = subprocess.run([sys.executable, str(SCRIPT), "--check"], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, f"PYTHONHASHSEED={seed}: {proc.stderr.strip()}"


def test_check_names_the_fix_when_a_file_is_stale(apidoc: ModuleType, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    api = tmp_path / "api"
    api.mkdir()
    for name, text in apidoc.render_api().items():
        (api / name).write_text(text, encoding="utf-8")
    config = tmp_path / "configuration.md"
    config.write_text((ROOT / "docs" / "configuration.md").read_text(encoding="utf-8"), encoding="utf-8")
    monkeypatch.setattr(apidoc, "API_DIR", api)
    monkeypatch.setattr(apidoc, "CONFIG_DOC", config)
    monkeypatch.setattr(apidoc, "ROOT", tmp_path)
    assert apidoc.main(["--check"]) == 0
    page = api / "stepline.md"
    page.write_text(page.read_text(encoding="utf-8").replace("### `Client`", "### `Klient`"), encoding="utf-8")
    (api / "stepline.gone.md").write_text("a module no longer documented\n", encoding="utf-8")
    assert apidoc.stale() == ["api/stepline.gone.md", "api/stepline.md"]
    capsys.readouterr()
    assert apidoc.main(["--check"]) == 1
    assert "run make apidoc" in capsys.readouterr().err
    assert apidoc.main([]) == 0  # writes
    assert apidoc.stale() == []
    assert not (api / "stepline.gone.md").exists()
