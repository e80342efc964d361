import gzip
import pickle

import numpy as np
import pytest
import torch

from datamodules import CIFAR10DataModule, DatasetFilesError, FashionMNISTDataModule, MNISTDataModule
from datamodules.augment import random_crop_flip
from datamodules.base import TensorBatches, balanced_subset
from datamodules.cifar10 import load_cifar10, read_bin_batch, read_py_batch
from datamodules.mnist import read_idx


def fake_images(n=20, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=gen), torch.arange(n) % 10


def write_bin(path, images, labels):
    records = np.concatenate([labels.numpy().astype(np.uint8)[:, None], images.reshape(len(images), -1).numpy()], 1)
    records.tofile(path)


def write_py(path, images, labels):
    with open(path, "wb") as f:
        pickle.dump({b"data": images.reshape(len(images), -1).numpy(), b"labels": labels.tolist()}, f)


def test_binary_and_python_layouts_give_identical_tensors(tmp_path):
    images, labels = fake_images()
    write_bin(tmp_path / "b.bin", images, labels)
    write_py(tmp_path / "b.py", images, labels)
    for reader, name in ((read_bin_batch, "b.bin"), (read_py_batch, "b.py")):
        x, y = reader(tmp_path / name)
        assert x.dtype == torch.uint8 and torch.equal(x, images) and torch.equal(y, labels)


def test_full_layouts_load_identically_without_checksums(tmp_path):
    images, labels = fake_images(12)
    (tmp_path / "bin" / "cifar-10-batches-bin").mkdir(parents=True)
    (tmp_path / "py" / "cifar-10-batches-py").mkdir(parents=True)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        write_bin(tmp_path / "bin" / "cifar-10-batches-bin" / f"{name}.bin", images, labels)
        write_py(tmp_path / "py" / "cifar-10-batches-py" / name, images, labels)
    a = load_cifar10(tmp_path / "bin", verify=False)
    b = load_cifar10(tmp_path / "py", verify=False)
    assert all(torch.equal(u, v) for u, v in zip(a, b, strict=True)) and a[0].shape == (60, 3, 32, 32)


def test_corrupt_file_fails_md5_with_names_and_fix(tmp_path):
    images, labels = fake_images()
    folder = tmp_path / "cifar-10-batches-bin"
    folder.mkdir()
    write_bin(folder / "data_batch_1.bin", images, labels)
    with pytest.raises(DatasetFilesError) as err:
        load_cifar10(tmp_path)
    msg = str(err.value)
    assert "corrupt data_batch_1.bin" in msg and "missing data_batch_2.bin" in msg
    assert str(folder) in msg and "Fix" in msg


def test_missing_dataset_names_searched_dirs_and_does_not_download(tmp_path):
    with pytest.raises(DatasetFilesError, match="cifar-10-batches-py") as err:
        CIFAR10DataModule(data_dir=str(tmp_path)).setup()
    assert str(tmp_path) in str(err.value) and "download=True" in str(err.value)
    assert list(tmp_path.iterdir()) == []


def test_python_layout_refuses_code_in_pickles(tmp_path):
    class Evil:
        def __reduce__(self):
            return (open, (str(tmp_path / "pwned"), "w"))

    (tmp_path / "evil").write_bytes(pickle.dumps({b"data": Evil(), b"labels": [0]}))
    with pytest.raises(pickle.UnpicklingError, match="refusing"):
        read_py_batch(tmp_path / "evil")
    assert not (tmp_path / "pwned").exists()


def test_data_dir_from_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("BOF_DATA_DIR", str(tmp_path))
    assert CIFAR10DataModule().data_dir == tmp_path


def test_real_cifar10_is_exact(cifar):
    train_x, train_y, test_x, test_y = cifar
    assert train_x.shape == (50000, 3, 32, 32) and test_x.shape == (10000, 3, 32, 32)
    assert torch.equal(train_y.bincount(), torch.full((10,), 5000))
    assert torch.equal(test_y.bincount(), torch.full((10,), 1000))
    assert test_y[:5].tolist() == [3, 8, 8, 0, 6]  # cat, ship, ship, airplane, frog: the official order


def test_idx_plain_and_gzip_identical(tmp_path):
    arr = np.random.default_rng(0).integers(0, 256, (5, 28, 28), dtype=np.uint8)
    header = b"\x00\x00\x08\x03" + b"".join(int(s).to_bytes(4, "big") for s in arr.shape)
    (tmp_path / "x").write_bytes(header + arr.tobytes())
    with gzip.open(tmp_path / "x.gz", "wb") as f:
        f.write(header + arr.tobytes())
    assert np.array_equal(read_idx(tmp_path / "x"), arr) and np.array_equal(read_idx(tmp_path / "x.gz"), arr)
    (tmp_path / "bad").write_bytes(b"\x01\x02\x03\x04")
    with pytest.raises(DatasetFilesError, match="IDX"):
        read_idx(tmp_path / "bad")


def test_real_mnist_and_fashion_mnist(data_dir):
    for module, first_labels in ((MNISTDataModule, [7, 2, 1, 0, 4]), (FashionMNISTDataModule, [9, 2, 1, 1, 6])):
        dm = module(data_dir=str(data_dir))
        dm.setup()
        assert dm.train[0].shape == (60000, 1, 28, 28) and dm.test[0].shape == (10000, 1, 28, 28)
        assert dm.test[1][:5].tolist() == first_labels


def test_balanced_subset_is_seeded_and_balanced():
    labels = torch.arange(1000) % 10
    a, b = balanced_subset(labels, 105, seed=3), balanced_subset(labels, 105, seed=3)
    assert torch.equal(a, b) and not torch.equal(a, balanced_subset(labels, 105, seed=4))
    counts = labels[a].bincount()
    assert counts.max() - counts.min() <= 1 and counts.sum() == 105 and len(a.unique()) == 105
    with pytest.raises(ValueError, match="train_size"):
        balanced_subset(labels, 1001, seed=0)


def test_validation_split_is_disjoint_from_training(cifar, data_dir):
    dm = CIFAR10DataModule(data_dir=str(data_dir), train_size=2000, val_size=500)
    dm.setup()
    assert len(dm.train[1]) == 2000 and len(dm.val[1]) == 500
    train_rows = {bytes(x.flatten()[:64].tolist()) for x in dm.train[0]}
    assert not any(bytes(x.flatten()[:64].tolist()) in train_rows for x in dm.val[0])


def test_random_crop_flip_shifts_whole_images():
    x = torch.arange(2 * 3 * 8 * 8, dtype=torch.float32).view(2, 3, 8, 8) + 1
    assert torch.equal(random_crop_flip(x, padding=0, flip=False), x)
    out = random_crop_flip(x, padding=2, flip=True, generator=torch.Generator().manual_seed(0))
    assert out.shape == x.shape
    for img, src in zip(out, x, strict=True):  # every output is a window of the padded (or mirrored) source
        padded = torch.nn.functional.pad(src, (2,) * 4)
        windows = [padded[:, i:i + 8, j:j + 8] for i in range(5) for j in range(5)]
        assert any(torch.equal(img, w) or torch.equal(img, w.flip(2)) for w in windows)


@pytest.mark.parametrize("world", [1, 2, 3])
def test_batches_split_across_ranks(monkeypatch, world):
    x, y = torch.arange(103).view(-1, 1), torch.arange(103)
    seen_eval, seen_train = [], []
    for rank in range(world):
        monkeypatch.setattr("datamodules.base.world_info", lambda r=rank: (r, world))
        ev = TensorBatches(x, y, 10, shuffle=False, drop_last=False)
        tr = TensorBatches(x, y, 10, shuffle=True, drop_last=True, seed=1)
        seen_eval.append(torch.cat([b[1] for b in ev]))
        seen_train.append(torch.cat([b[1] for b in tr]))
        assert len(list(tr)) == len(tr) == (103 // world) // 10
    assert torch.equal(torch.cat(seen_eval).sort().values, y)  # every test example exactly once, no padding
    all_train = torch.cat(seen_train)
    assert len(all_train.unique()) == len(all_train)  # ranks see disjoint training data
