"""Every op in dopsd_fast/ops/ has its kernel-stem test and benchmark (CONTRIBUTING.md's checklist)."""
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
OPS = sorted(p.stem for p in (ROOT / "dopsd_fast" / "ops").glob("*.py") if p.stem not in ("__init__", "reference")
             and not p.stem.startswith("_"))


@pytest.mark.parametrize("op", OPS)
def test_op_has_test_and_bench(op):
    assert (ROOT / "tests" / "ops" / f"test_{op}.py").is_file(), f"tests/ops/test_{op}.py is missing"
    assert (ROOT / "bench" / "ops" / f"bench_{op}.py").is_file(), f"bench/ops/bench_{op}.py is missing"


@pytest.mark.parametrize("op", OPS)
def test_op_has_a_reference(op):
    import dopsd_fast.ops.reference as ref

    assert any(name.startswith(op) and name.endswith("_ref") for name in dir(ref)), f"no {op}*_ref in ops/reference.py"
