"""What the container tests need: a Docker engine and scripts/images.sh's images.

`require_images()` runs `scripts/images.sh build` once per test session (a
second of checks when `make test` has just built them; a rebuild of what a
changed source made stale, so the containers run the code under test) and
returns the image names (DEBIAN_IMAGE, KAFKA_IMAGE, STEPLINE_IMAGE). When the
engine or an image cannot be had it skips the test with the reason, or under
CI=true fails it. Called in test bodies, not fixtures, so a missing engine
is a test failure in CI, not a setup error.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCKER_SH = ROOT / "scripts" / "docker.sh"
IMAGES_SH = ROOT / "scripts" / "images.sh"
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def image_names() -> dict[str, str]:
    """DEBIAN_IMAGE, KAFKA_IMAGE, STEPLINE_IMAGE as scripts/images.sh names them."""
    done = subprocess.run([str(IMAGES_SH), "names"], capture_output=True, text=True, timeout=30, check=True)
    return dict(line.split("=", 1) for line in done.stdout.split())


def unavailable(reason: str) -> None:
    if IN_CI:
        pytest.fail(f"CI=true needs Docker and the project's images: {reason}", pytrace=False)
    pytest.skip(f"{reason} (a failure under CI=true)")


_built: list[str] = []  # the outcome of this session's build: "" when it worked, else why not


def require_images() -> dict[str, str]:
    if not _built:
        done = subprocess.run([str(IMAGES_SH), "build"], capture_output=True, text=True, timeout=1200, check=False)
        _built.append("" if done.returncode == 0 else "\n".join(done.stderr.strip().splitlines()[-20:]))
    if _built[0]:
        unavailable(f"scripts/images.sh build failed:\n{_built[0]}")
    return image_names()


def docker(*args: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run the docker client; on failure the error shows its output."""
    done = subprocess.run(["docker", *args], capture_output=True, text=True, timeout=timeout, check=False)
    if check and done.returncode != 0:
        raise AssertionError(f"docker {' '.join(args)} exited {done.returncode}:\n{done.stdout}\n{done.stderr}")
    return done
