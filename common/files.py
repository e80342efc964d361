"""Files written so that no reader ever sees half of one: atomic writes, JSON records, per-file locks, checks on
output directories before anything is written, and file hashes. Plain standard library: no torch."""

from __future__ import annotations

import errno
import glob
import gzip
import hashlib
import json
import os
import secrets
import shutil
from collections.abc import Callable
from pathlib import Path
from types import TracebackType

from common.errors import ConfigError, UserError

try:
    import fcntl
except ImportError:  # Windows: no flock; locking is skipped (see FileLock)
    fcntl = None

TEMP_SUFFIX = ".tmp"
# errors that mean "this directory cannot take the file", as opposed to a bug in the caller
_NO_ROOM = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOTDIR)


class OutputDirError(UserError, OSError):
    """An output directory is unwritable or too full; the message names it, the bytes needed and the fix."""


def file_hash(path: Path, algorithm: str = "md5", *, decompress: bool = False) -> str:
    """Hex digest of a file's bytes (of its decompressed bytes if ``decompress``), read in chunks."""
    digest = hashlib.new(algorithm)
    opener = gzip.open if decompress else open
    with opener(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def temporary_name(path: Path) -> Path:
    """A fresh temporary name beside ``path`` (pid and random suffix: concurrent writers never share one)."""
    return path.with_name(f"{path.name}.{os.getpid()}.{secrets.token_hex(4)}{TEMP_SUFFIX}")


def remove_temporaries(path: Path) -> None:
    """Delete temporary files left beside ``path`` by killed writers (call only while no one writes it)."""
    for tmp in path.parent.glob(f"{glob.escape(path.name)}.*{TEMP_SUFFIX}"):
        tmp.unlink(missing_ok=True)


def write_bytes_atomic(path: Path, data: bytes) -> None:
    """Write to a temporary name, fsync, then rename: a reader never sees half a file, and a failed write
    leaves nothing behind (a SIGKILL leaves only the temporary, which no reader opens)."""
    tmp = temporary_name(path)
    try:
        with open(tmp, "xb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        tmp.unlink(missing_ok=True)
        if isinstance(err, OSError) and err.errno in _NO_ROOM:
            raise OutputDirError(err.errno, f"could not write {path} ({len(data):,} bytes): {err.strerror}. "
                                 "Free space or fix the permissions there, or write to another directory") from err
        raise


def write_json_atomic(path: Path, obj: dict) -> None:
    """``obj`` as indented, key-sorted JSON, written atomically (:func:`write_bytes_atomic`)."""
    write_bytes_atomic(Path(path), (json.dumps(obj, indent=1, sort_keys=True) + "\n").encode())


def read_json(path: Path, *, on_damage: Callable[[Path, Exception], None] | None = None) -> dict | None:
    """The JSON object in ``path``; None if the file is missing, or if it is unreadable or not an object (then
    ``on_damage(path, error)`` is called first, e.g. to warn that it will be rebuilt)."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        obj = json.loads(path.read_text())
        if not isinstance(obj, dict):
            raise ValueError(f"a JSON {type(obj).__name__}, not an object")
        return obj
    except (OSError, ValueError) as err:
        if on_damage is not None:
            on_damage(path, err)
        return None


def human_bytes(n: float) -> str:
    """``1536`` -> ``1.5 KiB``."""
    if n < 1024:
        return f"{int(n)} B"
    for unit in ("KiB", "MiB", "GiB"):
        n /= 1024
        if n < 1024:
            return f"{n:.1f} {unit}"
    return f"{n / 1024:.1f} TiB"


def check_output_dir(directory: Path, needed: int, *, what: str, fix: str) -> None:
    """Create ``directory``, prove it writable (create and delete a probe file) and that its disk has
    ``needed`` bytes free; else raise OutputDirError naming the directory, the bytes and ``fix``."""
    directory = Path(directory)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        probe = directory / f".write_probe.{os.getpid()}{TEMP_SUFFIX}"
        with open(probe, "wb") as f:
            f.write(b"probe")
        probe.unlink()
    except OSError as err:
        raise OutputDirError(err.errno, f"cannot write {what} to {directory}: {err.strerror or err}. {fix}") from err
    free = shutil.disk_usage(directory).free
    if free < needed:
        raise OutputDirError(
            errno.ENOSPC, f"not enough free space for {what} in {directory}: needs about {needed:,} bytes "
            f"({human_bytes(needed)}), {free:,} bytes ({human_bytes(free)}) available. {fix}"
        )


class FileLock:
    """An exclusive ``fcntl.flock`` on ``path``, which is created on acquire and removed on release, so no lock
    files stay behind. The kernel drops the lock when its holder dies (even by SIGKILL): a crashed job never
    blocks the next one. Waiters that locked a file its holder has just removed notice (the path no longer
    names their inode) and lock the new file instead. Without fcntl (Windows) locking is a no-op."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.fd: int | None = None

    def acquire(self, blocking: bool = True) -> bool:
        """Take the lock (waiting for it if ``blocking``); False if it is held elsewhere and not ``blocking``."""
        if fcntl is None:
            return True
        while True:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
            except OSError as err:
                raise OutputDirError(err.errno, f"cannot create the lock file {self.path}: {err.strerror}. "
                                     "The directory must be writable by every process using it") from err
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
            except BlockingIOError:
                os.close(fd)
                return False
            try:
                held, current = os.fstat(fd), os.stat(self.path)
                if (held.st_dev, held.st_ino) == (current.st_dev, current.st_ino):
                    self.fd = fd
                    return True
            except FileNotFoundError:
                pass
            os.close(fd)  # we locked a file the previous holder removed: lock the current one

    def release(self) -> None:
        if self.fd is None:
            return
        self.path.unlink(missing_ok=True)  # while still holding it: see the class docstring
        os.close(self.fd)  # closing drops the flock
        self.fd = None

    def __enter__(self) -> FileLock:
        self.acquire()
        return self

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self.release()


def check_creatable_dir(path: str | Path, what: str) -> None:
    """Refuse a directory that cannot be created because something on its path is a regular file, before
    anything is written (``os.makedirs`` would fail later with a bare NotADirectoryError). ``what`` names the
    option in the message (``--run_dir``)."""
    path = Path(path)
    for parent in (path, *path.parents):
        if parent.exists():
            if not parent.is_dir():
                raise ConfigError(f"{what} {path} cannot be created: {parent} is a file, not a directory. Choose "
                                  "another directory")
            return
