"""core/confined.py: folders and files that stay inside their root, symlinks included."""

from __future__ import annotations

import os
import stat

import pytest

from balsam_grpc.core.confined import PathEscape, open_dir_inside, open_private, write_private


def _mode(path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


def test_open_dir_inside_creates_every_level_owner_only(tmp_path):
    root = tmp_path / "data"
    root.mkdir()
    fd, path = open_dir_inside(str(root / "app" / "job1"), str(root))
    try:
        assert path == str(root / "app" / "job1")
        assert os.path.samestat(os.fstat(fd), os.stat(path))
        assert _mode(root / "app") == 0o700 and _mode(root / "app" / "job1") == 0o700
        write_private("job.out", b"x", dir_fd=fd)
    finally:
        os.close(fd)
    assert (root / "app" / "job1" / "job.out").read_bytes() == b"x"
    assert _mode(root / "app" / "job1" / "job.out") == 0o600
    fd, _ = open_dir_inside(str(root / "app" / "job1") + "/", str(root) + "/")  # exists already; slashes
    os.close(fd)


def test_open_dir_inside_refuses_a_symlink_out_of_the_root(tmp_path):
    root, outside = tmp_path / "data", tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    (root / "escape").symlink_to(outside, target_is_directory=True)
    with pytest.raises(PathEscape):
        open_dir_inside(str(root / "escape" / "job1"), str(root))
    with pytest.raises(PathEscape):
        open_dir_inside(str(root / "escape"), str(root))
    assert not (outside / "job1").exists()


def test_open_dir_inside_refuses_dot_dot_out_of_the_root_and_the_root_itself(tmp_path):
    root = tmp_path / "data"
    root.mkdir()
    with pytest.raises(PathEscape):
        open_dir_inside(str(root / ".." / "elsewhere"), str(root))
    assert not (tmp_path / "elsewhere").exists()
    with pytest.raises(PathEscape):
        open_dir_inside(str(root), str(root))
    with pytest.raises(PathEscape):
        open_dir_inside(str(tmp_path / "other" / "job"), str(root))
    assert not (tmp_path / "other").exists()


def test_open_dir_inside_follows_a_symlink_that_stays_inside(tmp_path):
    root = tmp_path / "data"
    (root / "real").mkdir(parents=True)
    (root / "alias").symlink_to(root / "real", target_is_directory=True)
    fd, path = open_dir_inside(str(root / "alias" / "job1"), str(root))
    os.close(fd)
    assert (root / "real" / "job1").is_dir()
    assert path == str(root / "real" / "job1")


def test_open_dir_inside_refuses_a_file_on_the_way(tmp_path):
    root = tmp_path / "data"
    root.mkdir()
    (root / "afile").write_text("x")
    with pytest.raises((PathEscape, OSError)):
        open_dir_inside(str(root / "afile" / "job1"), str(root))
    with pytest.raises(PathEscape):
        open_dir_inside(str(root / "afile"), str(root))


def test_open_private_in_a_folder_refuses_a_symlinked_file(tmp_path):
    target = tmp_path / "target"
    target.write_text("keep")
    (tmp_path / "job.out").symlink_to(target)
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        with pytest.raises(PathEscape):
            open_private("job.out", append=True, dir_fd=fd)
    finally:
        os.close(fd)
    assert target.read_text() == "keep"


def test_open_private_sets_an_existing_file_owner_only(tmp_path):
    path = tmp_path / "f"
    path.write_text("x")
    path.chmod(0o644)
    os.close(open_private(path, append=True))
    assert _mode(path) == 0o600
