"""services.jobs._plain_workdir, the create path's shortcut around clean_workdir: every
workdir it lets through is one clean_workdir accepts and returns unchanged (checked over
all short strings of the characters that matter)."""

from __future__ import annotations

import itertools

from balsam_grpc.core.validation import MAX_WORKDIR, clean_workdir
from balsam_grpc.server.services.jobs import _plain_workdir


def test_a_plain_workdir_is_its_own_clean_form() -> None:
    passed = 0
    for n in range(1, 6):
        for chars in itertools.product("ab/.~ \x00\t\x1b\u202e", repeat=n):
            workdir = "".join(chars)
            if _plain_workdir(workdir):
                passed += 1
                assert clean_workdir(workdir) == workdir, repr(workdir)
    assert passed > 1000
    assert _plain_workdir("runs/2026/x-1") and not _plain_workdir("runs/x.h5") and not _plain_workdir("a" * 1025)
    assert _plain_workdir("a" * MAX_WORKDIR)
