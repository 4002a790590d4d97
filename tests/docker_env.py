"""What the container tests need: a Docker engine and scripts/images.sh's images.

`require_images()` returns the image names (DEBIAN_IMAGE, KAFKA_IMAGE,
STEPLINE_IMAGE) once the engine answers and every image exists; otherwise it
skips the test with the reason, or under CI=true fails it (`make test` builds
them first with `scripts/images.sh build`). Called in test bodies, not
fixtures, so a missing engine is a test failure in CI, not a setup error.
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


def require_images() -> dict[str, str]:
    done = subprocess.run([str(IMAGES_SH), "check"], capture_output=True, text=True, timeout=60, check=False)
    if done.returncode != 0:
        unavailable(done.stdout.strip() or done.stderr.strip())
    return image_names()


def docker(*args: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run the docker client; on failure the error shows its output."""
    done = subprocess.run(["docker", *args], capture_output=True, text=True, timeout=timeout, check=False)
    if check and done.returncode != 0:
        raise AssertionError(f"docker {' '.join(args)} exited {done.returncode}:\n{done.stdout}\n{done.stderr}")
    return done
