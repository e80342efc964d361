"""The in-memory DataModule every dataset of the suite builds on.

Whole datasets live in memory as tensors (uint8 for real images); batches are cut from them by index, moved
to the device, and only there converted to float in [0, 1] and augmented. Normalisation is a layer of the
model, so epsilons are in pixel units.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, IterableDataset

from common.errors import ConfigError
from common.tensors import as_float_images, world_info
from datamodules.augment import random_crop_flip
from datamodules.files import resolve_data_dir

Split = tuple[torch.Tensor, torch.Tensor]


def balanced_subset(labels: torch.Tensor, size: int, seed: int) -> torch.Tensor:
    """Sorted indices of ``size`` examples with classes as equal as possible, drawn with ``seed``."""
    if not 0 < size <= len(labels):
        raise ConfigError(f"subset size {size} must be in 1..{len(labels)} (the dataset's size); fix train_size")
    gen = torch.Generator().manual_seed(seed)
    classes = labels.unique()
    chosen = []
    for rank, c in enumerate(classes):
        members = (labels == c).nonzero().flatten()
        take = size // len(classes) + (rank < size % len(classes))
        if take > len(members):
            raise ConfigError(f"class {int(c)} has {len(members)} examples, fewer than the {take} asked for")
        chosen.append(members[torch.randperm(len(members), generator=gen)[:take]])
    return torch.cat(chosen).sort().values


class TensorBatches(IterableDataset):
    """Batches cut from in-memory tensors, split across DDP ranks.

    Training (``shuffle``): one permutation per epoch from ``(seed, epoch)``, identical on every rank, dealt
    round-robin and truncated so every rank runs the same number of steps. Evaluation: contiguous shards,
    no padding, so no example is counted twice.
    """

    def __init__(self, x: torch.Tensor, y: torch.Tensor, batch_size: int, *, shuffle: bool, drop_last: bool,
                 seed: int = 0, epoch_fn: Callable[[], int] = lambda: 0) -> None:
        self.x, self.y, self.batch_size = x, y, batch_size
        self.shuffle, self.drop_last, self.seed, self.epoch_fn = shuffle, drop_last, seed, epoch_fn

    def _indices(self) -> torch.Tensor:
        rank, world = world_info()
        n = len(self.y)
        if not self.shuffle:
            return torch.arange(n).tensor_split(world)[rank]
        order = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed * 100_003 + self.epoch_fn()))
        return order[rank::world][: n // world]

    def __len__(self) -> int:
        n = len(self._indices())
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __iter__(self) -> Iterator[Split]:
        for batch in self._indices().split(self.batch_size):
            if self.drop_last and len(batch) < self.batch_size:
                return
            yield self.x[batch], self.y[batch]


class InMemoryDataModule(pl.LightningDataModule):
    """Base class: subclasses implement ``load()`` returning ``(train_x, train_y, test_x, test_y)``."""

    num_classes = 10

    def __init__(self, data_dir: str | None = None, batch_size: int = 128, eval_batch_size: int | None = None,
                 train_size: int | None = None, val_size: int = 0, augment: bool = True, crop_padding: int = 4,
                 flip: bool = True, seed: int = 0, test_label_shift: int = 0, noise_std: float = 0.0) -> None:
        """
        Args:
            data_dir: folder holding the dataset; default ``$BOF_DATA_DIR``, else ``./data``.
            batch_size: training batch size per device (the global batch is this times the number of devices).
            eval_batch_size: validation/test batch size per device (default: ``batch_size``).
            train_size: train on a class-balanced subset of this many examples, drawn with ``seed``.
            val_size: hold out this many class-balanced training examples as the validation set;
                0 uses the test set for validation (the papers' practice).
            augment: random crop and horizontal flip of training batches, on the device.
            crop_padding: zero padding of the random crop (0 disables cropping).
            flip: random horizontal flip.
            seed: seed of the subset, the validation split and the shuffling.
            test_label_shift: evaluate the test set against labels (y + shift) mod C, e.g. 1 for the shifted
                labels of D_det; validation always uses the true labels.
            noise_std: Gaussian data augmentation: add N(0, noise_std^2) noise to every training pixel (after the
                crop and flip, in [0, 1] units) and clip to [0, 1] (Gilmer & Hendrycks' noise-trained model).
        """
        super().__init__()
        for name, value, low in (("batch_size", batch_size, 1), ("eval_batch_size", eval_batch_size, 1),
                                 ("train_size", train_size, 1), ("val_size", val_size, 0),
                                 ("crop_padding", crop_padding, 0)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < low):
                raise ConfigError(f"{name} must be an int >= {low}, got {value!r}; fix data.init_args.{name}")
        self.check_test_label_shift(test_label_shift)
        if isinstance(noise_std, bool) or not isinstance(noise_std, int | float) or noise_std < 0:
            raise ConfigError(f"noise_std must be a number >= 0, got {noise_std!r}; fix data.init_args.noise_std")
        self.noise_std = float(noise_std)
        self.save_hyperparameters()
        self.data_dir = resolve_data_dir(data_dir)
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size or batch_size
        self.train_size, self.val_size, self.seed = train_size, val_size, seed
        self.augment, self.crop_padding, self.flip = augment, crop_padding, flip
        self.test_label_shift = test_label_shift
        self.train: Split | None = None

    def check_test_label_shift(self, shift: int) -> None:
        """Refuse a shift that is not an int, or a non-zero multiple of ``num_classes``: (y + shift) mod C would
        be the true labels, so a run meant to measure shifted-label accuracy would silently measure plain
        accuracy."""
        c = self.num_classes
        if isinstance(shift, bool) or not isinstance(shift, int):
            raise ConfigError(f"test_label_shift must be an int, got {shift!r}; fix data.init_args.test_label_shift")
        if shift and shift % c == 0:
            raise ConfigError(
                f"test_label_shift={shift} is a multiple of the {c} classes of {type(self).__name__}: the test "
                f"labels (y + {shift}) mod {c} equal the true labels, so the shift does nothing; fix "
                f"data.init_args.test_label_shift: a shift in 1..{c - 1} (D_det's is 1), or 0 for the true labels"
            )

    def load(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def setup(self, stage: str | None = None) -> None:
        if self.train is not None:
            return
        train_x, train_y, test_x, test_y = self.load()
        self.check_split("training", train_x, train_y)
        self.check_split("test", test_x, test_y)
        n = len(train_y)
        if self.val_size >= n:
            raise ConfigError(f"val_size={self.val_size} leaves no training examples: {type(self).__name__} has "
                             f"{n}; use val_size < {n} (0 validates on the test set)")
        if self.train_size is not None and self.train_size > n - self.val_size:
            held_out = f" after holding out val_size={self.val_size}" if self.val_size else ""
            raise ConfigError(f"train_size={self.train_size} is larger than the {n - self.val_size} training examples "
                             f"of {type(self).__name__}{held_out}; use train_size <= {n - self.val_size}, or null "
                             "for all of them")
        keep = torch.arange(len(train_y))
        if self.val_size:
            val_idx = balanced_subset(train_y, self.val_size, self.seed + 1)
            self.val = train_x[val_idx], train_y[val_idx]
            mask = torch.ones(len(train_y), dtype=torch.bool)
            mask[val_idx] = False
            keep = mask.nonzero().flatten()
        else:
            self.val = test_x, test_y
        if self.train_size is not None:
            keep = keep[balanced_subset(train_y[keep], self.train_size, self.seed)]
        self.train = train_x[keep], train_y[keep]
        self.test = test_x, (test_y + self.test_label_shift) % self.num_classes
        self.train_indices = keep  # positions in the original training set, for constructed datasets

    def check_split(self, split: str, x: torch.Tensor, y: torch.Tensor) -> None:
        """Refuse data that would train silently wrong: mismatched lengths, labels outside [0, num_classes),
        NaN / inf images. (Value ranges are the loaders' business: the squares toy is not in [0, 1].)"""
        where = f"{type(self).__name__} {split} set"
        if len(x) != len(y) or y.dim() != 1:
            raise ConfigError(f"{where}: {len(x)} images but labels of shape {tuple(y.shape)}")
        if len(y) and (y.is_floating_point() or y.min() < 0 or y.max() >= self.num_classes):
            raise ConfigError(f"{where}: labels must be integers in [0, {self.num_classes}), got {y.dtype} in "
                             f"[{y.min()}, {y.max()}]; check the dataset files (or num_classes)")
        if x.is_floating_point() and x.numel() and not torch.isfinite(torch.stack(torch.aminmax(x))).all():
            # aminmax propagates NaN and shows infinities: one pass over the data
            raise ConfigError(f"{where}: images contain NaN or inf values; the files are damaged or were written "
                             "by a broken generator: rebuild them")

    def state_dict(self) -> dict:
        # Lightning checkpoints no random number generator, and augmentation (and random attack starts) draw
        # from the global ones: without this a run resumed with --ckpt_path crops and flips differently from
        # an uninterrupted one. Ranks draw alike, so rank 0's state (the one saved) is every rank's.
        state = {"torch_rng": torch.get_rng_state()}
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            state["cuda_rng"] = torch.cuda.get_rng_state()  # the current device's only: no context on the others
        return state

    def load_state_dict(self, state: dict) -> None:
        if "torch_rng" in state:
            torch.set_rng_state(state["torch_rng"])
        if "cuda_rng" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state(state["cuda_rng"])

    def _epoch(self) -> int:
        return self.trainer.current_epoch if self.trainer is not None else 0

    def _loader(self, split: Split, train: bool) -> DataLoader:
        batches = TensorBatches(*split, self.batch_size if train else self.eval_batch_size, shuffle=train,
                                drop_last=train, seed=self.seed, epoch_fn=self._epoch)
        return DataLoader(batches, batch_size=None)

    def train_dataloader(self) -> DataLoader:
        # Training drops incomplete batches: every rank (one shared permutation, an equal share each) must
        # hold at least one full per-device batch. No divisibility is required of batch_size or the set size.
        _, world = world_info()
        per_device = len(self.train[1]) // world
        if per_device < self.batch_size:
            raise ConfigError(
                f"the training set has {len(self.train[1])} examples, {per_device} per device over {world} "
                f"device(s): fewer than batch_size={self.batch_size}, so there is no full batch to train on "
                "(incomplete batches are dropped). Lower data.init_args.batch_size (it is per device) or train "
                "on more examples"
            )
        return self._loader(self.train, train=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val, train=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test, train=False)

    def on_after_batch_transfer(self, batch: Split, dataloader_idx: int) -> Split:
        x, y = batch
        x = as_float_images(x)
        if self.trainer is not None and self.trainer.training:
            if self.augment:
                x = random_crop_flip(x, self.crop_padding, self.flip)
            if self.noise_std:
                x = (x + self.noise_std * torch.randn_like(x)).clamp(0, 1)
        return x, y
