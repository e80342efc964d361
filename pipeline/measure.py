"""Measurement stages, each a function run in its own process and rerunnable alone:

    python -m pipeline.measure transfer --out DIR --target T.ckpt --ensemble E1.ckpt ... --fresh F.ckpt
    python -m pipeline.measure figure3 --out DIR --source S.ckpt --fresh F.ckpt [F2.ckpt ...] \
        --ddet runs/.../d_det [runs/.../d_det_resnet18 ...] ...
    python -m pipeline.measure leakage --out DIR --features robust_linear.ckpt --d_rand runs/.../d_rand ...
    python -m pipeline.measure goh_features --out DIR [--classes truck frog --eps 1 --rank 100 --alpha 0.25]
    python -m pipeline.measure frequency --out DIR --model standard=S.ckpt adversarial_l2=A.ckpt ...
    python -m pipeline.measure layer_robustness --out DIR --model standard=S.ckpt adversarial_l2=A.ckpt [--eps 0.5]
    python -m pipeline.measure autoattack --out DIR --model d_robust=R.ckpt ... [--eps 0.25 0.5]
    python -m pipeline.measure inversion --out DIR --model standard=S.ckpt adversarial_l2=A.ckpt [--examples 50]

Each writes ``DIR/measure.json`` (atomically) and sends its numbers (Figure 3: also its plot) to the loggers
(``--logger_config``; default CSV + TensorBoard under DIR). Both attack a fixed, seeded subset of the real
CIFAR-10 test set (``--examples``, ``--seed``), on CUDA when available.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

from common import progress
from common.attack_settings import (
    AUTOATTACK_QUERIES,
    AUTOATTACK_STEPS,
    NAKKIRAN_ATTACKS,
    NAKKIRAN_STEPS,
    SWEEP_STEPS,
)
from common.datasets import CIFAR10_TEST_SIZE
from common.errors import ConfigError
from common.files import read_json, write_json_atomic
from pipeline.runner import STAGE_JSON
from pipeline.stages import option_value


def _device():
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def seeded_subset(total: int, examples: int, seed: int):
    """``examples`` of ``range(total)`` drawn with ``seed``, in index order: every measure's test subset."""
    import torch

    return torch.randperm(total, generator=torch.Generator().manual_seed(seed))[:examples].sort().values


def cifar_test_subset(examples: int, seed: int, data_dir: str | None = None):
    """``examples`` real CIFAR-10 test images (float in [0, 1]) and labels, drawn with ``seed``, in index order."""

    from common.tensors import as_float_images
    from datamodules import CIFAR10DataModule

    dm = CIFAR10DataModule(data_dir=data_dir)
    dm.setup("test")
    x, y = dm.test
    keep = seeded_subset(len(y), examples, seed)
    return as_float_images(x[keep]), y[keep]


def named_models(pairs: Sequence[str], measure: str) -> dict[str, str]:
    """``--model NAME=CKPT ...`` as {name: checkpoint}; anything else is refused."""
    models = dict(pair.split("=", 1) for pair in pairs if "=" in pair)
    if len(models) != len(pairs) or not all(models.values()):
        raise ConfigError(f"{measure}: --model takes NAME=CHECKPOINT pairs with distinct names, got {list(pairs)}")
    return models


def each_model(models: dict[str, str], measure: str) -> Iterator[tuple[str, str]]:
    """``models.items()``, telling ``reproduce``'s progress view which model the measure is on (its slow loops
    run a model at a time: minutes each for AutoAttack or the inversion)."""
    for i, (name, path) in enumerate(models.items()):
        progress.report(f"{measure}: model {i + 1}/{len(models)} ({name})", i, len(models), "models", force=True)
        yield name, path


def _model(path: str):
    from models import load_source

    return load_source(path).model.to(_device())


def transfer(*, target: str, ensemble: Sequence[str], fresh: str, examples: int = 1000, seed: int = 0,
             steps: int = NAKKIRAN_STEPS, batch_size: int = 250, data_dir: str | None = None) -> dict:
    """Nakkiran's table (SPEC 4.1): success on the target and targeted transfer to ``fresh`` of plain targeted PGD
    and of the non-transferable attack (target t = y + 1), for L2 and Linf."""
    from attacks.ensemble import transfer_report

    x, y = cifar_test_subset(examples, seed, data_dir)
    target_model, fresh_model = _model(target), _model(fresh)
    members = [_model(p) for p in ensemble]
    results = {"examples": examples, "seed": seed, "steps": steps, "ensemble_size": len(members)}
    for norm, attack in NAKKIRAN_ATTACKS.items():
        start = time.monotonic()
        results[norm] = transfer_report(target_model, members, fresh_model, x, y, norm=norm, steps=steps,
                                        shift=1, batch_size=batch_size, **attack)
        results[norm].update(attack, seconds=round(time.monotonic() - start, 1))
    return results


def true_label_accuracy(stage_dir: str) -> float | None:
    """Clean test accuracy on the true labels recorded by a finished train stage."""
    record = read_json(Path(stage_dir) / STAGE_JSON) or {}
    return record.get("results", {}).get("test", {}).get("metrics", {}).get("test/acc")


def model_label(source) -> str:
    """``fast_cnn`` / ``fast_cnn (whiten=False)`` / ``resnet18``: the architecture of a loaded checkpoint."""
    kwargs = source.hparams.get("arch_kwargs") or {}
    extra = ", ".join(f"{k}={v}" for k, v in sorted(kwargs.items()))
    return f"{source.hparams.get('arch', 'model')}{f' ({extra})' if extra else ''}"


def ddet_attack(stage_dirs: Sequence[str]) -> dict:
    """The attack that made the D_det the ``stage_dirs`` trained on, from the record their ConstructedDataModule
    wrote (``constructed.json``): one source of truth, the run itself. All must have trained on the same set."""
    from pipeline.outputs import constructed_record

    records = {stage: constructed_record(Path(stage)) for stage in stage_dirs}
    if missing := [s for s, r in records.items() if r is None]:
        raise ConfigError(f"figure3: {missing} hold no constructed.json (the record of the dataset a run trained on): "
                          "rerun those D_det stages with this version of the suite (reproduce --force d_det)")
    if len({r["key"] for r in records.values()}) > 1:
        raise ConfigError(f"figure3: the --ddet stages trained on different datasets "
                          f"({ {s: r['key'][:12] for s, r in records.items()} }); Figure 3 pairs one D_det with models "
                          "of several architectures")
    recipe = next(iter(records.values()))["recipe"]
    if recipe["class_path"].rsplit(".", 1)[-1] != "RelabelByAttack" or recipe["init_args"].get("targets") != "shift" \
            or recipe["init_args"].get("shift", 1) != 1:
        raise ConfigError(f"figure3: --ddet stages must train on a D_det (RelabelByAttack, targets: shift, shift 1); "
                          f"{stage_dirs[0]} used {recipe['class_path']} {recipe['init_args']}")
    return recipe["init_args"]


def figure3(*, source: str, fresh: Sequence[str], ddet: Sequence[str], transfer: str, examples: int = 1000,
            seed: int = 0, batch_size: int = 250,
            nakkiran_l2: str | None = None, nakkiran_linf: str | None = None, pgd_l2: str | None = None,
            pgd_linf: str | None = None, data_dir: str | None = None) -> dict:
    """Ilyas Figure 3's points, (test accuracy on the true labels of a model trained on a D_det-style set,
    targeted transfer rate of the attack that made the set to an independently trained model):

    - one D_det point per architecture: ``ddet[i]`` is the stage of a model of some architecture trained on the
      D_det made from ``source``, ``fresh[i]`` a standard model of that architecture; transfer measured here:
      the attack that made the D_det (read from the D_det run's record: norm, eps, step size, steps) towards y + 1
      from ``source``, scored on ``fresh[i]``;
    - Nakkiran's datasets (non-transferable attack) and their plain-PGD controls: accuracies of those stages,
      transfer rates from the ``transfer`` stage.
    """
    import torch

    from attacks import attack_success_rate, pgd, targeted_transfer_rate
    from models import load_source

    if isinstance(ddet, str) or isinstance(fresh, str):
        ddet, fresh = [ddet] if isinstance(ddet, str) else ddet, [fresh] if isinstance(fresh, str) else fresh
    if len(ddet) != len(fresh) or not ddet:
        raise ConfigError(f"figure3 needs one --fresh checkpoint per --ddet stage (the same architecture, trained on "
                         f"clean data): got {len(ddet)} --ddet and {len(fresh)} --fresh")
    attack = ddet_attack(ddet)
    attack_norm, eps, step_size, steps = attack.get("norm", "l2"), attack["eps"], attack["step_size"], attack["steps"]
    x, y = cifar_test_subset(examples, seed, data_dir)
    device = _device()
    model = load_source(source).model.to(device)
    targets = (y + 1) % 10
    start = time.monotonic()
    x_adv = torch.cat([pgd(model, xb.to(device), tb.to(device), norm=attack_norm, eps=eps, step_size=step_size,
                           steps=steps, targeted=True).cpu()
                       for xb, tb in zip(x.split(batch_size), targets.split(batch_size), strict=True)])
    success = attack_success_rate(model, x_adv, targets, targeted=True, batch_size=batch_size)
    points = []
    for stage, fresh_path in zip(ddet, fresh, strict=True):
        independent = load_source(fresh_path)
        points.append({"label": f"D_det ({model_label(independent)})", "stage": Path(stage).name,
                       "accuracy": true_label_accuracy(stage), "source_success": success,
                       "transfer": targeted_transfer_rate(x_adv, targets, independent.model.to(device),
                                                          batch_size=batch_size)})
    table = (read_json(Path(transfer) / STAGE_JSON) or {}).get("results", {})
    for kind, dirs in (("non_transferable", {"l2": nakkiran_l2, "linf": nakkiran_linf}),
                       ("pgd", {"l2": pgd_l2, "linf": pgd_linf})):
        for norm, stage in dirs.items():
            if stage is not None:
                name = "Nakkiran non-transferable" if kind == "non_transferable" else "plain PGD"
                points.append({"label": f"D_det of {name} ({norm})", "stage": Path(stage).name,
                               "accuracy": true_label_accuracy(stage),
                               "transfer": table.get(norm, {}).get(f"{kind}_transfer")})
    return {"examples": examples, "seed": seed, "attack": {"norm": attack_norm, "eps": eps, "step_size": step_size,
            "steps": steps, "targets": "(y + 1) mod 10"}, "points": points,
            "seconds": round(time.monotonic() - start, 1)}


def training_set(stage_dir: str):
    """The training images and labels a finished train stage trained on, and the original training-set index of
    each (None for released files): its constructed dataset (from the record ``constructed.json``) or the
    authors' released files (a ``released_<stage>``'s ``--data.init_args.folder``)."""
    from datamodules import load_released
    from datamodules.constructed.engine import load
    from datamodules.constructed.store import ShardStore
    from pipeline.outputs import constructed_record

    if (record := constructed_record(Path(stage_dir))) is not None:
        constructed, keep = load(ShardStore(Path(record["directory"]))), record.get("keep")
        return (*constructed.training_set(keep), constructed.training_indices(keep))
    fit = (read_json(Path(stage_dir) / STAGE_JSON) or {}).get("commands", {}).get("fit", [])
    if (folder := option_value(fit, "--data.init_args.folder")) is not None:
        return (*load_released(folder), None)
    raise ConfigError(f"leakage: {stage_dir} trained on neither a constructed dataset (no constructed.json) nor a "
                      "released one; pass the folder of a finished D_rand / D_det stage")


def leakage(*, features: str, d_rand: str | None = None, d_det: str | None = None,
            released_d_rand: str | None = None, released_d_det: str | None = None, examples: int = 10000,
            seed: int = 0, batch_size: int = 250, data_dir: str | None = None) -> dict:
    """Goh's robust feature leakage (SPEC 5.1): a linear classifier on only the 10 robust features (the logits of
    the certified linear model ``features``), fitted on each D_rand / D_det stage's training set with its labels,
    scored on the real test set's true labels. High accuracy: the dataset teaches through robust features. For the
    suite's own sets also ``label_alignment``: the mean cosine between each perturbation (image minus its clean
    source) and the pixel direction that raises its label's robust margin most (``models.linear``)."""
    import torch
    from torch import nn

    from common.tensors import as_float_images
    from datamodules import CIFAR10DataModule
    from models import load_source, read_checkpoint
    from models.linear import certified, fit_linear, label_alignment, pixel_weight

    model = load_source(features).model
    eps = (read_checkpoint(features).get("hyper_parameters") or {}).get("eps")
    if not isinstance(model.body, nn.Flatten) or eps is None:
        raise ConfigError(f"leakage: --features {features} is not a certified linear classifier (a "
                          "CertifiedLinearModule checkpoint of arch linear, e.g. the robust_linear stage's)")
    x_test, y_test = cifar_test_subset(examples, seed, data_dir)

    def robust_features(x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return torch.cat([model(x[i:i + batch_size]) for i in range(0, len(x), batch_size)])

    test_features = robust_features(x_test)
    results = {"examples": len(y_test), "seed": seed, "features": {
        "clean_acc": (test_features.argmax(1) == y_test).float().mean().item(),
        "certified_acc": certified(test_features, y_test, pixel_weight(model), eps).float().mean().item(),
        "eps": eps}}
    clean_train = None  # the CIFAR-10 training images, read once if a constructed set needs them
    for name, stage in (("d_rand", d_rand), ("d_det", d_det), ("released_d_rand", released_d_rand),
                        ("released_d_det", released_d_det)):
        if stage is None:
            continue
        start = time.monotonic()
        x, y, source_index = training_set(stage)
        train_features = robust_features(x)
        classifier = fit_linear(train_features, y, seed=seed)
        with torch.no_grad():
            results[name] = {
                "accuracy": (classifier(test_features).argmax(1) == y_test).float().mean().item(),
                "train_accuracy": (classifier(train_features).argmax(1) == y).float().mean().item(),
                "train_examples": len(y)}
        if source_index is not None:  # how much robust feature of its label the attack planted: why it leaks
            if clean_train is None:
                clean_train = CIFAR10DataModule(data_dir=data_dir).load()[0]
            weight = pixel_weight(model).detach()
            cosines = [label_alignment(x[part] - as_float_images(clean_train[source_index[part]]), y[part], weight)
                       for part in (slice(i, i + batch_size) for i in range(0, len(y), batch_size))]
            results[name]["label_alignment"] = torch.cat(cosines).mean().item()
        results[name]["seconds"] = round(time.monotonic() - start, 1)
    return results


def goh_features(*, classes: Sequence[str] = ("truck", "frog"), eps: float = 1.0, rank: int = 100,
                 alpha: float = 0.25, examples: int = 2000, seed: int = 0, batch_size: int = 250,
                 data_dir: str | None = None, plotted: int = 500) -> dict:
    """Goh's two useful non-robust features (SPEC 5.2): CIFAR-10 ``classes[0]`` (+1) against ``classes[1]`` (-1),
    the singular vectors of the centred training images as the basis; usefulness and robust usefulness at L2
    ``eps`` of every basis vector on held-out (test) images, and of two constructions: the signed sum of the
    non-robust vectors among the ``rank`` most robust (ensemble), and ``(1 - alpha)`` of it plus ``alpha`` of
    the most useful robust vector (containment). Directions are chosen on training images only."""
    import torch

    from common.datasets import CIFAR10_CLASSES
    from datamodules.cifar10 import load_cifar10
    from datamodules.files import resolve_data_dir
    from models.linear_features import (
        containment_feature,
        ensemble_feature,
        ensemble_members,
        pixel_basis,
        robust_usefulness,
        robustness,
        usefulness,
    )

    unknown = [c for c in classes if c not in CIFAR10_CLASSES]
    if len(classes) != 2 or unknown:
        raise ConfigError(f"goh_features: --classes takes two of {list(CIFAR10_CLASSES)}, got {list(classes)}")
    positive, negative = (CIFAR10_CLASSES.index(c) for c in classes)
    train_x, train_y, test_x, test_y = load_cifar10(resolve_data_dir(data_dir))

    def two_classes(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        keep = (y == positive) | (y == negative)
        return x[keep].double() / 255, torch.where(y[keep] == positive, 1.0, -1.0).double()

    x, y = two_classes(train_x, train_y)
    held_x, held_y = two_classes(test_x, test_y)
    pick = seeded_subset(len(held_y), examples, seed)
    held_x, held_y = held_x[pick], held_y[pick]
    basis = pixel_basis(x)
    x, held_x = basis.centre(x), basis.centre(held_x)

    def scores(a: torch.Tensor) -> dict:
        a = a[:, None]
        return {"usefulness_train": usefulness(a, x, y, basis).item(), "usefulness": usefulness(a, held_x, held_y,
                basis).item(), "robust_usefulness": robust_usefulness(a, held_x, held_y, basis, eps).item(),
                "robustness": robustness(a, basis).item()}

    useful_train = usefulness(basis.vectors, x, y, basis)
    robust_train = useful_train - eps / basis.robustness
    if not (robust_train > 0).any():
        raise ConfigError(f"goh_features: no basis vector is robust at eps {eps} on the training images; use a "
                          "smaller --eps")
    ensemble = ensemble_feature(basis, useful_train, eps, rank)
    best = int(torch.argmax(torch.where(robust_train > 0, useful_train, -torch.inf)))  # the most useful robust one
    robust_part = torch.sign(useful_train[best]) * basis.vectors[:, best]
    containment = containment_feature(ensemble, robust_part, basis, alpha)
    useful_held = usefulness(basis.vectors, held_x, held_y, basis)
    return {
        "classes": list(classes), "train_examples": len(y), "examples": len(held_y), "seed": seed, "eps": eps,
        "rank": rank, "alpha": alpha,
        "basis": {"robustness": basis.robustness[:plotted].tolist(), "usefulness": useful_held[:plotted].tolist(),
                  "robust_vectors": int((useful_held - eps / basis.robustness > 0).sum()),
                  "useful_vectors": int((useful_held > 0).sum())},
        "ensemble": {**scores(ensemble), "directions": int(ensemble_members(basis, useful_train, eps, rank).sum())},
        "containment": {**scores(containment), "robust_part": {"index": best, **scores(robust_part)}},
    }


# Gilmer & Hendrycks' frequency bands of the Fourier error map, by max(|u|, |v|) (our choice of edges).
LOW_BAND, HIGH_BAND = (0, 4), (12, 16)


def frequency(*, model: Sequence[str], norm: float = 4.0, severity: int = 5, cifar10c: str | None = None,
              corruption_examples: int | None = None, examples: int = 1000, seed: int = 0, batch_size: int = 250,
              data_dir: str | None = None) -> dict:
    """Gilmer & Hendrycks (SPEC 5.4): per model (``NAME=CKPT``), the error under Fourier-basis noise of L2 norm
    ``norm`` for every frequency on a seeded subset of the test set, its mean accuracy in a low and a high band
    and on each ring ``max(|u|, |v|) = r`` (``radial_acc[r]``: the profile the bands summarise), and the accuracy
    under CIFAR-10-C fog and contrast at ``severity`` (the files of ``cifar10c`` when given, else generated) on
    the test set (or a seeded subset of ``corruption_examples``)."""
    import torch

    from attacks.fourier import band_error, fourier_error_map
    from common.tensors import as_float_images
    from datamodules import CIFAR10CDataModule

    models = named_models(model, "frequency")
    device = _device()
    x, y = (t.to(device) for t in cifar_test_subset(examples, seed, data_dir))
    corrupted = {}
    keep = None if corruption_examples is None else seeded_subset(CIFAR10_TEST_SIZE, corruption_examples, seed).tolist()
    for corruption in ("fog", "contrast"):
        dm = CIFAR10CDataModule(data_dir=data_dir, corruption=corruption, severity=severity, folder=cifar10c,
                                test_indices=keep)  # only the subset is corrupted, as it is in the whole set
        dm.setup("test")
        cx, cy = dm.test
        corrupted[corruption] = (cx, cy, "CIFAR-10-C files" if dm.has_files(corruption) else "generated")

    def accuracy(net, images: torch.Tensor, labels: torch.Tensor) -> float:
        right = 0
        with torch.no_grad():
            for start in range(0, len(labels), batch_size):
                part = as_float_images(images[start:start + batch_size]).to(device)
                right += int((net(part).argmax(1).cpu() == labels[start:start + batch_size].cpu()).sum())
        return right / len(labels)

    results = {"examples": examples, "seed": seed, "norm": norm, "severity": severity,
               "bands": {"low": list(LOW_BAND), "high": list(HIGH_BAND)},
               "corruptions": {c: {"examples": len(v[1]), "source": v[2]} for c, v in corrupted.items()},
               "models": {}}
    for name, path in each_model(models, "frequency"):
        start = time.monotonic()
        net = _model(path).eval()
        errors = fourier_error_map(net, x, y, norm=norm, seed=seed, batch_size=batch_size)
        results["models"][name] = {
            "checkpoint": path, "clean_acc": accuracy(net, x, y),
            "low_band_acc": 1 - band_error(errors, *LOW_BAND), "high_band_acc": 1 - band_error(errors, *HIGH_BAND),
            "radial_acc": [1 - band_error(errors, r, r) for r in range(len(errors) // 2 + 1)],
            **{f"{c}_acc": accuracy(net, cx, cy) for c, (cx, cy, _) in corrupted.items()},
            "error_map": errors.tolist(), "seconds": round(time.monotonic() - start, 1)}
    return results


def layer_robustness(*, model: Sequence[str], eps: float = 0.5, steps: int = 20, layers: int = 4,
                     examples: int = 1000, seed: int = 0, batch_size: int = 250, data_dir: str | None = None) -> dict:
    """The rebuttal's layer robustness (SPEC 5.5): per model (``NAME=CKPT``), R(f) of its first ``layers`` layers
    and of its representation at L2 radius ``eps`` (the suite's choice: the sources give none; 0.5 is the
    adversarially trained model's radius), the worst case found by a ``steps``-step PGD ascending the distance
    (step 2.5 eps / steps), on a seeded subset of the real test set."""
    import torch

    from attacks.representation import layer_robustness as measure_layers

    device = _device()
    x, _ = cifar_test_subset(examples, seed, data_dir)
    results = {"examples": examples, "seed": seed, "eps": eps, "steps": steps, "models": {}}
    for name, path in each_model(named_models(model, "layer_robustness"), "layer_robustness"):
        start = time.monotonic()
        net = _model(path).eval()
        per_layer = measure_layers(net, x.to(device), count=layers, eps=eps, steps=steps,
                                   step_size=2.5 * eps / steps, generator=torch.Generator().manual_seed(seed),
                                   batch_size=batch_size)
        results["models"][name] = {"checkpoint": path, "layers": per_layer,
                                   "seconds": round(time.monotonic() - start, 1)}
    return results


def inversion(*, model: Sequence[str], steps: int = 1000, step_size: float = 0.1, examples: int = 50,
              seed: int = 0, batch_size: int = 250, data_dir: str | None = None, out: Path | None = None) -> dict:
    """Representation inversion from noise (Nakano's question, SPEC 5.5): per model (``NAME=CKPT``), images that
    start as uniform noise (the suite's choice) and descend towards the representation of real test images (D_R's
    procedure: ``steps`` L2-normalised steps of ``step_size``). Measured: the pixel correlation of each result with
    its goal image (a robust model's inversions should look like them), the representation distance reached, and
    how often the model itself classifies the result as the goal's label. ``out``: where the figure goes."""
    import torch

    from attacks.representation import invert, pixel_correlation

    device = _device()
    x, y = (t.to(device) for t in cifar_test_subset(examples, seed, data_dir))
    noise = torch.rand(x.shape, generator=torch.Generator().manual_seed(seed)).to(device)
    results = {"examples": examples, "seed": seed, "steps": steps, "step_size": step_size, "start": "uniform noise",
               "noise_correlation": pixel_correlation(noise, x).mean().item(), "models": {}}
    inverted = {}
    for name, path in each_model(named_models(model, "inversion"), "inversion"):
        start = time.monotonic()
        net = _model(path).eval()
        parts = [invert(net, x[i:i + batch_size], noise[i:i + batch_size], steps=steps, step_size=step_size)
                 for i in range(0, len(x), batch_size)]
        z = torch.cat([p[0] for p in parts])
        distance = torch.cat([p[1]["representation_distance"] for p in parts])
        with torch.no_grad():
            own = torch.cat([net(z[i:i + batch_size]).argmax(1) for i in range(0, len(z), batch_size)])
        inverted[name] = z.cpu()
        results["models"][name] = {
            "checkpoint": path, "pixel_correlation": pixel_correlation(z, x).mean().item(),
            "representation_distance": distance.mean().item(), "own_label_rate": (own == y).float().mean().item(),
            "seconds": round(time.monotonic() - start, 1)}
    if out is not None:
        from pipeline.figures import inversion_grid

        results["figure"] = str(inversion_grid(x.cpu(), y.cpu(), inverted, Path(out) / "inversion_from_noise.png"))
    return results


def autoattack(*, model: Sequence[str], eps: Sequence[float] = (0.25, 0.5), version: str = "standard",
               aa_steps: int = AUTOATTACK_STEPS, aa_queries: int = AUTOATTACK_QUERIES, pgd_steps: int = SWEEP_STEPS,
               examples: int = 1000, seed: int = 0, batch_size: int = 250, data_dir: str | None = None) -> dict:
    """D_R under a stronger attack (SPEC 5.6: models trained on D_R were reported largely non-robust under
    AutoAttack): per model (``NAME=CKPT``), accuracy at each L2 ``eps`` under AutoAttack and, on the same seeded
    subset of the real test set, under the suite's PGD of the test sweep (``pgd_steps``: the scale's sweep steps,
    which the preset passes). ``version`` standard: APGD-CE, APGD-T, FAB-T and Square, torchattacks' components at
    the original's budgets (``aa_steps`` iterations, ``aa_queries`` Square queries: attacks/autoattack.py);
    plus / rand: torchattacks' own AutoAttack of that version, at its defaults."""
    import torchattacks

    from attacks import predict, robust_accuracy
    from attacks.autoattack import autoattack_standard

    if version not in ("standard", "plus", "rand"):
        raise ConfigError(f"autoattack: --version must be standard, plus or rand (torchattacks), got {version!r}")
    if aa_steps < 1 or aa_queries < 1:
        raise ConfigError(f"autoattack: --aa_steps and --aa_queries must be >= 1, got {aa_steps} and {aa_queries}")
    device = _device()
    x, y = (t.to(device) for t in cifar_test_subset(examples, seed, data_dir))
    described = (f"AutoAttack (standard: APGD-CE, APGD-T, FAB-T {aa_steps} iterations, Square {aa_queries} queries), "
                 f"torchattacks {torchattacks.__version__} components" if version == "standard" else
                 f"AutoAttack ({version}), torchattacks {torchattacks.__version__} re-implementation at its defaults")
    results = {"examples": examples, "seed": seed, "eps": list(eps), "norm": "l2", "pgd_steps": pgd_steps,
               "aa_steps": aa_steps, "aa_queries": aa_queries, "attack": described, "models": {}}
    models = named_models(model, "autoattack")
    points = len(models) * len(eps)
    for m, (name, path) in enumerate(models.items()):
        start = time.monotonic()
        net = _model(path).eval()
        right = predict(net, x, batch_size=batch_size) == y
        pgd = robust_accuracy(net, x, y, [("l2", e) for e in eps], steps=pgd_steps, batch_size=batch_size,
                              seed=seed)
        record = {"checkpoint": path, "clean_acc": right.float().mean().item(), "eps": {}}
        for j, (e, pgd_acc) in enumerate(zip(eps, pgd.values(), strict=True)):
            progress.report(f"autoattack: {name} at L2 {e:g}", m * len(eps) + j, points, "model-eps points",
                            force=True)
            attack = (autoattack_standard(net, e, "L2", steps=aa_steps, queries=aa_queries, seed=seed)
                      if version == "standard" else
                      torchattacks.AutoAttack(net, norm="L2", eps=e, version=version, n_classes=10, seed=seed))
            robust = right.clone()
            attacked = right.nonzero().flatten()  # a wrong clean prediction is wrong under every attack
            for part in attacked.split(batch_size):
                robust[part] = predict(net, attack(x[part], y[part]), batch_size=batch_size) == y[part]
            record["eps"][f"{e:g}"] = {"autoattack_acc": robust.float().mean().item(), "pgd_acc": pgd_acc}
        record["seconds"] = round(time.monotonic() - start, 1)
        results["models"][name] = record
    return results


def figure3_scalars(results: dict) -> dict[str, float]:
    """``figure3/<stage>/{accuracy,transfer}`` for every point that has both."""
    return {f"figure3/{p['stage']}/{k}": float(p[k]) for p in results["points"] for k in ("accuracy", "transfer")
            if p.get(k) is not None}


MEASURES = {"transfer": transfer, "figure3": figure3, "leakage": leakage, "goh_features": goh_features,
            "frequency": frequency, "layer_robustness": layer_robustness, "inversion": inversion,
            "autoattack": autoattack}
WRITES_FIGURE = ("inversion",)  # measures that draw their figure themselves, from tensors kept out of measure.json


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m pipeline.measure", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="measure", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--out", required=True, help="folder of measure.json")
    common.add_argument("--examples", type=int, default=1000, help="size of the seeded test subset")
    common.add_argument("--seed", type=int, default=0, help="seed of the test subset")
    common.add_argument("--batch_size", type=int, default=250)
    common.add_argument("--data_dir", default=None, help="CIFAR-10 folder (default: $BOF_DATA_DIR, else ./data)")
    common.add_argument("--logger_config", nargs="+", default=[], action="extend", metavar="YAML",
                        help="configs whose trainer.logger list the results go to (default: CSV + TensorBoard)")
    models = argparse.ArgumentParser(add_help=False)  # the measures of several named models
    models.add_argument("--model", nargs="+", required=True, metavar="NAME=CKPT", help="the models to measure")
    t = sub.add_parser("transfer", parents=[common], help=transfer.__doc__.splitlines()[0])
    t.add_argument("--target", required=True, help="checkpoint of the attacked model f")
    t.add_argument("--ensemble", nargs="+", required=True, help="checkpoints of the ensemble kept on the true label")
    t.add_argument("--fresh", required=True, help="checkpoint of an independently trained model")
    t.add_argument("--steps", type=int, default=NAKKIRAN_STEPS, help="attack steps")
    f = sub.add_parser("figure3", parents=[common], help=figure3.__doc__.splitlines()[0])
    f.add_argument("--source", required=True, help="checkpoint of the model D_det was made from")
    f.add_argument("--fresh", required=True, nargs="+",
                   help="per --ddet stage, a checkpoint of an independent standard model of that stage's architecture")
    f.add_argument("--ddet", required=True, nargs="+",
                   help="stage folders of models (one per architecture) trained on the D_det made from --source")
    f.add_argument("--transfer", required=True, help="stage folder of the transfer measurement")
    for name in ("nakkiran_l2", "nakkiran_linf", "pgd_l2", "pgd_linf"):
        f.add_argument(f"--{name}", default=None, help="stage folder of that D_det-style dataset's model")
    g = sub.add_parser("leakage", parents=[common], help=leakage.__doc__.splitlines()[0])
    g.add_argument("--features", required=True, help="checkpoint of the certified linear model (robust_linear)")
    for name in ("d_rand", "d_det", "released_d_rand", "released_d_det"):
        g.add_argument(f"--{name}", default=None, help="folder of the finished stage that trained on that dataset")
    h = sub.add_parser("goh_features", parents=[common], help=goh_features.__doc__.splitlines()[0])
    h.add_argument("--classes", nargs=2, default=["truck", "frog"], help="the +1 and the -1 class")
    h.add_argument("--eps", type=float, default=1.0, help="L2 radius of the adversary (Goh: 1)")
    h.add_argument("--rank", type=int, default=100, help="the ensemble sums non-robust vectors among this many")
    h.add_argument("--alpha", type=float, default=0.25, help="containment: the robust direction's share")
    q = sub.add_parser("frequency", parents=[common, models], help=frequency.__doc__.splitlines()[0])
    q.add_argument("--norm", type=float, default=4.0, help="L2 norm of the Fourier-basis noise (Yin et al.: 4)")
    q.add_argument("--severity", type=int, default=5, help="CIFAR-10-C severity of fog and contrast (1..5)")
    q.add_argument("--cifar10c", default=None, help="folder of the CIFAR-10-C .npy files (default: generate)")
    q.add_argument("--corruption_examples", type=int, default=None, help="a seeded subset of the corrupted test set")
    r = sub.add_parser("layer_robustness", parents=[common, models], help=layer_robustness.__doc__.splitlines()[0])
    r.add_argument("--eps", type=float, default=0.5, help="L2 radius of the ball (the suite's choice)")
    r.add_argument("--steps", type=int, default=20, help="PGD steps of the worst case")
    r.add_argument("--layers", type=int, default=4, help="how many first layers (besides the representation)")
    v = sub.add_parser("inversion", parents=[common, models], help=inversion.__doc__.splitlines()[0])
    v.add_argument("--steps", type=int, default=1000, help="inversion steps (D_R's)")
    v.add_argument("--step_size", type=float, default=0.1, help="L2 length of each step (D_R's)")
    v.set_defaults(examples=50)  # goal images (the suite's choice; a figure shows one per class)
    a = sub.add_parser("autoattack", parents=[common, models], help=autoattack.__doc__.splitlines()[0])
    a.add_argument("--eps", type=float, nargs="+", default=[0.25, 0.5], help="L2 radii")
    a.add_argument("--version", default="standard", help="torchattacks AutoAttack version: standard, plus, rand")
    a.add_argument("--aa_steps", type=int, default=AUTOATTACK_STEPS,
                   help="iterations of APGD-CE, APGD-T and FAB-T (standard; the original's 100)")
    a.add_argument("--aa_queries", type=int, default=AUTOATTACK_QUERIES,
                   help="queries of Square (standard; the original's 5,000)")
    a.add_argument("--pgd_steps", type=int, default=SWEEP_STEPS, help="steps of the PGD beside it (the sweep's)")
    return p


def main(argv: Sequence[str] | None = None) -> dict:
    args = vars(parser().parse_args(argv))
    name, out, logger_configs = args.pop("measure"), Path(args.pop("out")), args.pop("logger_config")
    out.mkdir(parents=True, exist_ok=True)
    results = MEASURES[name](**args, **({"out": out} if name in WRITES_FIGURE else {}))
    write_json_atomic(out / "measure.json", results)
    print(json.dumps(results, indent=1, default=float))
    log(name, out, args, results, logger_configs)
    return results


def log(name: str, out: Path, args: dict, results: dict, logger_configs: Sequence[str]) -> None:
    """The measurement to the loggers: its numbers, its arguments and (Figure 3) the scatter plot."""
    from pipeline.claims import Results
    from pipeline.figures import figure3 as figure3_plot
    from pipeline.figures import fourier_heat_maps as frequency_plot
    from pipeline.figures import goh_features as goh_plot
    from pipeline.figures import layer_robustness as layer_plot
    from pipeline.measure_loggers import log_measurement, scalars

    figures = {}
    if name == "figure3":
        metrics = figure3_scalars(results)
        png = figure3_plot(Results({"figure3": {"results": results}}), out / "figure3_transfer.png")
        figures = {"figure3/transfer_vs_accuracy": png} if png else {}
    elif name == "goh_features":
        metrics = {f"goh/{feature}/{k}": results[feature][k] for feature in ("ensemble", "containment")
                   for k in ("usefulness", "robust_usefulness", "robustness")}
        png = goh_plot(Results({"goh_features": {"results": results}}), out / "goh_features.png")
        figures = {"goh/usefulness_vs_robustness": png} if png else {}
    elif name == "frequency":
        metrics = {f"frequency/{m}/{k}": v[k] for m, v in results["models"].items()
                   for k in ("clean_acc", "low_band_acc", "high_band_acc", "fog_acc", "contrast_acc")}
        png = frequency_plot(Results({"frequency": {"results": results}}), out / "fourier_heat_maps.png")
        figures = {"frequency/fourier_heat_maps": png} if png else {}
    elif name == "layer_robustness":
        metrics = {f"layer_robustness/{m}/{layer.split()[0]}": v["R"] for m, record in results["models"].items()
                   for layer, v in record["layers"].items()}
        png = layer_plot(Results({"layer_robustness": {"results": results}}), out / "layer_robustness.png")
        figures = {"layer_robustness/R_by_layer": png} if png else {}
    elif name == "inversion":
        metrics = {f"inversion/{m}/{k}": v[k] for m, v in results["models"].items()
                   for k in ("pixel_correlation", "representation_distance", "own_label_rate")}
        figures = {"inversion/from_noise": Path(results["figure"])} if results.get("figure") else {}
    elif name == "autoattack":
        metrics = {f"autoattack/{m}/{k}_l2_{e}": v[f"{k}_acc"] for m, record in results["models"].items()
                   for e, v in record["eps"].items() for k in ("autoattack", "pgd")}
    elif name == "leakage":
        sets = {k: v for k, v in results.items() if isinstance(v, dict) and "accuracy" in v}
        metrics = {f"leakage/{k}": v["accuracy"] for k, v in sets.items()}
        metrics |= {f"leakage/{k}_alignment": v["label_alignment"] for k, v in sets.items() if "label_alignment" in v}
    else:
        metrics = scalars({k: v for k, v in results.items() if k in NAKKIRAN_ATTACKS}, name)
    params = {k: " ".join(map(str, v)) if isinstance(v, list) else v for k, v in args.items() if v is not None}
    log_measurement(out, name, metrics, params, figures, logger_configs)


if __name__ == "__main__":
    main()
