"""The on-disk cache of a constructed dataset: one directory per key, shards in safetensors, JSON beside them.

```
<cache_dir>/<recipe name>-<key>/
    shard_00000.safetensors   x (float32), y, index, label, stat.* of examples [0, shard_size)
    shard_00000.json          its sha256, size, timing and statistic sums; written after the shard
    ...
    manifest.json             config, sources, every shard's sha256, summary statistics; written last
    examples.png              originals above, constructed images below
    shard_00000.lock          only while shard 0 is being generated (manifest.lock: the manifest)
```
Every file is written under a temporary name (``<name>.<pid>.<random>.tmp``) and renamed, so a reader sees
whole files or none; temporaries of killed writers are deleted by the next writer of that file. A shard
counts as finished only when its JSON exists and the sha256 of its bytes matches; anything else is
regenerated (with a warning if a file was there), never used. No pickle anywhere.

Locks: a process generates shard i only while holding ``shard_i.lock`` (``fcntl.flock``), and re-checks under
the lock whether another process finished it meanwhile. Locks are per shard because the ranks of one DDP job
generate disjoint shards of the same set in parallel (shard i belongs to rank i % world) and must never wait
for each other; two jobs (of any world sizes) asking for the same set share its shards out instead of
generating them twice. The kernel drops a dead process's lock, so a killed job never blocks the next one.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from pathlib import Path

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

import common.files as common_files
from common.errors import ConfigError
from common.files import FileLock, remove_temporaries, write_bytes_atomic, write_json_atomic

FORMAT = 1  # bump when the layout or the meaning of a key field changes
MANIFEST = "manifest.json"


class CacheWarning(UserWarning):
    """A cached file was corrupt, partial or stale and is being rebuilt."""


def cache_key(description: dict) -> str:
    """16 hex digits of the sha256 of the canonical JSON of everything that determines the data."""
    canonical = json.dumps({"format": FORMAT, **description}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def tensor_sha256(*tensors: torch.Tensor) -> str:
    digest = hashlib.sha256()
    for t in tensors:
        digest.update(str((t.dtype, tuple(t.shape))).encode())
        digest.update(t.contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def read_json(path: Path) -> dict | None:
    """The JSON object in ``path``; None if missing, with a CacheWarning if unreadable (it is rebuilt)."""
    return common_files.read_json(path, on_damage=lambda p, err: warnings.warn(
        f"{p} is unreadable ({err}); rebuilding it", CacheWarning, stacklevel=3))


class ShardStore:
    """The files of one cache directory."""

    def __init__(self, directory: Path) -> None:
        self.dir = Path(directory)

    def shard_path(self, i: int) -> Path:
        return self.dir / f"shard_{i:05d}.safetensors"

    def info_path(self, i: int) -> Path:
        return self.dir / f"shard_{i:05d}.json"

    def lock(self, name: str) -> FileLock:
        """The lock of ``name`` (``shard_00003`` or ``manifest``); hold it to write that file."""
        return FileLock(self.dir / f"{name}.lock")

    def shard_lock(self, i: int) -> FileLock:
        return self.lock(self.shard_path(i).stem)

    def sweep_locks(self) -> None:
        """Remove lock files left by killed processes: only those no one holds (taking one removes it)."""
        for path in self.dir.glob("*.lock"):
            lock = FileLock(path)
            try:
                if lock.acquire(blocking=False):
                    lock.release()
            except OSError:  # a read-only cache: the stale file is harmless
                pass

    def write_shard(self, i: int, tensors: dict[str, torch.Tensor], info: dict) -> dict:
        """Write shard ``i``, then its JSON (with the sha256 of the shard's bytes); returns the JSON.
        Call with ``shard_lock(i)`` held."""
        self.dir.mkdir(parents=True, exist_ok=True)
        for path in (self.shard_path(i), self.info_path(i)):
            remove_temporaries(path)  # left by a killed writer; no one else writes them while we hold the lock
        bad = [k for k, v in tensors.items() if v.is_floating_point() and not torch.isfinite(v).all()]
        if bad:  # the engine checks every batch; this guards the file format itself
            raise ConfigError(f"refusing to write non-finite values (NaN/inf) in {bad} to {self.shard_path(i)}")
        data = save_safetensors({k: v.contiguous() for k, v in tensors.items()})
        info = {**info, "file": self.shard_path(i).name, "sha256": hashlib.sha256(data).hexdigest(),
                "bytes": len(data)}
        write_bytes_atomic(self.shard_path(i), data)
        write_json_atomic(self.info_path(i), info)
        return info

    def record(self, i: int) -> dict | None:
        """The JSON of shard ``i`` (not checked against the shard's bytes)."""
        return read_json(self.info_path(i))

    def finished_shard(self, i: int, warn: bool = True) -> dict | None:
        """The JSON of shard ``i`` if the shard is finished and intact, else None, with a CacheWarning if a file
        was damaged and ``warn`` (pass False when another process may be writing the shard right now)."""
        path = self.shard_path(i)
        with warnings.catch_warnings():
            if not warn:
                warnings.simplefilter("ignore", CacheWarning)
            info = read_json(self.info_path(i))
        if info is None:
            problem = "has no record (interrupted write?)" if path.exists() else None
        elif not path.is_file():
            problem = "is missing"
        elif (actual := hashlib.sha256(path.read_bytes()).hexdigest()) != info.get("sha256"):
            problem = f"is corrupt (sha256 {actual[:12]}..., recorded {str(info.get('sha256'))[:12]}...)"
        else:
            return info
        if problem and warn:
            warnings.warn(f"{path} {problem}; regenerating it", CacheWarning, stacklevel=2)
        return None

    def read_shard(self, i: int, sha256: str) -> dict[str, torch.Tensor]:
        """Shard ``i``'s tensors, after checking its bytes against ``sha256`` (from the manifest)."""
        data = self.shard_path(i).read_bytes()
        if hashlib.sha256(data).hexdigest() != sha256:
            raise RuntimeError(f"{self.shard_path(i)} changed after it was verified (another process writing "
                               "the same cache?); run again to rebuild it")
        return load_safetensors(data)

    def read_manifest(self, warn: bool = True) -> dict | None:
        with warnings.catch_warnings():
            if not warn:
                warnings.simplefilter("ignore", CacheWarning)
            return read_json(self.dir / MANIFEST)

    def write_manifest(self, manifest: dict) -> None:
        """Call with ``lock("manifest")`` held."""
        remove_temporaries(self.dir / MANIFEST)
        write_json_atomic(self.dir / MANIFEST, manifest)
