"""Importing MadryLab robustness-library checkpoints (models/madrylab.py) from files crafted in the library's
exact format (tests/robustness_library.py)."""

from __future__ import annotations

import pytest
import torch
from robustness_library import MARKER, Payload, library_file, resnet18, resnet50
from torch import nn

from common.files import file_hash
from models import load_source
from models.checkpoints import CheckpointError
from models.madrylab import import_checkpoint


def test_a_library_checkpoint_becomes_a_suite_checkpoint_that_computes_the_same_function(tmp_path):
    source = tmp_path / "cifar_l2_0_5.pt"
    library_model = library_file(source, resnet50())
    out = import_checkpoint(source, tmp_path / "imported.ckpt")
    imported = load_source(out)  # what every stage that takes a source model reads
    x = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.allclose(imported.model(x), library_model(x), atol=1e-4, rtol=1e-4)
    record = torch.load(out, weights_only=True)["imported_from"]
    assert record == {"library": "robustness", "file": source.name, "sha256": file_hash(source, "sha256"),
                      "epoch": 150}


def test_a_truncated_library_checkpoint_is_refused_as_damaged(tmp_path):
    source = tmp_path / "cifar_nat.pt"
    library_file(source, resnet50())
    source.write_bytes(source.read_bytes()[: source.stat().st_size // 3])
    with pytest.raises(CheckpointError, match="damaged or truncated"):
        import_checkpoint(source, tmp_path / "x.ckpt")
    assert not (tmp_path / "x.ckpt").exists()


def test_a_library_checkpoint_with_a_code_payload_is_refused_without_running_it(tmp_path):
    source = tmp_path / "cifar_linf_8.pt"
    MARKER.unlink(missing_ok=True)
    library_file(source, resnet50(), hook=Payload())
    with pytest.raises(CheckpointError, match="refusing .* nothing of it was run"):
        import_checkpoint(source, tmp_path / "x.ckpt")
    assert not MARKER.exists() and not (tmp_path / "x.ckpt").exists()


def test_a_library_checkpoint_of_another_architecture_or_normalisation_is_refused(tmp_path):
    source = tmp_path / "resnet18.pt"
    library_file(source, resnet18())
    with pytest.raises(CheckpointError, match="holds the library's CIFAR resnet18, not the resnet50"):
        import_checkpoint(source, tmp_path / "x.ckpt", arch="resnet50")
    assert not (tmp_path / "x.ckpt").exists()
    imported = import_checkpoint(source, tmp_path / "r18.ckpt")  # the architecture its keys name
    assert load_source(imported).hparams["arch"] == "resnet18"
    hundred = resnet50()
    hundred.linear = nn.Linear(2048, 100)  # CIFAR-100's head: same keys, another shape
    library_file(tmp_path / "c100.pt", hundred)
    with pytest.raises(CheckpointError, match=r"linear.weight has shape \(100, 2048\)"):
        import_checkpoint(tmp_path / "c100.pt", tmp_path / "z.ckpt")
    library_file(tmp_path / "vgg.pt", nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3)))
    with pytest.raises(CheckpointError, match="is not one of the library's CIFAR ResNets"):
        import_checkpoint(tmp_path / "vgg.pt", tmp_path / "v.ckpt")
    other = tmp_path / "imagenet_norm.pt"
    library_file(other, resnet50(), mean=(0.485, 0.456, 0.406))
    with pytest.raises(CheckpointError, match="normalisation new_mean"):
        import_checkpoint(other, tmp_path / "y.ckpt")
