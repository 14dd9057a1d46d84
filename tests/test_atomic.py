"""uniref_core.atomic: a folder is the old copy or the new one, never half of either."""

import pytest

from uniref_core import atomic


def test_a_finished_write_replaces_the_old_copy_and_a_stale_tmp_is_cleared_first(tmp_path):
    final = tmp_path / "model"
    final.mkdir()
    (final / "old.txt").write_text("old")
    stale = atomic.tmp_path(final)
    stale.mkdir()
    (stale / "stale.txt").write_text("left by a crash")
    with atomic.atomic_dir(final) as tmp:
        assert tmp == stale and not tmp.exists()  # the caller creates it
        tmp.mkdir()
        (tmp / "new.txt").write_text("new")
        assert (final / "old.txt").is_file()  # untouched until the write is done
    assert [p.name for p in final.iterdir()] == ["new.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["model"]  # no .tmp, no .old left


def test_a_failed_write_leaves_the_old_copy_and_no_tmp(tmp_path):
    final = tmp_path / "model"
    final.mkdir()
    (final / "old.txt").write_text("old")
    with pytest.raises(RuntimeError, match="disk full"):
        with atomic.atomic_dir(final) as tmp:
            tmp.mkdir()
            (tmp / "half.txt").write_text("half")
            raise RuntimeError("disk full")
    assert [p.name for p in final.iterdir()] == ["old.txt"]
    assert not tmp.exists()


def test_a_full_disk_at_the_rename_puts_the_old_copy_back(tmp_path, monkeypatch):
    final = tmp_path / "model"
    final.mkdir()
    (final / "old.txt").write_text("old")
    real_replace = atomic.os.replace

    def replace(src, dst):
        if str(src).endswith(".tmp"):  # the old copy is renamed away, then the new one cannot take its place
            raise OSError(28, "No space left on device")
        real_replace(src, dst)

    monkeypatch.setattr(atomic.os, "replace", replace)
    with pytest.raises(OSError, match="No space left"):
        with atomic.atomic_dir(final) as tmp:
            tmp.mkdir()
            (tmp / "new.txt").write_text("new")
    assert (final / "old.txt").read_text() == "old"
    error = atomic.write_error(OSError(28, "No space left on device"), "the export", tmp_path, "then run it again")
    assert (
        str(error) == f"the export could not be written: the disk holding {tmp_path} is full (No space left on "
        "device); free space there, then run it again"
    )
