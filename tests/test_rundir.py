"""The run directory: atomic writes that fail in one line, the lock, clearing an old run."""

from __future__ import annotations

import errno
import os
import subprocess
import sys

import pytest

from pyrovae.errors import ConfigError
from pyrovae.rundir import (
    LOCK_NAME,
    RunFileError,
    RunLock,
    RunLockedError,
    check_writable,
    clear_run,
    make_run_dir,
    remove_temporaries,
    write_json,
    write_text,
)


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path, monkeypatch):
    path = tmp_path / "results.json"
    write_json(path, {"a": 1})

    def disk_full(fd, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", lambda fd: disk_full(fd, b""))
    with pytest.raises(RunFileError, match="cannot write .*results.json: no space left on "
                                           "device \\(disk full\\)"):
        write_json(path, {"a": 2})
    monkeypatch.undo()
    assert path.read_text() == '{\n  "a": 1\n}\n'
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_read_only_folder_is_named_before_any_work(tmp_path):
    tmp_path.chmod(0o500)
    try:
        with pytest.raises(RunFileError, match="cannot write the run into"):
            check_writable(tmp_path)
        with pytest.raises(RunFileError, match="permission denied"):
            write_text(tmp_path / "x.txt", "x")
    finally:
        tmp_path.chmod(0o700)


def test_make_run_dir_refuses_a_file_and_a_name_too_long(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match="is a file, not a folder"):
        make_run_dir(tmp_path / "file")
    with pytest.raises(ConfigError, match="a part of it is a file|not a directory"):
        make_run_dir(tmp_path / "file" / "run")
    with pytest.raises(ConfigError, match="unusable: file name too long"):
        make_run_dir(tmp_path / ("x" * 300))


def test_the_lock_refuses_a_second_holder_and_is_released(tmp_path):
    with RunLock(tmp_path):
        with pytest.raises(RunLockedError, match=f"in use by another pyrovae process "
                                                 f"\\(pid {os.getpid()}\\)"):
            RunLock(tmp_path).acquire()
    RunLock(tmp_path).acquire().release()  # free again


def test_a_lock_held_by_another_process_is_refused_and_dies_with_it(tmp_path):
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from pyrovae.rundir import RunLock; "
         f"lock = RunLock({str(tmp_path)!r}).acquire(); print('held', flush=True); time.sleep(60)"],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(RunLockedError, match=f"pid {holder.pid}"):
            RunLock(tmp_path).acquire()
    finally:
        holder.kill()  # as kill -9: no cleanup runs, and the lock is not stale
        holder.wait()
        holder.stdout.close()
    RunLock(tmp_path).acquire().release()


def test_clear_run_removes_run_files_only_and_temporaries(tmp_path):
    for name in ("checkpoint.pt", "checkpoint_best.pt", "metrics.csv", "config.json",
                 "checkpoint.pt.abc123.tmp", "notes.txt"):
        (tmp_path / name).write_text(name)
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "epoch-0001.pt").write_text("old")
    clear_run(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


def test_remove_temporaries_takes_orphans_and_overwrite_trash(tmp_path):
    (tmp_path / "checkpoints").mkdir()
    orphans = [tmp_path / "checkpoint.pt.x1.tmp", tmp_path / "checkpoints" / "epoch-0002.pt.y.tmp"]
    for path in orphans:
        path.write_bytes(b"partial")
    (tmp_path / ".overwritten-abc").mkdir()
    (tmp_path / "checkpoint.pt").write_bytes(b"keep")
    (tmp_path / LOCK_NAME).write_text("1")
    assert sorted(remove_temporaries(tmp_path)) == sorted([*orphans, tmp_path / ".overwritten-abc"])
    assert sorted(p.name for p in tmp_path.iterdir()) == [LOCK_NAME, "checkpoint.pt",
                                                          "checkpoints"]


def test_clearing_a_run_reports_no_leftovers_of_its_own(tmp_path, caplog):
    from pyrovae.rundir import clear_run

    (tmp_path / "checkpoint.pt").write_text("old")
    with caplog.at_level("INFO", logger="pyrovae"):
        clear_run(tmp_path)
    assert "leftover" not in caplog.text
    assert sorted(path.name for path in tmp_path.iterdir()) == []


def test_readers_share_the_lock_and_keep_training_and_overwrite_out(tmp_path):
    with RunLock(tmp_path, shared=True), RunLock(tmp_path, shared=True):
        with pytest.raises(RunLockedError, match="is being read by pyrovae evaluate or sample"):
            RunLock(tmp_path).acquire()
    with RunLock(tmp_path):
        with pytest.raises(RunLockedError, match=f"is being trained by another pyrovae process "
                                                 f"\\(pid {os.getpid()}\\)"):
            RunLock(tmp_path, shared=True).acquire()
    RunLock(tmp_path).acquire().release()  # free again


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_reader_of_a_read_only_run_needs_no_lock_file(tmp_path):
    tmp_path.chmod(0o500)
    try:
        RunLock(tmp_path, shared=True).acquire().release()
        with pytest.raises(RunFileError, match="cannot create the lock file"):
            RunLock(tmp_path).acquire()
    finally:
        tmp_path.chmod(0o700)


def test_written_files_get_the_mode_of_a_plain_open_or_keep_their_own(tmp_path):
    umask = os.umask(0o022)
    try:
        write_text(tmp_path / "new.txt", "x")
        assert (tmp_path / "new.txt").stat().st_mode & 0o777 == 0o644
        (tmp_path / "mine.txt").write_text("y")
        (tmp_path / "mine.txt").chmod(0o640)
        write_text(tmp_path / "mine.txt", "z")
        assert (tmp_path / "mine.txt").stat().st_mode & 0o777 == 0o640
    finally:
        os.umask(umask)
