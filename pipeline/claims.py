"""The papers' tables as rows: the published number, the suite's number, and the qualitative claim as a small
predicate whose threshold is written in its text. A row whose stages have not run evaluates to None
("not run"), never to an error.

Numbers are fractions in [0, 1] unless a row says otherwise (``percent=False``).
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass

from common.attack_settings import NAKKIRAN_ATTACKS, eps_text

CHANCE = 0.10  # CIFAR-10


class Results:
    """Read access to the stage records (``stage.json`` contents; None for a stage that has not run)."""

    def __init__(self, records: Mapping[str, dict | None]) -> None:
        self.records = records

    def _results(self, stage: str) -> dict:
        return (self.records.get(stage) or {}).get("results") or {}

    def metric(self, stage: str, key: str, test: str = "test") -> float | None:
        return self._results(stage).get(test, {}).get("metrics", {}).get(key)

    def sweep(self, stage: str, norm: str, eps: float, test: str = "test") -> float | None:
        for row in self._results(stage).get(test, {}).get("sweep", []):
            if row["norm"] == norm and abs(row["eps"] - eps) < 1e-6:
                return row["robust_acc"]
        return None

    def measured(self, stage: str, *path: str) -> float | None:
        value = self._results(stage)
        for key in path:
            value = value.get(key) if isinstance(value, dict) else None
        return value

    def constructed(self, stage: str, key: str) -> float | None:
        """A field of the record of the constructed set a train stage trained on (``constructed.json``)."""
        return ((self.records.get(stage) or {}).get("constructed") or {}).get(key)

    def points(self) -> list[dict]:
        """Figure 3's points, as measured by the figure3 stage."""
        return self._results("figure3").get("points", [])

    def point(self, stage: str, field: str) -> float | None:
        return next((p.get(field) for p in self.points() if p.get("stage") == stage), None)


Getter = Callable[[Results], "float | None"]


def clean(stage: str, test: str = "test") -> Getter:
    return lambda r: r.metric(stage, "test/acc", test)


def robust(stage: str, norm: str = "l2", eps: float = 0.25) -> Getter:
    return lambda r: r.sweep(stage, norm, eps)


def transfer(norm: str, key: str) -> Getter:
    return lambda r: r.measured("transfer", norm, key)


def squares(key: str, test: str = "test") -> Getter:
    return lambda r: r.metric("squares", f"test/squares/{key}", test)


def point(stage: str, field: str) -> Getter:
    return lambda r: r.point(stage, field)


@dataclass(frozen=True)
class Claim:
    """``text`` states the claim with its threshold; ``test`` receives the values of ``inputs``."""

    text: str
    test: Callable[..., bool]
    inputs: tuple[Getter, ...]

    def holds(self, results: Results) -> bool | None:
        values = [get(results) for get in self.inputs]
        return None if any(v is None for v in values) else bool(self.test(*values))


def claim(text: str, test: Callable[..., bool], *inputs: Getter) -> Claim:
    return Claim(text, test, inputs)


@dataclass(frozen=True)
class Row:
    """One line of the report. ``id`` (``<stage>.<quantity>``, the stage whose number it shows) names it for code
    and tests; ``experiment`` is its display text, free to change."""

    id: str
    section: str
    experiment: str
    paper: str
    value: Getter
    claim: Claim | None = None
    percent: bool = True


def rank_correlation(pairs: list[tuple[float, float]]) -> float | None:
    """Spearman's rank correlation (average ranks for ties); None for fewer than 3 pairs or a constant side."""
    if len(pairs) < 3:
        return None

    def ranks(values: list[float]) -> list[float]:
        order = sorted(range(len(values)), key=values.__getitem__)
        out = [0.0] * len(values)
        i = 0
        while i < len(order):
            j = i
            while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
                j += 1
            for k in range(i, j + 1):
                out[order[k]] = (i + j) / 2
            i = j + 1
        return out

    a, b = ranks([p[0] for p in pairs]), ranks([p[1] for p in pairs])
    ma, mb = sum(a) / len(a), sum(b) / len(b)
    cov = sum((x - ma) * (y - mb) for x, y in zip(a, b, strict=True))
    var = (sum((x - ma) ** 2 for x in a) * sum((y - mb) ** 2 for y in b)) ** 0.5
    return cov / var if var else None


def figure3_correlation(r: Results) -> float | None:
    return rank_correlation([(p["transfer"], p["accuracy"]) for p in r.points()
                             if p.get("transfer") is not None and p.get("accuracy") is not None])


def not_robust(stage: str) -> Claim:
    return claim(f"{stage} model not robust: L2 0.25 acc < half its clean acc", lambda a, c: a < c / 2,
                 robust(stage), clean(stage))


def far_above_chance(stage: str) -> Claim:
    return claim(f"{stage} far above chance (10%): >= 20%", lambda a: a >= 2 * CHANCE, clean(stage))


def learns_task(stage: str) -> Claim:
    return claim(f"{stage} teaches the task: > 3x chance (30%)", lambda a: a > 3 * CHANCE, clean(stage))


S1 = "1. Standard and adversarial training (Ilyas, baseline rows)"
S2 = "2. Robust and non-robust datasets D_R, D_NR (Ilyas Sec. 3.1)"
S3 = "3. Non-robust features suffice: D_rand, D_det (Ilyas Table 1)"
S41 = "4.1 Non-transferable targeted adversarial examples (Nakkiran)"
S42 = "4.2 D_det built from them (Nakkiran)"
S43 = "4.3 Adversarial squares (Nakkiran)"
F3 = "Figure 3: accuracy tracks transferability (Ilyas), with Nakkiran's datasets"

NAKKIRAN_41 = {("linf", "pgd"): ("99.6%", "52.1%"), ("linf", "non_transferable"): ("98.6%", "0.8%"),
               ("l2", "pgd"): ("99.9%", "82.5%"), ("l2", "non_transferable"): ("99.3%", "1.7%")}
NAKKIRAN_42 = {("linf", "pgd"): ("23.7%", "40.4%"), ("linf", "nakkiran"): ("2.5%", "75.9%"),
               ("l2", "pgd"): ("33.2%", "27.3%"), ("l2", "nakkiran"): ("2.8%", "70.8%")}


def dataset_rows(prefix: str = "", name: str = "", sections: tuple[str, str] = ()) -> list[Row]:
    """The rows of Ilyas' constructed datasets (D_R, D_NR: section 2; D_rand, D_det: section 3) for the stages
    ``<prefix>d_robust`` etc.: the suite's own (no prefix) or the authors' released files (``released_``)."""
    s2, s3 = sections or (S2, S3)
    r, nr, rand, det = (f"{prefix}{n}" for n in ("d_robust", "d_nonrobust", "d_rand", "d_det"))
    return [
        Row(f"{r}.clean", s2, f"{name}D_R: clean test acc", "84%", clean(r), learns_task(r)),
        Row(f"{r}.l2_0.25", s2, f"{name}D_R: L2 eps 0.25 acc", "48%", robust(r),
            claim(f"{'D_R' if not prefix else r} carries robustness: L2 0.25 acc >= 3x "
                  f"{'D_NR' if not prefix else nr}'s and >= 15%", lambda a, n: a >= 3 * n and a >= 0.15,
                  robust(r), robust(nr))),
        Row(f"{nr}.clean", s2, f"{name}D_NR: clean test acc", "88%", clean(nr), learns_task(nr)),
        Row(f"{nr}.l2_0.25", s2, f"{name}D_NR: L2 eps 0.25 acc", "~0%", robust(nr), not_robust(nr)),
        Row(f"{rand}.clean", s3, f"{name}D_rand: test acc (true labels)", "63.3%", clean(rand), far_above_chance(rand)),
        Row(f"{det}.clean", s3, f"{name}D_det: test acc (true labels)", "43.7%", clean(det), far_above_chance(det)),
        Row(f"{det}.shifted", s3, f"{name}D_det: test acc on the shifted labels y+1", "—", clean(det, "test_shift1")),
        Row(f"{rand}.l2_0.25", s3, f"{name}D_rand: L2 eps 0.25 acc", "~0%", robust(rand), not_robust(rand)),
        Row(f"{det}.l2_0.25", s3, f"{name}D_det: L2 eps 0.25 acc", "~0%", robust(det), not_robust(det)),
    ]


SR = "3b. The authors' released datasets, trained as the suite trains its own (Ilyas Sec. 3.1, Table 1)"


G51 = "5.1 Robust feature leakage (Goh): D_rand / D_det seen only through 10 robust linear features"


def leaked(name: str) -> Getter:
    return lambda r: r.measured("leakage", name, "accuracy")


def section_51() -> list[Row]:
    """Goh's numbers are for the authors' released sets; the suite's sets get the same rows and claims."""
    rows = [Row("robust_linear.clean", G51, "certified linear model: clean test acc", "—", clean("robust_linear")),
            Row("robust_linear.l2_0.25", G51, "certified linear model: L2 eps 0.25 acc (PGD)", "—",
                robust("robust_linear")),
            Row("leakage.certified", G51, "certified linear model: certified acc at L2 0.25 (closed form)",
                "—", lambda r: r.measured("leakage", "features", "certified_acc"))]
    for prefix, who in (("", ""), ("released_", "released ")):
        rand, det = f"{prefix}d_rand", f"{prefix}d_det"
        row_id = (lambda n: f"leakage.{n}") if not prefix else (lambda n: f"{n}.leakage")  # shown when n runs
        rows += [
            Row(row_id(rand), G51, f"{who}D_rand through the robust features: test acc (true labels)", "23.5%",
                leaked(rand), claim(f"{who}D_rand leaks robust features: >= 1.5x {who}D_det's leakage",
                                    lambda a, d: a >= 1.5 * d, leaked(rand), leaked(det))),
            Row(row_id(det), G51, f"{who}D_det through the robust features: test acc (true labels)", "6.81%",
                leaked(det), claim(f"{who}D_det barely leaks: <= 15% (near chance)", lambda d: d <= 0.15,
                                   leaked(det)))]
    # Why a set leaks or not: how far its perturbations point along the robust direction of their label (1: all
    # robust feature; a direction blind to the 10 features: about +-1/sqrt(3072) = +-0.018). Ours only.
    rows += [Row(f"leakage.{name}_alignment", G51, f"{name_shown}: cosine of each perturbation with its label's "
                 "robust margin direction (mean)", "—",
                 lambda r, name=name: r.measured("leakage", name, "label_alignment"), percent=False)
             for name, name_shown in (("d_rand", "D_rand"), ("d_det", "D_det"))]
    return rows


G52 = "5.2 Two useful non-robust features (Goh): truck vs frog, linear features in the pixel basis"


def goh(feature: str, key: str) -> Getter:
    return lambda r: r.measured("goh_features", *feature.split("/"), key)


def section_52() -> list[Row]:
    """Goh's constructions are useful (held-out usefulness > 0) and not robust (robust usefulness < 0 at L2 eps
    1), the containment although it holds a robust direction. Usefulness is a correlation in [-1, 1]."""
    rows = []
    for feature, text in (("ensemble", "ensemble of non-robust basis vectors"),
                          ("containment", "containment (ensemble + a robust direction)")):
        rows += [Row(f"goh_features.{feature}_usefulness", G52, f"{text}: usefulness on held-out images", "> 0",
                     goh(feature, "usefulness"), claim("useful: usefulness > 0", lambda u: u > 0,
                                                       goh(feature, "usefulness")), percent=False),
                 Row(f"goh_features.{feature}_robust_usefulness", G52, f"{text}: robust usefulness at L2 eps 1",
                     "< 0", goh(feature, "robust_usefulness"),
                     claim("not robust: robust usefulness < 0", lambda u: u < 0, goh(feature, "robust_usefulness")),
                     percent=False)]
    return [*rows, Row("goh_features.robust_part", G52, "the containment's robust direction: robust usefulness at "
                       "L2 eps 1", "> 0", goh("containment/robust_part", "robust_usefulness"),
                       claim("robust: robust usefulness > 0", lambda u: u > 0,
                             goh("containment/robust_part", "robust_usefulness")), percent=False)]


GH54 = "5.4 Robustness beyond adversarial examples (Gilmer & Hendrycks): Fourier-basis noise, fog, contrast"


def frequency(model: str, key: str) -> Getter:
    return lambda r: r.measured("frequency", "models", model, key)


# How the measure sections name the models they compare, in the order given.
MODEL_NAMES = {"standard": "standard", "adversarial_l2": "adversarially trained (L2 0.5)",
               "gaussian_noise": "Gaussian-noise trained", "d_robust": "D_R", "d_nonrobust": "D_NR"}


def model_names(*stages: str) -> dict[str, str]:
    return {stage: MODEL_NAMES[stage] for stage in stages}


def section_54() -> list[Row]:
    """Per model, accuracy under CIFAR-10-C fog and contrast (severity 5) and under Fourier-basis noise (L2 norm 4)
    averaged over a low and a high band of frequencies (pipeline/measure.py). Published: fog 85.7% -> 55.3% with
    adversarial training (Gilmer & Hendrycks), RobustBench fog 5: standard 74.4%, Linf-robust ResNet-50 38.8%."""
    paper = {("standard", "fog"): "85.7% (RobustBench s5: 74.4%)",
             ("adversarial_l2", "fog"): "55.3% (RobustBench s5, Linf: 38.8%)"}
    names = model_names("standard", "adversarial_l2", "gaussian_noise")
    lower = {"fog": "adversarial training lowers fog accuracy: below the standard model's",
             "low_band": "adversarial training lowers low-frequency accuracy: below the standard model's"}
    rows = []
    for model, name in names.items():
        for key, what in (("fog", "fog (severity 5)"), ("contrast", "contrast (severity 5)"),
                          ("low_band", "Fourier noise, low frequencies (max(abs u, abs v) <= 4)"),
                          ("high_band", "Fourier noise, high frequencies (>= 12)")):
            check = None
            if model == "adversarial_l2" and key in lower:
                check = claim(lower[key], lambda a, s: a < s, frequency(model, f"{key}_acc"),
                              frequency("standard", f"{key}_acc"))
            elif model != "standard" and key == "high_band":
                who = "adversarial" if model == "adversarial_l2" else "Gaussian-noise"
                check = claim(f"{who} training raises high-frequency accuracy: above the standard model's",
                              lambda a, s: a > s, frequency(model, "high_band_acc"),
                              frequency("standard", "high_band_acc"))
            rows.append(Row(f"frequency.{model}.{key}", GH54, f"{name}: accuracy under {what}",
                            paper.get((model, key), "—"), frequency(model, f"{key}_acc"), check))
    return rows


W53 = "5.3 Learning from incorrectly labelled data (Wallace)"


def section_53() -> list[Row]:
    """Wallace: a model learns the task from another model's errors alone (CIFAR-10), and from MNIST-model labels
    on Fashion-MNIST images (tested on MNIST). His normalisation variants: docs/DISCUSSION.md."""
    errors = lambda r: r.constructed("wallace_errors", "trained_examples")  # noqa: E731
    error_rate = lambda r: (None if errors(r) is None or not r.constructed("wallace_errors", "examples")  # noqa: E731
                            else errors(r) / r.constructed("wallace_errors", "examples"))
    return [
        Row("wallace_labeller.clean", W53, "labeller stopped early: test acc", "63.1%", clean("wallace_labeller")),
        Row("wallace_errors.examples", W53, "training images the labeller gets wrong (the training set)", "18,768",
            errors, percent=False),
        Row("wallace_errors.error_rate", W53, "... as a fraction of the training set", "37.5%", error_rate,
            claim("the set is the labeller's errors: its share within 0.5x-1.5x the labeller's test error",
                  lambda e, a: 0.5 * (1 - a) <= e <= 1.5 * (1 - a), error_rate, clean("wallace_labeller"))),
        Row("wallace_errors.clean", W53, "fresh model trained only on them: test acc (true labels)", "49.7%",
            clean("wallace_errors"), far_above_chance("wallace_errors")),
        Row("mnist_cnn.clean", W53, "MNIST model (the labeller): MNIST test acc", "99.1%", clean("mnist_cnn")),
        Row("wallace_fashion.clean", W53, "trained on Fashion-MNIST labelled by it: MNIST test acc",
            "94.5% (MNIST's normalisation)", clean("wallace_fashion"), learns_task("wallace_fashion")),
        Row("wallace_fashion_moments.clean", W53, "... the images rescaled to MNIST's pixel mean and std first",
            "91.04% (own normalisation)", clean("wallace_fashion_moments"), learns_task("wallace_fashion_moments")),
    ]


AA56 = ("D_R under a stronger attack: AutoAttack (torchattacks' components, the original's budgets) beside "
        "the suite's PGD")


def attacked(model: str, attack: str, eps: float) -> Getter:
    return lambda r: r.measured("autoattack", "models", model, "eps", f"{eps:g}", f"{attack}_acc")


def section_autoattack() -> list[Row]:
    """Accuracy at L2 0.25 and 0.5 under AutoAttack and under the test sweep's 20-step PGD, on one seeded subset of
    the test set (SPEC 5.6: Li et al. report models trained on D_R largely non-robust under AutoAttack). The claim
    says what the suite finds; its threshold (half of PGD's accuracy, and above the standard model's) is ours."""
    names = model_names("standard", "adversarial_l2", "d_robust", "d_nonrobust")
    paper = {("d_robust", "pgd"): "~48%", ("adversarial_l2", "pgd"): "~82.3%", ("standard", "pgd"): "~4.5%",
             ("d_nonrobust", "pgd"): "~0%",
             ("d_robust", "autoattack"): "largely non-robust (Li et al.; one report 15.55%)"}
    survives = claim("D_R's robustness survives AutoAttack: its AutoAttack accuracy at L2 0.25 at least half its PGD "
                     "accuracy and above the standard model's", lambda aa, pgd, std: aa >= 0.5 * pgd and aa > std,
                     attacked("d_robust", "autoattack", 0.25), attacked("d_robust", "pgd", 0.25),
                     attacked("standard", "autoattack", 0.25))
    rows = []
    for model, name in names.items():
        for eps in (0.25, 0.5):
            for attack, what in (("pgd", "PGD (the test sweep's steps)"), ("autoattack", "AutoAttack")):
                published = paper.get((model, attack), "—") if eps == 0.25 else "—"  # the papers give L2 0.25
                check = survives if (model, attack, eps) == ("d_robust", "autoattack", 0.25) else None
                rows.append(Row(f"autoattack.{model}.{attack}_l2_{eps:g}", AA56, f"{name}: accuracy at L2 {eps:g}, "
                                f"{what}", published, attacked(model, attack, eps), check))
    return rows


R55 = "5.5 The authors' rebuttal and Nakano: layer robustness R(f), representation inversion from noise"
REPRESENTATION = "representation"  # attacks/representation.py: the name of the last layer


def layer_r(model: str, layer: str) -> Getter:
    def get(r: Results) -> float | None:
        layers = r.measured("layer_robustness", "models", model, "layers") or {}
        return next((v["R"] for name, v in layers.items() if name.split()[0] == layer), None)
    return get


def inverted(model: str, key: str) -> Getter:
    return lambda r: r.measured("inversion", "models", model, key)


def section_55() -> list[Row]:
    """The rebuttal's R(f) (worst-case change of a layer's output in an L2 ball over the distance between images;
    the radius is the suite's choice, SPEC 5.5) of the first layer and of the representation; inversion from noise
    (pixel correlation of the result with the goal image). The sources publish figures, not numbers."""
    names = model_names("standard", "adversarial_l2")
    rows = []
    for layer, what in (("layer1", "first layer"), (REPRESENTATION, "representation")):
        for model, name in names.items():
            check = None
            if model == "adversarial_l2" and layer == REPRESENTATION:
                check = claim("the robust model's representation is more stable: its R(f) below the standard's",
                              lambda a, s: a < s, layer_r(model, layer), layer_r("standard", layer))
            rows.append(Row(f"layer_robustness.{model}.{layer}", R55, f"{name}: R(f) of the {what}",
                            "lower for the robust model" if layer == REPRESENTATION else "—", layer_r(model, layer),
                            check, percent=False))
    for model, name in names.items():
        check = None
        if model == "adversarial_l2":
            check = claim("robust inversions look like their images: pixel correlation above the standard model's",
                          lambda a, s: a > s, inverted(model, "pixel_correlation"),
                          inverted("standard", "pixel_correlation"))
        rows += [Row(f"inversion.{model}.pixel_correlation", R55,
                     f"{name}: inversion from noise, pixel correlation with the goal image",
                     "recognisable (robust) / noise-like (standard)", inverted(model, "pixel_correlation"), check,
                     percent=False),
                 Row(f"inversion.{model}.own_label_rate", R55, f"{name}: ... classified as the goal's label by "
                     "the model itself", "—", inverted(model, "own_label_rate"))]
    return rows


def section_41() -> list[Row]:
    rows = [Row("transfer.clean_fresh_target_rate", S41,
                "fresh model predicts t = y+1 on clean images (chance level)", "—",
                transfer("l2", "clean_fresh_target_rate"))]
    for (norm, attack), (success, moved) in NAKKIRAN_41.items():
        name = f"{norm.capitalize()} {'PGD' if attack == 'pgd' else 'non-transferable'}"
        fools = claim("fools f: success >= 90%", lambda s: s >= 0.9, transfer(norm, f"{attack}_success"))
        if attack == "pgd":
            spread = claim("transfers: rate >= 5x the non-transferable attack's", lambda p, n: p >= 5 * n,
                           transfer(norm, "pgd_transfer"), transfer(norm, "non_transferable_transfer"))
        else:
            spread = claim("barely transfers: rate < 10%", lambda n: n < 0.10,
                           transfer(norm, "non_transferable_transfer"))
        rows += [Row(f"transfer.{norm}.{attack}_success", S41, f"{name}: success on f", success,
                     transfer(norm, f"{attack}_success"), fools),
                 Row(f"transfer.{norm}.{attack}_transfer", S41, f"{name}: transfer to a fresh model", moved,
                     transfer(norm, f"{attack}_transfer"), spread)]
    return rows


def section_42() -> list[Row]:
    rows = []
    for (norm, kind), (true_acc, shifted_acc) in NAKKIRAN_42.items():
        stage = f"{kind}_ddet_{norm}"
        eps = eps_text(norm, NAKKIRAN_ATTACKS[norm]["eps"])
        name = f"{norm.capitalize()} {'PGD' if kind == 'pgd' else 'non-transferable'} (eps {eps})"
        # The thresholds are the floors of the Nakkiran issue (10,000 test images: 15% is far outside chance's noise).
        if kind == "pgd":
            on_true = claim("plain-PGD D_det teaches the true task: >= 15% (1.5x chance)", lambda a: a >= 0.15,
                            clean(stage))
            on_shifted = None
        else:
            on_true = claim("non-transferable D_det near chance on true labels: <= 15%", lambda a: a <= 0.15,
                            clean(stage))
            on_shifted = claim("learns the shifted labels instead: (X, Y+1) acc >= 35% and >= 3x its (X, Y) acc",
                               lambda s, a: s >= 0.35 and s >= 3 * a, clean(stage, "test_shift1"), clean(stage))
        rows += [Row(f"{stage}.clean", S42, f"{name}: test acc (X, Y)", true_acc, clean(stage), on_true),
                 Row(f"{stage}.shifted", S42, f"{name}: test acc (X, Y+1)", shifted_acc, clean(stage, "test_shift1"),
                     on_shifted)]
    return rows


ROWS: list[Row] = [
    Row("standard.clean", S1, "standard: clean test acc", "95.3%", clean("standard"), learns_task("standard")),
    Row("standard.l2_0.25", S1, "standard: L2 eps 0.25 acc", "4.5%", robust("standard"), not_robust("standard")),
    Row("adversarial_l2.clean", S1, "adversarial (L2 0.5): clean test acc", "90.8%", clean("adversarial_l2"),
        claim("robustness costs clean accuracy: below the standard model's", lambda a, s: a < s,
              clean("adversarial_l2"), clean("standard"))),
    Row("adversarial_l2.l2_0.25", S1, "adversarial (L2 0.5): L2 eps 0.25 acc", "82.3%", robust("adversarial_l2"),
        claim("adversarial training buys robustness: >= 3x the standard model's L2 0.25 acc",
              lambda a, s: a >= 3 * s, robust("adversarial_l2"), robust("standard"))),
    Row("adversarial_l2.l2_0.5", S1, "adversarial (L2 0.5): L2 eps 0.5 acc", "70.2%",
        robust("adversarial_l2", eps=0.5)),
    *dataset_rows(),
    *dataset_rows("released_", "released ", (SR, SR)),
    *section_41(),
    *section_42(),
    Row("squares.train_acc", S43, "trained network: train acc (label noise memorised)", "99.9%", squares("train_acc"),
        claim("memorises the label noise: train acc >= 99%", lambda a: a >= 0.99, squares("train_acc"))),
    Row("squares.flipped", S43, "trained network: test points flipped by Linf eps 0.01", "almost all",
        squares("flip_fraction"),
        claim("almost every test point flipped: >= 90%", lambda f: f >= 0.9, squares("flip_fraction"))),
    Row("squares.1epoch_flipped", S43, "1-epoch network: test points flipped by Linf eps 0.01", "~0% (robust)",
        squares("flip_fraction", "test_1epoch"),
        claim("the 1-epoch network is robust: <= 10% flipped", lambda f: f <= 0.1,
              squares("flip_fraction", "test_1epoch"))),
    Row("squares.linear_flipped", S43, "linear classifier sign(mean): test points flipped at eps 0.01", "0%",
        squares("linear_flip_fraction"),
        claim("the linear classifier is robust: 0% flipped", lambda f: f == 0,
              squares("linear_flip_fraction"))),
    Row("squares.linear_radius", S43, "linear classifier: smallest robustness radius (Linf)", "0.9",
        squares("linear_radius_min"), percent=False),
    Row("figure3.d_det.accuracy", F3, "D_det point: test acc (true labels)", "ResNet-50 45%",
        point("d_det", "accuracy")),
    Row("figure3.d_det.transfer", F3, "D_det point: targeted transfer to an independent model", "ResNet-50 100%",
        point("d_det", "transfer")),
    *(row for n in ("l2", "linf") for row in (
        Row(f"figure3.nakkiran_ddet_{n}.accuracy", F3, f"Nakkiran non-transferable D_det ({n}): test acc (true labels)",
            "~0%",
            point(f"nakkiran_ddet_{n}", "accuracy")),
        Row(f"figure3.nakkiran_ddet_{n}.transfer", F3, f"Nakkiran non-transferable D_det ({n}): targeted transfer",
            "~0%",
            point(f"nakkiran_ddet_{n}", "transfer"),
            claim("sits near (0, 0): acc <= 15% and transfer <= 10%", lambda a, t: a <= 0.15 and t <= 0.10,
                  point(f"nakkiran_ddet_{n}", "accuracy"), point(f"nakkiran_ddet_{n}", "transfer"))))),
    Row("figure3.correlation", F3, "rank correlation of (transfer, accuracy) over the measured points",
        "+ (on one line)",
        figure3_correlation,
        claim("accuracy tracks transferability: Spearman correlation > 0.5", lambda c: c > 0.5, figure3_correlation),
        percent=False),
    *section_51(),
    *section_52(),
    *section_53(),
    *section_54(),
    *section_55(),
    *section_autoattack(),
]


# Ilyas Figure 3 (transfer %, accuracy %), architectures trained on D_det made from a ResNet-50; Nakkiran's
# non-transferable dataset as the authors placed it. FIGURE3_ARCHS: the names of lightning_modules.models.
PAPER_FIGURE3 = {"ResNet-50": (100, 45), "DenseNet": (93, 42), "ResNet-18": (92, 41), "Inception-v3": (83, 39),
                 "VGG-16": (66, 28), "Nakkiran (placed by Ilyas et al.)": (0, 0)}
FIGURE3_ARCHS = {"resnet50": "ResNet-50", "resnet18": "ResNet-18", "vgg16": "VGG-16"}


def architecture_rows(results: Results) -> list[Row]:
    """Figure 3 rows of the extra architectures' D_det points (stages ``d_det_<arch>``) the figure3 stage measured."""
    rows = []
    for p in results.points():
        stage = p.get("stage", "")
        if not stage.startswith("d_det_"):
            continue
        arch = stage.removeprefix("d_det_")
        name = FIGURE3_ARCHS.get(arch, arch)
        transfer_paper, acc_paper = PAPER_FIGURE3.get(name, (None, None))
        rows += [Row(f"figure3.{stage}.accuracy", F3, f"D_det point, {p['label']}: test acc (true labels)",
                     f"{name} {acc_paper}%" if acc_paper is not None else "—", point(stage, "accuracy")),
                 Row(f"figure3.{stage}.transfer", F3,
                     f"D_det point, {p['label']}: targeted transfer to an independent model",
                     f"{name} {transfer_paper}%" if transfer_paper is not None else "—", point(stage, "transfer"))]
    return rows


def paper_percent(row_id: str) -> float | None:
    """The published number of the row ``row_id`` in %, for plots ("95.3%" -> 95.3, "~0%" -> 0.0); None when the
    row has no single published percentage."""
    paper = next(r.paper for r in ROWS if r.id == row_id)
    try:
        return float(paper.removeprefix("~").removesuffix("%")) if paper.endswith("%") else None
    except ValueError:
        return None


def evaluate(records: Mapping[str, dict | None], rows: list[Row] | None = None,
             graph: Collection[str] | None = None) -> list[dict]:
    """Every row (default: ``ROWS`` plus the measured extra architectures of Figure 3) with the suite's number and
    whether its claim holds (None: not run / no claim). ``graph``: the preset's stage names; rows of stages it
    does not have are left out (a preset of a few stages reports what it runs, not a table of "not run")."""
    results = Results(records)
    if rows is None:
        rows = ROWS + architecture_rows(results)
    if graph is not None:
        rows = [row for row in rows if row.id.split(".", 1)[0] in graph]
    return [{"id": row.id, "section": row.section, "experiment": row.experiment, "paper": row.paper,
             "suite": row.value(results), "percent": row.percent, "claim": row.claim.text if row.claim else None,
             "holds": row.claim.holds(results) if row.claim else None} for row in rows]
