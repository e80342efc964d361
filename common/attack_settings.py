"""Published attack settings that several layers name (the datasets' configs are checked against them, the
measurements attack with them, the report prints them): one table, no heavy imports."""

# Nakkiran's targeted attacks (SPEC 4.1-4.2), targets t = (y + 1) mod 10, no random start.
NAKKIRAN_STEPS = 10
NAKKIRAN_ATTACKS = {"l2": {"eps": 2.5, "step_size": 0.5}, "linf": {"eps": 8 / 255, "step_size": 2 / 255}}

# The suite's test-sweep PGD (RobustAccuracy's default test_steps; the mini configs keep it, the paper's set 100):
# steps of 2.5 eps / steps, no random start. The AutoAttack stage runs it beside AutoAttack at every preset.
SWEEP_STEPS = 20

# AutoAttack "standard" (Croce & Hein, 2020) as the original runs it: APGD-CE, APGD-T and FAB-T 100 iterations each,
# Square 5,000 queries (torchattacks' own AutoAttack runs the first three for 10: attacks/autoattack.py).
AUTOATTACK_STEPS, AUTOATTACK_QUERIES = 100, 5000


def eps_text(norm: str, eps: float) -> str:
    """``2.5`` for L2, ``8/255`` for Linf (in 1/255 units when that is a whole number)."""
    if norm == "linf" and abs(eps * 255 - round(eps * 255)) < 1e-6:
        return f"{round(eps * 255)}/255"
    return f"{eps:g}"
