"""The packages form layers, and no import runs back up them (README, "Layout"):

    common  <-  models  <-  attacks  <-  datamodules, lightning_modules (side by side)  <-  pipeline  <-  train.py

A package may import its own layer's package and the layers below; datamodules and lightning_modules never import
each other (a LightningModule meets its data through the Trainer). Imports inside functions count too: an
"import late" to dodge a circle is an upward import all the same."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LAYER = {"common": 0, "models": 1, "attacks": 2, "datamodules": 3, "lightning_modules": 3, "pipeline": 4}


def imported_packages(path: Path) -> set[str]:
    """The suite's top-level packages that ``path`` imports, anywhere in the file."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
    return found & (set(LAYER) | {"train"})


@pytest.mark.parametrize("package", sorted(LAYER))
def test_no_package_imports_a_package_above_it_or_beside_it(package):
    offences = []
    for path in sorted((REPO / package).rglob("*.py")):
        for target in imported_packages(path) - {package}:
            if target == "train" or LAYER[target] >= LAYER[package]:
                offences.append(f"{path.relative_to(REPO)} imports {target}")
    assert not offences, "imports against the layers: " + "; ".join(offences)


def test_the_ground_floor_needs_neither_torch_nor_lightning_to_import():
    # common/files, errors, datasets and figures are plain Python (common/tensors is the torch helper module).
    for name in ("errors", "files", "datasets", "figures"):
        source = (REPO / "common" / f"{name}.py").read_text()
        tree = ast.parse(source)
        top = {n.names[0].name.split(".")[0] if isinstance(n, ast.Import) else (n.module or "").split(".")[0]
               for n in tree.body if isinstance(n, ast.Import | ast.ImportFrom)}
        assert not top & {"torch", "pytorch_lightning", "lightning", "matplotlib"}, f"common/{name}.py: {top}"
