"""The documentation cannot drift: the tutorial's marked command blocks run, in order,
against a real server process, and the contract reference matches the protos."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

from tests.support.server_fork import shared_forker
from tests.support.server_proc import REPO, ServerProcess

TUTORIAL = REPO / "docs" / "tutorial.md"
# A block the test runs: `<!-- tutorial -->` on the line before a ```bash fence.
MARKED = re.compile(r"<!-- tutorial -->\n```bash\n(.*?)\n```", re.DOTALL)


def tutorial_blocks() -> list[str]:
    return MARKED.findall(TUTORIAL.read_text())


def test_tutorial_commands_run_against_a_server(tmp_path: Path, cli_forker: Any) -> None:
    """Each `balsamctl` of the blocks is the CLI forked from a process that has imported
    it (tests/support/cli_fork.py: a shim first on PATH), its stdin, stdout, stderr,
    environment and folder the shell's; everything else runs as a user's shell runs it."""
    blocks = tutorial_blocks()
    assert len(blocks) >= 8, "the tutorial lost its marked blocks"
    server = ServerProcess(tmp_path / "home", f"sqlite:///{tmp_path / 'balsam.db'}",
                           extra_env={"NO_COLOR": "1", "COLUMNS": "160"}, forker=shared_forker())
    server.start()
    try:
        shims = cli_forker.shim(tmp_path / "bin", str(Path(sys.executable).with_name("balsamctl"))).parent
        env = {**server.env,
               "PATH": os.pathsep.join([str(shims), str(Path(sys.executable).parent), server.env.get("PATH", "")])}
        work = tmp_path / "work"
        work.mkdir()
        for number, block in enumerate(blocks, start=1):
            done = subprocess.run(["bash", "-euo", "pipefail", "-c", block], cwd=work, env=env, capture_output=True,
                                  text=True, timeout=300)
            assert done.returncode == 0, (f"tutorial block {number} failed (exit {done.returncode}):\n{block}\n"
                                          f"--- stdout\n{done.stdout}\n--- stderr\n{done.stderr}")
            if "sorted({j[\"state\"]" in block:
                assert "['PREPROCESSED']" in done.stdout, done.stdout  # bare state names in JSON
            if "--parent" in block:
                assert "AWAITING_PARENTS" in done.stdout, done.stdout
            if "App.objects.get" in block:
                assert "3 jobs created" in done.stdout, done.stdout
    finally:
        server.stop()


def test_contract_reference_matches_the_protos() -> None:
    done = subprocess.run([sys.executable, str(REPO / "scripts" / "gen_contract_docs.py"), "--check"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr


def test_readme_points_only_inside_the_repository() -> None:
    readme = (REPO / "README.md").read_text()
    assert "../" not in readme
    for link in re.findall(r"\]\(([^)]+)\)", readme):
        if not link.startswith(("http://", "https://", "#")):
            assert (REPO / link.split("#")[0]).exists(), link
