"""CIFAR-10-C's fog and contrast (datamodules/corruptions.py) against values computed by hand, and the CIFAR-10-C
DataModule on crafted files and on the real test set."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from common.errors import ConfigError
from datamodules import CIFAR10CDataModule
from datamodules.cifar10c import corrupted
from datamodules.corruptions import contrast, fog, plasma_fractal
from datamodules.files import DatasetFilesError


def test_contrast_pulls_each_channel_towards_its_mean_and_truncates_like_uint8():
    x = torch.tensor([[[[0.2, 0.6]]]], dtype=torch.float64)  # mean 0.4
    # severity 1 (0.75): 0.4 - 0.2 * 0.75 = 0.25 -> 63.75 -> 63; 0.4 + 0.2 * 0.75 = 0.55 -> 140.25 -> 140
    assert contrast(x, 1).flatten().tolist() == [63 / 255, 140 / 255]
    # severity 5 (0.15): 0.37 -> 94.35 -> 94; 0.43 -> 109.65 -> 109
    assert contrast(x, 5).flatten().tolist() == [94 / 255, 109 / 255]
    two = torch.cat([x, 1 - x], dim=1)  # a second channel with its own mean (0.6)
    assert contrast(two, 1)[0, 1].flatten().tolist() == [191 / 255, 114 / 255]  # 0.75 -> 191.25, 0.45 -> 114.75


def test_fog_adds_the_fractal_then_rescales_by_the_brightest_value():
    x = torch.tensor([[[[0.5, 1.0]]]], dtype=torch.float64)
    fractal = torch.tensor([[[0.0, 1.0]]], dtype=torch.float64)
    # severity 1 (thickness 0.2): [0.5, 1.2] * 1.0 / 1.2 = [0.41667, 1.0] -> [106.25, 255] -> [106, 255]
    assert fog(x, 1, fractals=fractal).flatten().tolist() == [106 / 255, 1.0]
    # severity 5 (1.5): [0.5, 2.5] * 1 / 2.5 = [0.2, 1.0] -> [51, 255]
    assert fog(x, 5, fractals=fractal).flatten().tolist() == [51 / 255, 1.0]
    dim = x * 0.5  # brightest 0.5: [0.25, 0.7] * 0.5 / 0.7 = [0.17857, 0.5] -> [45.5, 127.5] -> [45, 127]
    assert fog(dim, 1, fractals=fractal).flatten().tolist() == [45 / 255, 127 / 255]


def test_plasma_fractals_span_zero_to_one_are_seeded_and_smoother_with_faster_decay():
    def roughness(decay: float) -> float:
        maps = [plasma_fractal(32, decay, torch.Generator().manual_seed(s)) for s in range(8)]
        return sum((m - m.roll(1, 0)).abs().mean().item() for m in maps) / len(maps)

    a = plasma_fractal(32, 3.0, torch.Generator().manual_seed(0))
    assert a.shape == (32, 32) and a.min().item() == 0.0 and a.max().item() == 1.0
    assert torch.equal(a, plasma_fractal(32, 3.0, torch.Generator().manual_seed(0)))
    assert not torch.equal(a, plasma_fractal(32, 3.0, torch.Generator().manual_seed(1)))
    assert roughness(3.0) < roughness(1.75) < roughness(1.2)  # fog 1-2 (decay 3) is smoother than fog 5 (1.75)


def cifar10c_folder(tmp_path, shape=(20, 32, 32, 3)):
    images = np.arange(np.prod(shape), dtype=np.int64).reshape(shape) % 251
    np.save(tmp_path / "snow.npy", images.astype(np.uint8))
    np.save(tmp_path / "labels.npy", (np.arange(shape[0]) % 10).astype(np.uint8))
    return images


def test_the_files_are_read_by_severity_and_without_pickle(tmp_path, data_dir):
    images = cifar10c_folder(tmp_path)
    dm = CIFAR10CDataModule(data_dir=str(data_dir), corruption="snow", severity=3, folder=str(tmp_path))
    _, _, x, y = dm.load()
    assert torch.equal(x, torch.from_numpy(images[8:12].astype(np.uint8)).permute(0, 3, 1, 2))  # severity 3 of 5
    assert y.tolist() == [8, 9, 0, 1] and y.dtype == torch.int64


def test_bad_files_corruptions_and_severities_are_refused_by_name(tmp_path, data_dir):
    with pytest.raises(ConfigError, match="needs the CIFAR-10-C files"):
        CIFAR10CDataModule(data_dir=str(data_dir), corruption="snow")  # not generated, no folder
    with pytest.raises(ConfigError, match="data.init_args.corruption"):
        CIFAR10CDataModule(data_dir=str(data_dir), corruption="haze")
    with pytest.raises(ConfigError, match="data.init_args.severity"):
        CIFAR10CDataModule(data_dir=str(data_dir), severity=6)
    cifar10c_folder(tmp_path, shape=(7, 32, 32, 3))  # not 5 severities
    with pytest.raises(DatasetFilesError, match="5 x N"):
        CIFAR10CDataModule(data_dir=str(data_dir), corruption="snow", folder=str(tmp_path)).load()
    np.save(tmp_path / "snow.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(DatasetFilesError, match="cannot read"):  # an object array would need unpickling
        CIFAR10CDataModule(data_dir=str(data_dir), corruption="snow", folder=str(tmp_path)).load()


def test_fog_and_contrast_are_generated_from_the_real_test_set(data_dir, cifar):
    _, _, clean_x, clean_y = cifar
    made = {}
    for corruption in ("fog", "contrast"):
        _, _, x, y = CIFAR10CDataModule(data_dir=str(data_dir), corruption=corruption, severity=5).load()
        assert x.dtype == torch.uint8 and x.shape == clean_x.shape and torch.equal(y, clean_y)
        # both flatten the images: less spread of pixel values around each image's mean
        assert x.double().flatten(1).std(1).mean() < 0.8 * clean_x.double().flatten(1).std(1).mean(), corruption
        made[corruption] = x
    # Each image's fractal from its own seed: the same images whatever the batching, another seed other ones.
    assert torch.equal(corrupted(clean_x[:300], "fog", 5, batch=70), made["fog"][:300])
    assert not torch.equal(corrupted(clean_x[:300], "fog", 5, seed=1), made["fog"][:300])
    # A subset by test index is corrupted exactly as in the whole set, without corrupting the rest.
    keep = [3, 17, 256, 9999]
    for corruption in ("fog", "contrast"):
        _, _, x, y = CIFAR10CDataModule(data_dir=str(data_dir), corruption=corruption, severity=5,
                                        test_indices=keep).load()
        assert torch.equal(x, made[corruption][keep]) and torch.equal(y, clean_y[keep]), corruption
    with pytest.raises(ConfigError, match=r"test_indices must lie in \[0, 10000\)"):
        CIFAR10CDataModule(data_dir=str(data_dir), test_indices=[10_000]).load()
