"""File cleaner: globs delete inside the workdir only."""

from __future__ import annotations

import os

import pytest

from balsam_grpc.core.errors import InvalidArgument
from balsam_grpc.site.cleaner import clean_workdir, job_workdir, plan_cleanup


@pytest.fixture
def tree(tmp_path):
    data = tmp_path / "data"
    wd = data / "runs" / "j1"
    (wd / "scratch").mkdir(parents=True)
    for name in ("a.tmp", "b.tmp", "keep.h5", "scratch/x.dat", "scratch/y.dat"):
        (wd / name).write_text("x")
    outside = tmp_path / "precious"
    outside.mkdir()
    (outside / "p.tmp").write_text("keep me")
    os.symlink(outside, wd / "link")
    os.symlink(outside / "p.tmp", wd / "filelink.tmp")
    return data, wd, outside


def test_globs_delete_inside_workdir(tree):
    data, wd, outside = tree
    removed, errors = clean_workdir(wd, ["*.tmp", "scratch"])
    assert errors == []
    assert removed == 5  # a.tmp, b.tmp, the filelink.tmp symlink itself, scratch/x.dat, scratch/y.dat
    assert sorted(p.name for p in wd.iterdir()) == ["keep.h5", "link"]
    assert (outside / "p.tmp").read_text() == "keep me"  # the symlink went, not its target


def test_escaping_globs_are_refused(tree):
    data, wd, outside = tree
    plan = plan_cleanup(wd, ["../*", "/etc/*", "link/*", ""])
    assert plan.targets == []
    assert len(plan.refused) == 4
    removed, errors = clean_workdir(wd, ["link/*", "../../*"])
    assert removed == 0 and len(errors) == 2
    assert (outside / "p.tmp").exists() and (data / "runs" / "j1" / "keep.h5").exists()


def test_workdir_must_stay_in_the_data_folder(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    assert job_workdir(data, "a/b") == (data / "a" / "b").resolve()
    for bad in ("../x", "/etc", "", "a/../.."):
        with pytest.raises(InvalidArgument):
            job_workdir(data, bad)


def test_missing_workdir_is_nothing_to_do(tmp_path):
    assert clean_workdir(tmp_path / "nope", ["*"]) == (0, [])
