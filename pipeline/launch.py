"""How a stage's commands start: here (``local``), across a SLURM allocation (``slurm``) or through ``torchrun``.

- ``local``: ``python train.py ...`` as a child of ``reproduce``; Lightning itself starts the other processes of
  ``--trainer.devices N`` on this host.
- ``slurm``: ``reproduce`` runs inside an allocation (``sbatch`` / ``salloc``) and starts every train.py command
  with ``srun --nodes N --ntasks-per-node D``: one task per device, whose rank, node and local rank Lightning
  reads from SLURM's environment. Lightning refuses ``srun -n`` (``--ntasks``) for several tasks, which is why
  the tasks are given per node. Measure stages (one process) run as a one-task step of the same allocation.
- ``torchrun``: every train.py command runs under ``torchrun --nnodes N --nproc_per_node D`` (one node: a c10d
  rendezvous on a free port; several: a static one at ``--rdzv-endpoint`` with the given node ranks). With several
  nodes, ``reproduce`` runs on each of them with the same ``--out`` on a shared file
  system: node 0 (the leader) decides what runs, writes every record, and publishes each launch in
  ``OUT/launches-<rdzv id>.jsonl``; the other nodes (``--node-rank 1 ...``) follow that file and start the same
  launches with their own agent (:func:`follow`); a follower starts launch n+1 only after the leader has
  published it, which it does after launch n has ended on every node, so agents of two launches never meet.

For ``slurm`` and ``torchrun`` the layout is passed to every train.py command as ``--trainer.num_nodes N
--trainer.devices D --trainer.strategy ddp`` (before ``--stage-args``, which may override the strategy), so it
enters the stage keys: a run on another layout is another run.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from common.errors import UserError

LAUNCHERS = ("local", "slurm", "torchrun")
END = "end"  # the last entry of a launches file: {"end": "finished" | "failed"}


class LaunchError(UserError, ValueError):
    """The launcher cannot be set up as asked; the message says what to pass instead."""


@dataclass(frozen=True)
class Launch:
    """The launcher and the layout of every train stage: ``nodes`` x ``devices`` processes (``devices`` per node);
    ``node_rank`` and ``rdzv_endpoint`` (host:port) / ``rdzv_id`` for torchrun."""

    kind: str = "local"
    nodes: int = 1
    devices: int = 1
    node_rank: int = 0
    rdzv_endpoint: str | None = None
    rdzv_id: str | None = None

    def __post_init__(self) -> None:
        if self.kind not in LAUNCHERS:
            raise LaunchError(f"--launcher {self.kind}: choose one of {', '.join(LAUNCHERS)}")
        if self.nodes < 1 or self.devices < 1:
            raise LaunchError(f"--nodes and --devices-per-node must be >= 1, got {self.nodes} and {self.devices}")
        if not 0 <= self.node_rank < self.nodes:
            raise LaunchError(f"--node-rank {self.node_rank} is not in 0..{self.nodes - 1} (--nodes {self.nodes})")
        if self.kind == "torchrun" and self.nodes > 1 and not (self.rdzv_endpoint and self.rdzv_id):
            raise LaunchError("torchrun across nodes needs --rdzv-endpoint HOST:PORT (reachable from every node; "
                              "node 0's address) and --rdzv-id ID (the same on every node, e.g. the job id)")
        if self.kind == "local" and (self.nodes > 1 or self.node_rank):
            raise LaunchError("--nodes > 1 needs a launcher that reaches other nodes: --launcher slurm or torchrun")

    @property
    def leader(self) -> bool:
        return self.node_rank == 0

    def trainer_args(self) -> list[str]:
        """The layout, for every train.py command (and so for the keys)."""
        if self.kind == "local":
            return []
        args = ["--trainer.num_nodes", str(self.nodes), "--trainer.devices", str(self.devices)]
        return args + (["--trainer.strategy", "ddp"] if self.nodes * self.devices > 1 else [])

    def wrap(self, argv: list[str], kind: str, launch_id: str) -> list[str]:
        """``argv`` (``python train.py ...`` for a train stage's ``kind`` "train", ``python -m pipeline.measure
        ...`` for "measure") as this launcher starts it; ``launch_id`` is unique to this start (torchrun's
        rendezvous id)."""
        if self.kind == "slurm":
            tasks = (["--nodes", "1", "--ntasks", "1"] if kind == "measure" else
                     ["--nodes", str(self.nodes), "--ntasks-per-node", str(self.devices)])
            return ["srun", *tasks, "--kill-on-bad-exit=1", *argv]
        if self.kind == "torchrun" and kind == "train":
            python, script = argv[0], argv[1:]
            # Across nodes a static rendezvous: node ranks as given, so node 0 (the leader) holds global rank 0
            # and its stage.log the results (c10d would rank nodes by arrival). One node: c10d on a free port.
            backend = "static" if self.nodes > 1 else "c10d"
            endpoint = self.rdzv_endpoint or "127.0.0.1:0"
            return [python, "-m", "torch.distributed.run", f"--nnodes={self.nodes}",
                    f"--nproc_per_node={self.devices}", f"--node_rank={self.node_rank}", f"--rdzv_backend={backend}",
                    f"--rdzv_endpoint={endpoint}", f"--rdzv_id={launch_id}", *script]
        return argv

    def describe(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v is not None}


def from_environment(kind: str, nodes: int | None, devices: int | None, node_rank: int,
                     rdzv_endpoint: str | None, rdzv_id: str | None) -> Launch:
    """The launch of ``reproduce``'s options, with SLURM's allocation filling what is not given: nodes from
    ``SLURM_JOB_NUM_NODES``, devices from ``SLURM_NTASKS_PER_NODE`` (``--ntasks-per-node`` of sbatch/salloc)."""
    if kind == "slurm":
        if "SLURM_JOB_ID" not in os.environ:
            raise LaunchError("--launcher slurm runs inside an allocation: start reproduce from an sbatch script "
                              "or an salloc shell (SLURM_JOB_ID is not set here)")
        if shutil.which("srun") is None:
            raise LaunchError("--launcher slurm needs srun on PATH (SLURM's client tools) on the host reproduce "
                              "runs on")
        nodes = nodes or int(os.environ.get("SLURM_JOB_NUM_NODES", "1"))
        per_node = os.environ.get("SLURM_NTASKS_PER_NODE", "").split("(")[0]  # "2(x3)": 2 on each of 3 nodes
        if devices is None and not per_node.isdigit():
            raise LaunchError("--launcher slurm: give --devices-per-node D, or allocate with --ntasks-per-node D "
                              "(SLURM_NTASKS_PER_NODE is not set)")
        devices = devices or int(per_node)
    return Launch(kind, nodes or 1, devices or 1, node_rank, rdzv_endpoint, rdzv_id)


# --------------------------------------------------------------------------------- torchrun across nodes


def launches_file(out: Path, rdzv_id: str) -> Path:
    return Path(out) / f"launches-{rdzv_id}.jsonl"


class Publisher:
    """The leader's side of a multi-node torchrun: every launch the other nodes must join, appended as one JSON
    line (written whole and flushed, so a follower never reads half an entry), then the end of the run."""

    def __init__(self, out: Path, rdzv_id: str) -> None:
        self.path = launches_file(out, rdzv_id)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.unlink(missing_ok=True)  # one file per rendezvous id: a rerun with the same id starts over
        self.count = 0

    def _append(self, entry: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(entry) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def publish(self, stage: str, argv: list[str], env: dict[str, str]) -> None:
        self.count += 1
        self._append({"n": self.count, "stage": stage, "argv": argv, "env": env})

    def end(self, finished: bool) -> None:
        self._append({END: "finished" if finished else "failed"})


def node_argv(argv: list[str], node_rank: int) -> list[str]:
    """A published torchrun command with this node's rank."""
    return [f"--node_rank={node_rank}" if a.startswith("--node_rank=") else a for a in argv]


def follow(out: Path, rdzv_id: str, node_rank: int, run: Callable[[list[str], Path, dict], int],
           echo: Callable[[str], None] = print, poll_s: float = 0.5, wait_s: float = 3600.0) -> bool:
    """A non-leader node: start each launch the leader publishes, with this node's rank, until the leader's
    end entry; True if the leader finished. Logs go to ``OUT/<stage>/stage.node<R>.log``. Waits ``wait_s`` for
    the leader to start (its file to appear) and as long as the leader runs after that."""
    path = launches_file(out, rdzv_id)
    deadline = time.monotonic() + wait_s
    while not path.is_file():
        if time.monotonic() > deadline:
            raise LaunchError(f"no leader published {path} within {wait_s:.0f} s: start reproduce on node 0 with "
                              "the same --out (on a file system every node shares) and --rdzv-id")
        time.sleep(poll_s)
    done = 0
    while True:
        lines = path.read_text().splitlines()
        complete = lines if path.read_text().endswith("\n") else lines[:-1]
        for line in complete[done:]:
            done += 1
            entry = json.loads(line)
            if END in entry:
                echo(f"leader {entry[END]}")
                return entry[END] == "finished"
            log = Path(out) / entry["stage"] / f"stage.node{node_rank}.log"
            log.parent.mkdir(parents=True, exist_ok=True)
            echo(f"[{entry['n']}] {entry['stage']}: joining; log: {log}")
            code = run(node_argv(entry["argv"], node_rank), log, {**os.environ, **entry["env"]})
            if code != 0:  # the leader's side fails too (its collective or rendezvous breaks) and says so
                echo(f"[{entry['n']}] {entry['stage']}: exited with code {code}; waiting for the leader's verdict")
        time.sleep(poll_s)
