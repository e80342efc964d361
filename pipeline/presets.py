"""The stage graphs: ``quick`` (a short taste, CPU), ``mini`` (CPU, fast CNN), ``paper`` (the papers' recipes, GPUs)
and ``tiny`` (CI tests).

``mini`` and ``paper`` are one graph over two config folders (SPEC sections in brackets):

    standard, adversarial_l2                          baseline models [1]
    fresh                                             the standard config, seed 100: Figure 3's transfer target
    standard_<family>, ensemble_seed_1..k, fresh_<family>   Nakkiran's target, members and fresh model [4.1]: the
                                                      standard config plus the family's arguments, seeds 0, 1..k,
                                                      100 (paper: resnet18; mini: nowhiten, i.e.
                                                      configs/mini/nakkiran_model.yaml); no family: the standard
                                                      model is the target and ``fresh`` the fresh model
    d_rand, d_det            <- standard              Table 1 [3]
    d_robust                 <- adversarial_l2        D_R [2]
    d_nonrobust              <- standard              D_NR [2]
    nakkiran_ddet_{l2,linf}  <- target + ensemble     D_det of non-transferable examples [4.2]
    pgd_ddet_{l2,linf}       <- target                the same with plain PGD [4.2]
    transfer                 <- target, ensemble, fresh_<family>   (measure) the transfer table [4.1]
    squares (tests: the 20-epoch and the 1-epoch network) adversarial squares [4.3]
    robust_linear                                     Goh's certified linear model [5.1]
    leakage                  <- robust_linear, d_rand, d_det   (measure) robust feature leakage [5.1]
    goh_features                                      (measure) useful non-robust linear features [5.2]
    gaussian_noise                                    the standard config trained with Gaussian noise [5.4]
    frequency                <- standard, adversarial_l2, gaussian_noise   (measure) Fourier noise, fog [5.4]
    layer_robustness         <- standard, adversarial_l2, fresh_<arch>   (measure) R(f) layer by layer [5.5]
    inversion                <- standard, adversarial_l2   (measure) representation inversion from noise [5.5]
    autoattack               <- standard, adversarial_l2, d_robust, d_nonrobust   (measure) AutoAttack vs PGD [5.6]
    wallace_labeller, wallace_errors <- wallace_labeller   a model trained on another's errors only [5.3]
    mnist_cnn, wallace_fashion(_moments) <- mnist_cnn  MNIST labels on Fashion-MNIST, tested on MNIST [5.3]
    fresh_<arch>, d_det_<arch>  <- standard           Figure 3's other architectures (paper: ResNet-18, VGG-16)
    figure3                  <- the D_det-style stages, transfer, fresh(_<arch>)   (measure) Figure 3 [3]
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from common.attack_settings import SWEEP_STEPS
from common.errors import ConfigError
from pipeline.stages import (
    NO_SWEEP,
    REPO,
    TEST,
    TEST_AND_SHIFTED,
    Stage,
    Test,
    check_graph,
    ckpt_list,
    measure_stage,
    train_stage,
)

NORMS = ("l2", "linf")
SQUARES_TESTS = (*TEST, Test("test_1epoch", checkpoint="after_1_epoch.ckpt"))


FREQUENCY_MODELS = ("standard", "adversarial_l2", "gaussian_noise")  # Gilmer & Hendrycks' three models [5.4]
AUTOATTACK_MODELS = ("standard", "adversarial_l2", "d_robust", "d_nonrobust")  # is D_R's robustness real? [5.6]


def sweep_steps(configs: str) -> int:
    """The PGD steps of a scale's test sweep: RobustAccuracy's ``test_steps`` in ``<configs>/base.yaml``, else the
    callback's default. Read from the config so that the AutoAttack stage's PGD is the sweep's, without a copy."""
    import yaml

    base = yaml.safe_load((REPO / configs / "base.yaml").read_text()) or {}
    for callback in (base.get("trainer") or {}).get("callbacks") or []:
        if str(callback.get("class_path", "")).endswith("RobustAccuracy"):
            return int((callback.get("init_args") or {}).get("test_steps", SWEEP_STEPS))
    return SWEEP_STEPS


def debate(configs: str, *, ensemble: int, transfer_examples: int, frequency_examples: int, autoattack_examples: int,
           nakkiran: tuple[str, Sequence[str]] | None = None, constructed: Sequence[str] = (),
           helpers: Sequence[str] = (), figure3_archs: Sequence[tuple[str, Sequence[str]]] = ()) -> list[Stage]:
    """The whole debate over the configs in ``configs``: every train stage stacks ``<configs>/base.yaml`` (what
    the scale's experiments share) and an experiment's file (what differs).

    Args:
        ensemble: number of extra standard models (seeds 1..k) of Nakkiran's ensemble.
        transfer_examples: size of the seeded subset of the real test set the measure stages attack.
        frequency_examples: test images under each Fourier-basis noise (514 frequencies per model).
        autoattack_examples: test images under AutoAttack (the costliest attack of the graph) and the same PGD.
        nakkiran: ``(name, args)``: Nakkiran's target, ensemble and fresh model are the standard config plus
            ``args`` (e.g. another architecture), in stages of their own (``standard_<name>``, ``fresh_<name>``);
            None: they are the standard model, seeds 1..k and ``fresh``.
        constructed: arguments added to every stage that trains on a constructed dataset (e.g. its cache_dir).
        helpers: arguments added to the ensemble members and the fresh model, which only serve as attack
            sources and transfer targets (e.g. fewer epochs, no attack sweep).
        figure3_archs: ``(name, args)`` per extra architecture of Figure 3: ``d_det_<name>`` trains the standard
            config's model plus ``args`` on the same (cached) D_det, ``fresh_<name>`` is that architecture
            trained on clean data (seed 100; shared with Nakkiran's fresh model when ``name`` is its family).
            Figure 3 attacks with the recipe the D_det run recorded (its ``constructed.json``).
    """
    def train(name: str, experiment: str, *args: str, **kwargs) -> Stage:
        return train_stage(name, f"{configs}/{experiment}.yaml", *args, base=[f"{configs}/base.yaml"], **kwargs)

    def on(*sources: str) -> list[str]:
        return [*constructed, "--data.init_args.sources", ckpt_list(*sources)]

    family, arch = nakkiran or ("", ())
    target = f"standard_{family}" if nakkiran else "standard"
    fresh = f"fresh_{family}" if nakkiran else "fresh"  # for the transfer table
    members = [f"ensemble_seed_{i}" for i in range(1, ensemble + 1)]
    nakkiran_models = [] if nakkiran is None else [
        train(target, "standard", *arch),
        train(fresh, "standard", *arch, *helpers, "--seed_everything", "100")]
    # Figure 3's architectures: a model of each trained on D_det, and one trained on clean data (transfer target).
    arch_points = [("d_det", "fresh"), *((f"d_det_{name}", f"fresh_{name}") for name, _ in figure3_archs)]
    figure3_models = [stage for name, args in figure3_archs for stage in (
        *([] if name == family else [train(f"fresh_{name}", "standard", *args, *helpers, "--seed_everything", "100")]),
        train(f"d_det_{name}", "d_det", *on("standard"), *args, deps=["standard"]))]
    other_standard = [f"fresh_{name}" for name, _ in figure3_archs]  # standard models of other architectures
    return [
        train("standard", "standard"),
        train("adversarial_l2", "adversarial_l2"),
        *nakkiran_models,
        *(train(m, "standard", *arch, *helpers, "--seed_everything", str(i)) for i, m in enumerate(members, 1)),
        train("fresh", "standard", *helpers, "--seed_everything", "100"),
        train("d_rand", "d_rand", *on("standard"), deps=["standard"]),
        train("d_det", "d_det", *on("standard"), deps=["standard"], tests=TEST_AND_SHIFTED),
        train("d_robust", "d_robust", *on("adversarial_l2"), deps=["adversarial_l2"]),
        train("d_nonrobust", "d_nonrobust", *on("standard"), deps=["standard"]),
        *(train(f"nakkiran_ddet_{n}", f"nakkiran_ddet_{n}", *on(target, *members), deps=[target, *members],
                tests=TEST_AND_SHIFTED) for n in NORMS),
        *(train(f"pgd_ddet_{n}", f"pgd_ddet_{n}", *on(target), deps=[target], tests=TEST_AND_SHIFTED)
          for n in NORMS),
        measure_stage("transfer", "transfer", "--target", f"{{ckpt:{target}}}",
                      "--ensemble", *(f"{{ckpt:{m}}}" for m in members), "--fresh", f"{{ckpt:{fresh}}}",
                      "--examples", str(transfer_examples), deps=[target, *members, fresh]),
        # One fit gives both of Nakkiran's networks: the config also saves the weights after epoch 1.
        train("squares", "squares", tests=SQUARES_TESTS),
        *figure3_models,
        # Figure 3: each D_det point pairs a model trained on D_det with an independent one of its architecture.
        measure_stage("figure3", "figure3", "--source", "{ckpt:standard}",
                      "--fresh", *(f"{{ckpt:{f}}}" for _, f in arch_points),
                      "--ddet", *(f"{{dir:{d}}}" for d, _ in arch_points), "--transfer", "{dir:transfer}",
                      *(a for n in NORMS for a in (f"--nakkiran_{n}", f"{{dir:nakkiran_ddet_{n}}}",
                                                   f"--pgd_{n}", f"{{dir:pgd_ddet_{n}}}")),
                      "--examples", str(transfer_examples),
                      deps=["standard", *(s for pair in arch_points for s in pair), "transfer",
                            *(f"{k}_ddet_{n}" for k in ("nakkiran", "pgd") for n in NORMS)]),
        # Goh's robust feature leakage [5.1]: D_rand / D_det seen through a certified linear model's 10 logits.
        train("robust_linear", "robust_linear"),
        measure_stage("leakage", "leakage", "--features", "{ckpt:robust_linear}", "--d_rand", "{dir:d_rand}",
                      "--d_det", "{dir:d_det}", "--examples", "10000", deps=["robust_linear", "d_rand", "d_det"]),
        # Gilmer & Hendrycks [5.4]: a noise-trained model beside the standard and the adversarial one, under
        # Fourier-basis noise and CIFAR-10-C's low-frequency corruptions.
        train("gaussian_noise", "gaussian_noise"),
        measure_stage("frequency", "frequency", "--model", *(f"{m}={{ckpt:{m}}}" for m in FREQUENCY_MODELS),
                      "--examples", str(frequency_examples), deps=list(FREQUENCY_MODELS)),
        # D_R under a stronger attack [5.6]: torchattacks' AutoAttack beside the test sweep's PGD.
        measure_stage("autoattack", "autoattack", "--model", *(f"{m}={{ckpt:{m}}}" for m in AUTOATTACK_MODELS),
                      "--examples", str(autoattack_examples), "--pgd_steps", str(sweep_steps(configs)),
                      deps=list(AUTOATTACK_MODELS)),
        # The rebuttal and Nakano [5.5]: R(f) layer by layer for the standard model, the other standard
        # architectures and the robust one; inversion from noise for the standard and the robust model.
        measure_stage("layer_robustness", "layer_robustness", "--model",
                      *(f"{m}={{ckpt:{m}}}" for m in ("standard", "adversarial_l2", *other_standard)),
                      "--examples", str(transfer_examples), deps=["standard", "adversarial_l2", *other_standard]),
        measure_stage("inversion", "inversion", "--model", "standard={ckpt:standard}",
                      "adversarial_l2={ckpt:adversarial_l2}", deps=["standard", "adversarial_l2"]),
        # Goh [5.2]: useful non-robust linear features of truck vs frog (the whole two-class test set held out).
        measure_stage("goh_features", "goh_features", "--examples", "2000"),
        # Wallace [5.3]: a fresh model taught by a labeller's errors alone; an MNIST model's labels on Fashion-MNIST.
        train("wallace_labeller", "wallace_labeller"),
        train("wallace_errors", "wallace_errors", *on("wallace_labeller"), deps=["wallace_labeller"]),
        *wallace_mnist(configs, on),
    ]


def wallace_mnist(configs: str, on: Callable[..., list[str]], *args: str, base: Sequence[str] = ()) -> list[Stage]:
    """Wallace's MNIST -> Fashion-MNIST stages [5.3]: each stacks the MNIST network overlay on the scale's base;
    ``wallace_fashion_moments`` rescales the images to MNIST's pixel statistics first."""
    def mnist(name: str, experiment: str, *more: str, **kwargs) -> Stage:
        return train_stage(name, f"{configs}/{experiment}.yaml", *args, *more, **kwargs,
                           base=[f"{configs}/base.yaml", *base, f"{configs}/mnist_model.yaml"])

    return [mnist("mnist_cnn", "mnist_cnn"),
            mnist("wallace_fashion", "wallace_fashion", *on("mnist_cnn"), deps=["mnist_cnn"]),
            mnist("wallace_fashion_moments", "wallace_fashion", *on("mnist_cnn"),
                  "--data.init_args.recipe.init_args.moments_of", "mnist", deps=["mnist_cnn"])]


# The mini graph's arguments; quick() is the same graph's headline stages at smaller sizes.
MINI = {"ensemble": 3, "transfer_examples": 500, "frequency_examples": 200, "autoattack_examples": 100,
        "nakkiran": ("nowhiten", ["--config", "configs/mini/nakkiran_model.yaml"]),
        "figure3_archs": [("nowhiten", ["--model.init_args.arch_kwargs", "{whiten: false}"])],
        "constructed": ["--data.init_args.cache_dir", "{out}/constructed"],
        "helpers": ["--config", NO_SWEEP, "--trainer.max_epochs", "4"]}


def mini() -> list[Stage]:
    """CPU preset: configs/mini (whitened fast CNN, real CIFAR-10). Nakkiran's target, 3 ensemble members and
    fresh model are the fast CNN without whitening (configs/mini/nakkiran_model.yaml); they and Figure 3's fresh
    model train 4 epochs instead of 8 without the attack sweep (they are attack sources and transfer targets only).
    Figure 3's second architecture is that unwhitened fast CNN (``d_det_nowhiten``, transfer target
    ``fresh_nowhiten``).
    Transfer and Figure 3 measurements on 500 test images, constructed datasets cached under OUT/constructed.
    Target: 120 minutes on 2 cores; the measured time per stage is in docs/RESULTS.md."""
    return debate("configs/mini", **MINI)


# The quick preset: a short taste of both papers' headline, the mini graph's stages for it with smaller sizes and
# other epochs only (our choices, not the papers'): the standard model as in mini, Nakkiran's target and 2 ensemble
# members (mini: 3) 2 epochs (mini: 4), D_det from 20,000 training images (mini: 50,000) and its student 12 epochs
# over them (mini: 8 over 50,000; 240,000 image passes against 400,000), Nakkiran's non-transferable D_det from 5,000
# (mini: 10,000). Chosen on held-out real training images outside the D_det subset, never the test set: the
# student's accuracy falls with a weaker source (4- / 6- / 8-epoch standard: 14.5 / 20.4 / 22.0% at 8 epochs) and
# rises with its epochs (8-epoch source: 22.0 / 24.6 / 26.1% at 8 / 12 / 16; docs/RESULTS.md, "The quick preset").
# Keys differ from mini's (the preset is part of them), so `--preset mini` trains its own models: a reproduction
# folder holds one preset, and the runner never reuses a stage whose key differs.
QUICK: Mapping[str, tuple[str, ...]] = {
    "standard": (),
    **{name: ("--trainer.max_epochs", "2") for name in ("standard_nowhiten", "ensemble_seed_1", "ensemble_seed_2")},
    "d_det": ("--data.init_args.train_size", "20000", "--trainer.max_epochs", "12"),
    "nakkiran_ddet_l2": ("--data.init_args.train_size", "5000"),
}


def quick() -> list[Stage]:
    """About 20 minutes on 2 cores (docs/RESULTS.md): a standard model, Ilyas' D_det from it (the student learns
    the true task), and Nakkiran's D_det of non-transferable examples (the student stays near chance). Sizes:
    ``QUICK``."""
    stages = debate("configs/mini", **{**MINI, "ensemble": 2})
    return [dataclasses.replace(s, overrides=(*s.overrides, *QUICK[s.name])) for s in stages if s.name in QUICK]


def paper() -> list[Stage]:
    """The papers' recipes: configs/cifar10 (Ilyas: ResNet-50; Nakkiran: ResNet-18 target, 10 ResNet-18 ensemble
    members, a fresh ResNet-18). Pass the hardware through, e.g. ``--trainer.accelerator gpu --trainer.devices 8
    --trainer.strategy ddp``."""
    return debate("configs/cifar10", ensemble=10, transfer_examples=1000, frequency_examples=1000,
                  autoattack_examples=1000,
                  nakkiran=("resnet18", ["--model.init_args.arch", "resnet18"]),
                  figure3_archs=[(a, ["--model.init_args.arch", a]) for a in ("resnet18", "vgg16")])


TINY = ("--config", "configs/ci/tiny.yaml")  # 512 images, 2 batches, a 4-point sweep on 100 test images


def tiny() -> list[Stage]:
    """CI only: seconds-long stages on a real CIFAR-10 subset, the constructed data cached under OUT."""
    constructed = ["--data.init_args.cache_dir", "{out}/constructed", "--data.init_args.progress_bar", "false"]

    def on(*sources: str) -> list[str]:
        return [*constructed, "--data.init_args.sources", ckpt_list(*sources)]

    def train(name: str, experiment: str, *args: str, **kwargs) -> Stage:
        return train_stage(name, f"configs/mini/{experiment}.yaml", *TINY, *args, base=["configs/mini/base.yaml"],
                           **kwargs)

    return [
        train("standard", "standard"),
        train("ensemble_seed_1", "standard", "--seed_everything", "1"),
        train("fresh", "standard", "--seed_everything", "100"),
        train("d_det", "d_det", *on("standard"), deps=["standard"], tests=TEST_AND_SHIFTED),
        measure_stage("transfer", "transfer", "--target", "{ckpt:standard}", "--ensemble", "{ckpt:ensemble_seed_1}",
                      "--fresh", "{ckpt:fresh}", "--examples", "50", "--steps", "2",
                      deps=["standard", "ensemble_seed_1", "fresh"]),
        measure_stage("figure3", "figure3", "--source", "{ckpt:standard}", "--fresh", "{ckpt:fresh}",
                      "--ddet", "{dir:d_det}", "--transfer", "{dir:transfer}", "--examples", "50",
                      deps=["standard", "fresh", "d_det", "transfer"]),
        train("robust_linear", "robust_linear", "--model.init_args.arch_kwargs", "{}"),  # not the overlay's widths
        measure_stage("leakage", "leakage", "--features", "{ckpt:robust_linear}", "--d_det", "{dir:d_det}",
                      "--examples", "100", deps=["robust_linear", "d_det"]),
        train("gaussian_noise", "gaussian_noise"),
        measure_stage("frequency", "frequency", "--model", "standard={ckpt:standard}",
                      "gaussian_noise={ckpt:gaussian_noise}", "--examples", "20", "--corruption_examples", "500",
                      deps=["standard", "gaussian_noise"]),
        *(measure_stage(name, name, "--model", "standard={ckpt:standard}", "gaussian_noise={ckpt:gaussian_noise}",
                        "--examples", examples, "--steps", "2", deps=["standard", "gaussian_noise"])
          for name, examples in (("layer_robustness", "20"), ("inversion", "10"))),
        measure_stage("autoattack", "autoattack", "--model", "standard={ckpt:standard}",
                      "gaussian_noise={ckpt:gaussian_noise}", "--examples", "5", "--aa_steps", "5",
                      "--aa_queries", "50", deps=["standard", "gaussian_noise"]),
        measure_stage("goh_features", "goh_features", "--examples", "200"),
        # Wallace [5.3]: the standard model labels (the mini labeller is the same config stopped early), and the
        # MNIST pair without the rescaled variant (a recipe option, tests/test_wallace.py).
        train("wallace_errors", "wallace_errors", *on("standard"), deps=["standard"]),
        *wallace_mnist("configs/mini", on, *TINY, "--model.init_args.arch_kwargs", "{}")[:2],  # simple_cnn: no widths
    ]


# The paper preset's rehearsal (`reproduce --preset paper --rehearse`): the same graph, networks, losses, threat
# models, optimisers, schedules' shapes and precision, with only sizes cut so that it runs on a CPU. Our choices
# (not the papers'): 1 epoch (squares: 2, so its two networks differ) of 2 batches of 256 training images, one
# validation and one test batch of 100, 2 steps for every attack and inversion, 20 images per attack evaluation.
REHEARSAL_TRAIN = ("--trainer.max_epochs", "1", "--trainer.limit_train_batches", "2",
                   "--trainer.limit_val_batches", "1", "--trainer.limit_test_batches", "1",
                   "--data.init_args.train_size", "256", "--data.init_args.eval_batch_size", "100")
REHEARSAL_EXPERIMENT = {  # by the experiment's config name; every other train stage: the overlay alone
    "squares": ("--config", "configs/ci/rehearsal_squares.yaml", "--trainer.max_epochs", "2",
                "--data.init_args.test_size", "100"),
    "adversarial_l2": ("--config", "configs/ci/rehearsal.yaml", "--model.init_args.steps", "2"),
    **{name: ("--config", "configs/ci/rehearsal.yaml", "--data.init_args.recipe.init_args.steps", "2")
       for name in ("d_rand", "d_det", "d_robust", "d_nonrobust", *(f"{kind}_ddet_{n}" for kind in ("nakkiran", "pgd")
                                                                      for n in NORMS))},
}
REHEARSAL_MEASURE: Mapping[str, tuple[str, ...]] = {"transfer": ("--examples", "20", "--steps", "2"),
                                                    "figure3": ("--examples", "20"), "leakage": ("--examples", "100"),
                                                    "goh_features": ("--examples", "200"),
                                                    "frequency": ("--examples", "4", "--corruption_examples", "20"),
                                                    "layer_robustness": ("--examples", "20", "--steps", "2"),
                                                    "inversion": ("--examples", "10", "--steps", "2"),
                                                    "autoattack": ("--examples", "10", "--pgd_steps", "2",
                                                                   "--aa_steps", "2", "--aa_queries", "20")}


def rehearsal(stages: Sequence[Stage]) -> list[Stage]:
    """``stages`` with the rehearsal's overrides appended (a later value of an option wins)."""
    def cut(stage: Stage) -> tuple[str, ...]:
        if stage.kind == "measure":
            return REHEARSAL_MEASURE[stage.measure]
        experiment = stage.config.rsplit("/", 1)[-1].removesuffix(".yaml")
        return (*REHEARSAL_TRAIN, *REHEARSAL_EXPERIMENT.get(experiment, ("--config", "configs/ci/rehearsal.yaml")))

    return [dataclasses.replace(s, overrides=(*s.overrides, *cut(s))) for s in stages]


# The authors' released datasets (Ilyas et al., the folders of their release archive) by the stage that
# constructs the same dataset here. A released stage trains and tests exactly as that stage does (same config,
# student, epochs and training-set size: the two rows differ only by the data), on the released files.
RELEASED = {"d_robust": "d_robust_CIFAR", "d_nonrobust": "d_non_robust_CIFAR", "d_rand": "drand_CIFAR",
            "d_det": "ddet_CIFAR"}
RELEASED_PREFIX = "released_"
RELEASED_FILES = ("CIFAR_ims", "CIFAR_lab")  # datamodules/released.py


def without_option(args: Sequence[str], flag: str) -> tuple[str, ...]:
    """``args`` without every ``flag VALUE`` pair."""
    kept, skip = [], False
    for arg in args:
        if not skip and arg == flag:
            skip = True
            continue
        if not skip:
            kept.append(arg)
        skip = False
    return tuple(kept)


def with_released(stages: Sequence[Stage], folder: str | Path) -> list[Stage]:
    """``stages`` plus ``released_<stage>`` for each dataset of ``RELEASED`` found under ``folder`` whose stage
    the graph has: that stage's commands on ``datamodules.ReleasedDataModule`` (a later ``--data`` replaces the
    constructed datamodule; its own arguments, such as ``sources``, fall away), depending on nothing."""
    root = Path(folder).resolve()
    by_name = {s.name: s for s in stages}
    found = {name: root / sub for name, sub in RELEASED.items() if (root / sub).is_dir()}
    if not found:
        raise ConfigError(f"--released {folder}: no released dataset folder there ({', '.join(RELEASED.values())}); "
                          "pass the folder that holds them (the authors' release_datasets)")
    added = []
    for name, path in found.items():
        if name not in by_name:
            continue
        if missing := [f for f in RELEASED_FILES if not (path / f).is_file()]:
            raise ConfigError(f"--released: {path} lacks {', '.join(missing)}; download the dataset again")
        stage = by_name[name]
        own = without_option(stage.overrides, "--data.init_args.sources")  # it needs no source model
        added.append(dataclasses.replace(
            stage, name=RELEASED_PREFIX + name, deps=(), inputs=tuple(str(path / f) for f in RELEASED_FILES),
            overrides=(*own, "--data", "datamodules.ReleasedDataModule", "--data.init_args.folder", str(path))))
    if not added:
        raise ConfigError(f"--released {folder}: it holds {', '.join(RELEASED[n] for n in found)}, but this preset "
                          f"constructs none of them ({', '.join(n for n in RELEASED if n in by_name) or 'none'})")
    # Goh's leakage measure also scores the released D_rand / D_det: it moves after them, with their folders.
    names = {s.name for s in added}
    extra = [n for n in (f"{RELEASED_PREFIX}d_rand", f"{RELEASED_PREFIX}d_det") if n in names]
    if "leakage" in by_name and extra:
        leakage = by_name["leakage"]
        folders = [a for n in extra for a in (f"--{n}", f"{{dir:{n}}}")]
        moved = dataclasses.replace(leakage, deps=(*leakage.deps, *extra), overrides=(*leakage.overrides, *folders))
        return [*(s for s in stages if s.name != "leakage"), *added, moved]
    return [*stages, *added]


PRESETS: dict[str, Callable[[], list[Stage]]] = {"quick": quick, "mini": mini, "paper": paper, "tiny": tiny}


def preset(name: str, *, rehearse: bool = False) -> list[Stage]:
    """The checked stage graph of a preset (``rehearse``: at the rehearsal's sizes, paper preset only)."""
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    if rehearse and name != "paper":
        raise ConfigError(f"--rehearse rehearses the paper preset at reduced sizes; {name!r} is small already. "
                          "Use --preset paper --rehearse")
    stages = PRESETS[name]()
    check_graph(stages)
    return rehearsal(stages) if rehearse else stages
