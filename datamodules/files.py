"""Locating dataset files and checking them against their official checksums."""

from __future__ import annotations

import errno
import glob
import gzip
import hashlib
import os
import secrets
import shutil
from pathlib import Path
from types import TracebackType

from common.errors import UserError

try:
    import fcntl
except ImportError:  # Windows: no flock; locking is skipped (see FileLock)
    fcntl = None

DATA_DIR_ENV = "BOF_DATA_DIR"
TEMP_SUFFIX = ".tmp"
# errors that mean "this directory cannot take the file", as opposed to a bug in the caller
_NO_ROOM = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOTDIR)


class DatasetFilesError(UserError, FileNotFoundError):
    """A dataset is missing, incomplete or corrupt; the message says which files and how to fix it."""


class OutputDirError(UserError, OSError):
    """An output directory is unwritable or too full; the message names it, the bytes needed and the fix."""


def resolve_data_dir(data_dir: str | os.PathLike | None) -> Path:
    """The data directory: the argument, else ``$BOF_DATA_DIR``, else ``./data``."""
    if data_dir is not None:
        return Path(data_dir).expanduser()
    return Path(os.environ.get(DATA_DIR_ENV, "data")).expanduser()


def file_hash(path: Path, algorithm: str = "md5", *, decompress: bool = False) -> str:
    """Hex digest of a file's bytes (of its decompressed bytes if ``decompress``), read in chunks."""
    digest = hashlib.new(algorithm)
    opener = gzip.open if decompress else open
    with opener(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def check_files(folder: Path, expected_md5: dict[str, str], *, dataset: str, fix: str) -> None:
    """Raise one DatasetFilesError listing every missing or corrupt file in ``folder``."""
    problems = []
    for name, md5 in expected_md5.items():
        path = folder / name
        if not path.is_file():
            problems.append(f"missing {name}")
        elif (actual := file_hash(path)) != md5:
            problems.append(f"corrupt {name} (md5 {actual}, expected {md5})")
    if problems:
        raise DatasetFilesError(
            f"{dataset}: {'; '.join(problems)} in {folder}. Expected files: {', '.join(expected_md5)}. {fix}"
        )


def missing_dataset_error(dataset: str, searched: list[Path], expected: str, fix: str) -> DatasetFilesError:
    where = ", ".join(str(p) for p in searched)
    return DatasetFilesError(f"{dataset} not found. Searched: {where}. Expected {expected}. {fix}")


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
