"""The run directory: atomic writes of its files, a lock held for a run's life, and
starting afresh over an old run (``--overwrite``).

Every file of a run is written to a temporary file in the same folder, flushed to disk
and renamed over the old one, so a kill or a full disk leaves either the previous file or
the new one, never a half-written file; a failed write becomes a :class:`RunFileError`
that says what could not be written and why, and leaves no temporary behind.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import math
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

from pyrovae.errors import ConfigError, PyrovaeError

logger = logging.getLogger(__name__)

#: the lock file inside a run directory; it stays there, only the ``flock`` on it matters
LOCK_NAME = ".pyrovae.lock"
#: suffix of the temporary files that atomic writes rename into place
TMP_SUFFIX = ".tmp"
#: where ``--overwrite`` moves the old run's files before deleting them
TRASH_PREFIX = ".overwritten-"
#: the files and folders a run consists of (``--overwrite`` removes these, and only these)
RUN_FILES = ("checkpoint.pt", "checkpoint_best.pt", "checkpoints", "config.json", "metrics.csv",
             "results.json", "samples.png", "evaluation.json", "training_sessions.jsonl",
             "bounds.csv", "bounds.md", "bounds.png", "diagnostics.nc", "report.json")


class RunFileError(PyrovaeError, OSError):
    """A run file could not be written (disk full, read-only folder, missing folder...)."""


class RunLockedError(PyrovaeError):
    """Another process holds the run directory's lock."""


def describe_os_error(error: OSError) -> str:
    """``error`` in a few words: ``"no space left on device"`` rather than a traceback."""
    reason = error.strerror or str(error) or type(error).__name__
    if error.errno == errno.ENOSPC:
        reason = "no space left on device (disk full)"
    return reason[:1].lower() + reason[1:]


def write_atomically(path: str | Path, write: Callable[[IO[bytes]], None]) -> None:
    """Call ``write`` on a temporary file beside ``path``, fsync, rename it over ``path``.

    :raises RunFileError: the folder is missing or read-only, the disk is full, ... (the
        temporary file is removed, and ``path`` keeps its previous content).
    """
    path = Path(path)
    tmp_name: str | None = None
    try:
        handle, tmp_name = tempfile.mkstemp(prefix=path.name + ".", suffix=TMP_SUFFIX,
                                            dir=path.parent)
        # mkstemp makes the file private (0600): give it the mode a plain open would
        os.fchmod(handle, file_mode(path))
        with os.fdopen(handle, "wb") as tmp:
            write(tmp)
            tmp.flush()
            os.fsync(tmp.fileno())
        os.replace(tmp_name, path)
    except BaseException as error:
        if tmp_name is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp_name)
        if isinstance(error, OSError):
            raise RunFileError(f"cannot write {path}: {describe_os_error(error)}") from None
        # torch.save reports a short write as RuntimeError("... unexpected pos ...")
        if isinstance(error, RuntimeError) and "unexpected pos" in str(error):
            raise RunFileError(f"cannot write {path}: the write was cut short (disk full?)") \
                from None
        raise


def file_mode(path: Path) -> int:
    """The permission bits of ``path`` if it exists, else those a new file gets (0666 less
    the process's umask)."""
    with contextlib.suppress(OSError):
        return path.stat().st_mode & 0o7777
    umask = os.umask(0o022)
    os.umask(umask)
    return 0o666 & ~umask


def write_text(path: str | Path, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically (see :func:`write_atomically`)."""
    write_atomically(path, lambda handle: handle.write(text.encode()))


def json_safe(value: Any) -> Any:
    """``value`` with NaN and infinities (nested in dicts, lists and tuples) as ``None``:
    strict JSON has no spelling for them."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: json_safe(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(item) for item in value]
    return value


def write_json(path: str | Path, values: dict[str, Any]) -> None:
    """Write ``values`` as indented JSON to ``path`` atomically."""
    write_text(path, json.dumps(values, indent=2) + "\n")


def copy_atomically(source: str | Path, target: str | Path) -> None:
    """Copy ``source`` to ``target`` through a temporary file (see :func:`write_atomically`)."""
    def copy(handle: IO[bytes]) -> None:
        with open(source, "rb") as read:
            shutil.copyfileobj(read, handle)

    write_atomically(target, copy)


def check_writable(folder: str | Path, what: str = "the run") -> None:
    """Write and remove a small file in ``folder``, to fail before long work rather than after.

    :raises RunFileError: naming the folder and the reason.
    """
    folder = Path(folder)
    try:
        handle, name = tempfile.mkstemp(prefix=".pyrovae-write-check.", suffix=TMP_SUFFIX,
                                        dir=folder)
        try:
            os.write(handle, b"0" * 4096)
            os.fsync(handle)
        finally:
            os.close(handle)
            os.unlink(name)
    except OSError as error:
        raise RunFileError(f"cannot write {what} into {folder}: {describe_os_error(error)}") \
            from None


def remove_temporaries(run_dir: str | Path) -> list[Path]:
    """Delete the ``*.tmp`` files that killed writes left in ``run_dir`` and its
    ``checkpoints/`` folder, and the trash of an interrupted ``--overwrite``.

    Only call this while holding the run's lock (another process's write may be under way).
    :returns: the paths removed.
    """
    run_dir = Path(run_dir)
    removed = []
    for folder in (run_dir, run_dir / "checkpoints"):
        if not folder.is_dir():
            continue
        for path in folder.iterdir():
            if path.name.endswith(TMP_SUFFIX) and path.is_file():
                path.unlink(missing_ok=True)
                removed.append(path)
            elif path.name.startswith(TRASH_PREFIX) and path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
                removed.append(path)
    if removed:
        logger.info("removed %d leftover temporary files from %s", len(removed), run_dir)
    return removed


def clear_run(run_dir: str | Path, names: tuple[str, ...] = RUN_FILES) -> None:
    """Remove the run files ``names`` from ``run_dir``, leaving other files alone.

    ``checkpoint.pt`` moves first, into a trash folder inside ``run_dir``, and the trash
    is deleted last: a crash part-way leaves a folder that cannot be resumed (no
    checkpoint) and that the next ``--overwrite`` finishes clearing, never old files that
    a new run would take for its own.
    """
    run_dir = Path(run_dir)
    trash = Path(tempfile.mkdtemp(prefix=TRASH_PREFIX, dir=run_dir))
    ordered = sorted(names, key=lambda name: name != "checkpoint.pt")
    for name in ordered:
        path = run_dir / name
        if path.exists() or path.is_symlink():
            os.replace(path, trash / name)
    # this run's own trash: deleted here, not reported as another run's leftovers
    shutil.rmtree(trash, ignore_errors=True)
    remove_temporaries(run_dir)  # what a crash of an earlier clear left


class RunLock:
    """A lock on a run directory, held from :meth:`acquire` until :meth:`release` or the
    process's end (a kill -9 included: the kernel drops ``flock`` locks with the process,
    so a lock is never stale).

    Training (and ``--overwrite``) holds it exclusively; reading a run to write beside it
    (``pyrovae evaluate``, ``sample``) holds it ``shared``: many readers at once, but no
    training or overwrite while one reads, so what a reader writes belongs to the
    checkpoint it read.  The exclusive holder records its pid in the lock file, for the
    refusal message.

    Example::

        with RunLock(run_dir):
            ...  # only this process trains into run_dir
    """

    def __init__(self, run_dir: str | Path, *, shared: bool = False) -> None:
        self.run_dir = Path(run_dir)
        self.shared = shared
        self._handle: IO[str] | None = None

    def acquire(self) -> RunLock:
        """Take the lock, or refuse at once.

        :raises RunLockedError: another process holds it (with its pid), or, for an
            exclusive lock, one or more processes read the run.
        """
        import fcntl

        path = self.run_dir / LOCK_NAME
        try:
            handle = open(path, "a+")
        except OSError as error:
            if not self.shared:
                raise RunFileError(f"cannot create the lock file {path}: "
                                   f"{describe_os_error(error)}") from None
            # a run in a folder this process cannot write: read-lock its lock file where
            # there is one; where there is none, no process trains there
            try:
                handle = open(path)
            except OSError:
                return self
        try:
            fcntl.flock(handle, (fcntl.LOCK_SH if self.shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
        except OSError:
            handle.seek(0)
            holder = handle.read().strip() or "unknown"
            readers = not self.shared and _only_readers(handle)
            handle.close()
            if readers:
                raise RunLockedError(
                    f"{self.run_dir} is being read by pyrovae evaluate or sample; wait for it "
                    f"to finish or stop it, or choose another --out-dir") from None
            if self.shared:
                raise RunLockedError(
                    f"{self.run_dir} is being trained by another pyrovae process (pid "
                    f"{holder}); wait for it to finish, or copy its checkpoint.pt elsewhere "
                    f"and use the copy") from None
            raise RunLockedError(
                f"{self.run_dir} is in use by another pyrovae process (pid {holder}); wait for "
                f"it to finish or stop it, or choose another --out-dir") from None
        if not self.shared:
            handle.seek(0)
            handle.truncate()
            handle.write(f"{os.getpid()}\n")
            handle.flush()
        self._handle = handle
        return self

    def release(self) -> None:
        if self._handle is not None:
            self._handle.close()  # closing drops the flock
            self._handle = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def _only_readers(handle: IO[str]) -> bool:
    """Whether the lock on ``handle``'s file is held shared (by readers) only."""
    import fcntl

    try:
        fcntl.flock(handle, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError:
        return False
    fcntl.flock(handle, fcntl.LOCK_UN)
    return True


def make_run_dir(path: str | Path) -> Path:
    """Create ``path`` (and its parents) as a run directory, or say in one line why not.

    :raises ConfigError: ``path`` or a parent is a file, or the name is too long.
    :raises RunFileError: no permission, read-only file system, ...
    """
    path = Path(path)
    check_run_dir_path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise ConfigError(f"cannot create --out-dir {path}: a part of it is a file") from None
    except OSError as error:
        if error.errno in (errno.ENAMETOOLONG, errno.ENOTDIR):
            raise ConfigError(f"cannot create --out-dir {_short(path)}: "
                              f"{describe_os_error(error)}") from None
        raise RunFileError(f"cannot create --out-dir {path}: {describe_os_error(error)}") \
            from None
    return path


def check_run_dir_path(path: str | Path) -> None:
    """Refuse a run directory path that is a file, lies under a file, or is too long.

    :raises ConfigError: one line naming the path and the problem.
    """
    path = Path(path)
    try:
        is_file = path.exists() and not path.is_dir()
    except OSError as error:  # a name too long, a component that is a file
        raise ConfigError(f"--out-dir {_short(path)} is unusable: {describe_os_error(error)}") \
            from None
    if is_file:
        raise ConfigError(f"--out-dir {path} is a file, not a folder; choose another --out-dir")


def _short(path: Path) -> str:
    text = str(path)
    return text if len(text) <= 100 else text[:60] + "..." + text[-30:]


@contextlib.contextmanager
def locked(run_dir: str | Path) -> Iterator[RunLock]:
    """``with locked(run_dir):`` hold :class:`RunLock` for the block."""
    lock = RunLock(run_dir).acquire()
    try:
        yield lock
    finally:
        lock.release()
