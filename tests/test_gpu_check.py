"""bench/gpu_check.py runs on a CPU at tiny sizes (CI), so the one GPU command is known to work before a GPU is
lent: every section is written, with numbers that mean something about the run (not about speed)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from helpers import REPO


def test_the_gpu_check_runs_on_cpu_and_writes_every_section(tmp_path, data_dir):
    out = tmp_path / "check.json"
    env = {**os.environ, "BOF_DATA_DIR": str(data_dir), "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline",
           "MPLBACKEND": "Agg"}
    done = subprocess.run([sys.executable, str(REPO / "bench" / "gpu_check.py"), "--size", "cpu", "--out", str(out),
                           "--work", str(tmp_path / "work")], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    results = json.loads(out.read_text())
    assert results["size"] == "cpu" and results["matmul_tflops"]["fp32"] > 0
    rows = {(r["arch"], r["precision"]): r for r in results["throughput"]}
    assert set(rows) == {(a, p) for a in ("resnet50", "resnet18", "vgg16") for p in ("bf16-mixed", "32-true")}
    for (arch, precision), row in rows.items():
        assert row["train_images_per_s"] > 0 and row["attack_image_steps_per_s"] > 0, (arch, precision)
        if precision == "32-true":  # about the fp32 matmul rate of the same run at most: the FLOP model is not
            # off by an order of magnitude (2, not 1: small CPU matmuls are slower than large convolutions)
            assert 0 < row["train_fraction_of_matmul"] < 2 and 0 < row["attack_fraction_of_matmul"] < 2, row
    # fp32 on a CPU is deterministic from run to run; the check must see that.
    for arch in ("resnet18", "fast_cnn"):
        assert results["determinism"][f"{arch}/default"]["weights_bitwise_equal"] is True
        assert results["determinism"][f"{arch}/default"]["pgd_bitwise_equal"] is True
    pipeline = results["pipeline"]
    assert {name: stage["kind"] for name, stage in pipeline.items()} == {
        "standard": "train", "adversarial_l2": "train", "d_det": "train", "transfer": "measure"}
    assert 0 <= pipeline["d_det"]["results"]["test"]["metrics"]["test/acc"] <= 1
    assert (tmp_path / "work" / "constructed").is_dir()  # the generation ran through the DataModule's engine
    assert "pgd_success" in json.dumps(pipeline["transfer"]["results"])
