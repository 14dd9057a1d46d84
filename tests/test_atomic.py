"""training.common.atomic: a folder is the old copy or the new one, never half of either."""

import pytest

from training.common import atomic


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
