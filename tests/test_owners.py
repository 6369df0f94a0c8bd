"""Each artifact's layout has one owner: no other module of mpad/ or stages/ spells its keys; and no module of
mpad/ grows past 350 lines (a sign that it holds more than one thing)."""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CODE = sorted([*ROOT.glob("mpad/**/*.py"), *ROOT.glob("stages/*.py")])
# artifact: (its owner, key strings that belong to it alone; keys other artifacts share, such as "category", are
# left out: they would name no owner)
OWNERS = {
    "prompts file": ("mpad/prompt_file.py", ['"vectors"', '"sizes"']),
    "thresholds file": ("mpad/thresholds.py", ['"pixel_threshold"', '"map_low"', '"map_high"']),
    "ONNX sidecar": ("mpad/deploy/sidecar.py", ['"input_size"', '"thresholds_sha256"', '"opset"']),
    "metrics.json": ("mpad/summary.py", ['"unmeasured"']),
    "curve files": ("mpad/curves.py", ['"fpr"', '"tpr"']),
}


@pytest.mark.parametrize("artifact", sorted(OWNERS))
def test_only_the_owner_spells_an_artifacts_keys(artifact):
    owner, keys = OWNERS[artifact]
    spelled = {str(p.relative_to(ROOT)) for p in CODE for key in keys if key in p.read_text()}
    assert spelled == {owner}, f"{artifact}: keys spelled outside {owner}"


def test_no_module_of_the_library_is_over_350_lines():
    sizes = {str(p.relative_to(ROOT)): len(p.read_text().splitlines()) for p in ROOT.glob("mpad/**/*.py")}
    assert {path: n for path, n in sizes.items() if n > 350} == {}
