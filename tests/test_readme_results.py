"""Claims follow results: every result file README.md or bench/README.md cites exists in the repository."""
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
READMES = [ROOT / "README.md", ROOT / "bench" / "README.md"]
# a path into a results folder: bench/results/..., results/... (bench/README.md's own relative form), results/world/...
CITED = re.compile(r"(?:bench/)?results/[\w.\-/]*[\w\-/]")


def cited(readme: Path) -> list[str]:
    return sorted(set(CITED.findall(readme.read_text())))


def resolve(readme: Path, cited_path: str) -> list[Path]:
    """Where a cited path may live: the repository root, or beside the README that cites it."""
    return [ROOT / cited_path, readme.parent / cited_path]


@pytest.mark.parametrize("readme", READMES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_cited_result_exists(readme):
    paths = cited(readme)
    missing = [p for p in paths if not any(c.exists() for c in resolve(readme, p))]
    assert not missing, f"{readme.name} cites result files that do not exist: {missing}"


def test_the_readmes_cite_results():
    assert cited(READMES[1]), "bench/README.md names no result file"
