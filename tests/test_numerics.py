"""``precision: auto`` (common/numerics.py, lightning_modules/trainer.py): what it resolves to on each kind of
machine, where the resolved value is recorded, and that it enters the keys."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings

import pytest
import torch
import yaml
from helpers import REPO, write_checkpoint

from common import numerics
from common.numerics import AUTO, SlowPrecisionWarning, resolve_precision
from datamodules import RelabelByAttack
from datamodules.constructed import GenerationJob, GenerationSpec
from models import load_source
from pipeline import stages
from pipeline.stages import measure_stage, stage_key, train_stage


def machine(monkeypatch, onednn: bool, flags: set[str] | None, vendor: str | None = "AuthenticAMD") -> None:
    """Pretend to be a CPU on which oneDNN does (not) report bf16, with this /proc/cpuinfo vendor and flags."""
    monkeypatch.setattr(numerics, "onednn_bf16", lambda: onednn)
    monkeypatch.setattr(numerics, "cpu_info", lambda: (vendor, None if flags is None else frozenset(flags)))


@pytest.mark.parametrize(("onednn", "flags", "vendor", "expected"), [
    (False, {"avx2", "fma"}, "AuthenticAMD", "32-true"),                     # the AVX2 machine: bf16 12-28x slower
    (True, {"avx2", "avx512f", "avx512bw"}, "GenuineIntel", "32-true"),       # oneDNN would emulate bf16
    (True, {"avx512f", "avx512_bf16"}, "AuthenticAMD", "bf16-mixed"),         # the AMD EPYC: attack 1.6-2.0x
    (True, {"avx512f", "avx512_bf16"}, "GenuineIntel", "32-true"),            # the Xeon, AMX hidden: 0.73x training
    (True, {"avx512f", "avx512_bf16", "amx_bf16", "amx_tile"}, "GenuineIntel", "bf16-mixed"),  # AMX
    (True, None, None, "bf16-mixed"),                                          # no /proc/cpuinfo: oneDNN's word
])
def test_auto_resolves_per_cpu_to_bf16_only_where_it_is_the_fast_path(monkeypatch, onednn, flags, vendor, expected):
    machine(monkeypatch, onednn, flags, vendor)
    chosen, why = resolve_precision(AUTO, "cpu")
    assert chosen == expected and f"auto -> {expected} on cpu" in why


def test_a_pinned_bf16_where_it_is_not_the_fast_path_is_kept_with_a_warning(monkeypatch):
    machine(monkeypatch, False, {"avx2"})
    with pytest.warns(SlowPrecisionWarning, match=r"12-28x slower .* Use precision auto \(or 32-true\)"):
        assert resolve_precision("bf16-mixed", "cpu")[0] == "bf16-mixed"
    machine(monkeypatch, True, {"avx512_bf16"}, "GenuineIntel")
    with pytest.warns(SlowPrecisionWarning, match=r"avx512_bf16 without AMX on GenuineIntel"):
        assert resolve_precision("bf16-mixed", "cpu")[0] == "bf16-mixed"
    machine(monkeypatch, True, {"avx512_bf16"})
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # native: no warning
        assert resolve_precision("bf16-mixed", "cpu")[0] == "bf16-mixed"
        assert resolve_precision("32-true", "cpu")[0] == "32-true"


def test_auto_on_a_device_without_bf16_is_fp32(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_precision(AUTO, "cuda")[0] == "32-true" and resolve_precision(AUTO, "mps")[0] == "32-true"
    assert numerics.device_type_of("auto") == "cpu" and numerics.device_type_of("gpu") == "cuda"


def test_generation_auto_is_resolved_before_the_key_so_it_shares_the_pinned_caches(tmp_path, cifar):
    ckpt = write_checkpoint(tmp_path / "source.ckpt")
    x, y = cifar[0][:8], cifar[1][:8]

    def job(precision: str) -> GenerationJob:
        return GenerationJob(x, y, torch.arange(8), [load_source(ckpt)], RelabelByAttack("shift", steps=1),
                             GenerationSpec(precision=precision), progress=False)

    here = str(resolve_precision(AUTO, "cpu")[0])
    other = "32-true" if here == "bf16-mixed" else "bf16-mixed"
    auto = job(AUTO)
    assert auto.spec.precision == here and auto.description()["numerics"]["precision"] == here
    assert auto.description() == job(here).description()  # the same data, so the same cache entry
    assert auto.description() != job(other).description()


def test_what_auto_means_on_this_machine_enters_train_stage_keys_only(tmp_path, monkeypatch):
    config = tmp_path / "c.yaml"
    config.write_text("trainer: {}\n")
    train, measure = train_stage("a", str(config)), measure_stage("m", "transfer")
    keys = [stage_key(s, preset="p", dep_ids={}) for s in (train, measure)]
    monkeypatch.setattr(stages, "auto_precision", lambda: {"cpu": "something else"})
    assert stage_key(train, preset="p", dep_ids={}) != keys[0]
    assert stage_key(measure, preset="p", dep_ids={}) == keys[1]


@pytest.mark.parametrize("requested", ["auto", "32-true"])
def test_the_resolved_precision_is_printed_logged_saved_and_in_the_checkpoint(tmp_path, data_dir, requested):
    run = tmp_path / "run"
    env = {**os.environ, "BOF_DATA_DIR": str(data_dir), "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, str(REPO / "train.py"), "fit", "--config", "configs/mini/base.yaml",
                           "--config", "configs/mini/standard.yaml", "--config", "configs/ci/tiny.yaml",
                           "--trainer.precision", requested, "--trainer.limit_train_batches", "1",
                           "--trainer.limit_val_batches", "0", "--run_dir", str(run)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    expected = str(resolve_precision(requested, "cpu")[0])
    assert f"precision {requested}" in done.stdout + done.stderr and expected in done.stdout + done.stderr
    record = json.loads((run / "numerics.json").read_text())
    assert record["requested"] == requested and record["precision"] == expected and record["device_type"] == "cpu"
    checkpoint = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)  # loads without unpickling code
    assert checkpoint["numerics"] == record
    hparams = yaml.safe_load((run / "csv" / "version_0" / "hparams.yaml").read_text())
    assert hparams["numerics/precision"] == expected
