"""The project's wheel, built once per run for the install tests of this folder."""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.server_proc import REPO


def dir_mb(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and not f.is_symlink()) / 1e6


@pytest.fixture(scope="session")
def project_wheel(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """balsam-grpc's wheel from this checkout, built with the dev venv's setuptools (no
    build isolation: nothing to download for the build)."""
    dist = tmp_path_factory.mktemp("dist")
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                            "-w", str(dist), str(REPO)], capture_output=True, text=True, cwd=dist)
    assert built.returncode == 0, f"pip wheel {REPO} failed:\n{built.stdout[-3000:]}{built.stderr[-3000:]}"
    try:
        yield next(dist.glob("balsam_grpc-*.whl"))
    finally:
        shutil.rmtree(dist, ignore_errors=True)
