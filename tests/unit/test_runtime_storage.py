"""Storage safety of dicp_ray.runtime.write_text_atomic: a failed write never replaces the old file."""
import errno
import os
import stat

import pytest

from dicp_ray.runtime import write_text_atomic


def test_atomic_write_permissions_and_no_leftovers(tmp_path):
    old = os.umask(0o022)
    try:
        write_text_atomic(tmp_path / "a.json", "{}")
    finally:
        os.umask(old)
    assert (tmp_path / "a.json").read_text() == "{}"
    assert stat.S_IMODE((tmp_path / "a.json").stat().st_mode) == 0o644
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json"]


def test_disk_full_keeps_the_old_file(tmp_path, monkeypatch):
    target = tmp_path / "summary.json"
    write_text_atomic(target, "old")

    def full_disk(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full_disk)  # the kernel reports ENOSPC when the data is flushed
    with pytest.raises(OSError, match="No space left"):
        write_text_atomic(target, "new" * 1000)
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["summary.json"]  # no temp file left behind
