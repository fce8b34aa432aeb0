"""docs/api.md is the reference the code cites: it documents every public name, its presets table is
the code's, every "docs/api.md §N" citation in the repository names a section that exists, and nothing
points outside the repository (a contract file beside it that readers of the repository cannot open)."""

import re
from pathlib import Path

import pytest

import sppo_fast as sf

ROOT = Path(__file__).resolve().parent.parent
API = ROOT / "docs" / "api.md"
CITING = ("sppo_fast", "csrc", "bench", "tests", "docs")
SUFFIXES = {".py", ".md", ".cpp", ".h", ".yaml", ".toml"}
ADVANTAGES = {"`gae`": "gae", "group, std": "group_std", "group, none": "group_none", "rloo": "rloo",
              "`R - sigmoid(z)`": "sppo"}


def _sources():
    for top in CITING:
        for path in sorted((ROOT / top).rglob("*")):
            if path.suffix in SUFFIXES and path.is_file() and ".venv" not in path.parts:
                yield path


def _sections(text):
    """{"3", "3.4", ...}: the numbers of the document's ## and ### headings."""
    return set(re.findall(r"^#{2,3} (\d+(?:\.\d+)?)[. ]", text, flags=re.M))


def test_every_public_name_is_documented():
    text = API.read_text()
    missing = [name for name in sf.__all__ if f"`{name}" not in text]
    assert not missing, f"docs/api.md does not document {missing}"


def test_the_presets_table_is_the_code_s():
    rows = [line.split("|")[1:-1] for line in API.read_text().splitlines() if re.match(r"\| `\w+` \| ", line)]
    table = {cells[0].strip().strip("`"): [c.strip() for c in cells[1:]] for cells in rows if len(cells) == 8}
    assert set(table) == {"ppo", "grpo", "dapo", "dr_grpo", "rloo", "gspo", "sspo", "sppo"}
    for name, (level, low, high, dual, adaptive, aggregation, advantage) in table.items():
        config = sf.PolicyLossConfig.preset(name)
        assert config.ratio_level == level and config.aggregation == aggregation, name
        assert (config.clip_low, config.clip_high) == (float(low), float(high)), name
        assert config.dual_clip == (None if dual == "-" else float(dual)), name
        assert config.entropy_adaptive == (None if adaptive == "-" else sf.EntropyAdaptiveClip()), name
        assert config.advantage == ADVANTAGES[advantage], name


def test_every_citation_names_an_existing_section():
    sections = _sections(API.read_text())
    assert {"3.1", "3.4", "5", "9"} <= sections
    dangling = []
    for path in _sources():
        for cited in re.findall(r"docs/api\.md §(\d+(?:\.\d+)?)(?:-§(\d+(?:\.\d+)?))?", path.read_text()):
            dangling += [f"{path.relative_to(ROOT)}: §{s}" for s in cited if s and s not in sections]
    assert not dangling, dangling


@pytest.mark.parametrize("pattern", [r"\bSPEC\b", r"SPEC\.md", r"\.\./shared"])
def test_nothing_cites_a_document_outside_the_repository(pattern):
    this_file = Path(__file__).resolve()  # its patterns name what they look for
    hits = [f"{path.relative_to(ROOT)}:{n}" for path in _sources() if path.resolve() != this_file
            for n, line in enumerate(path.read_text().splitlines(), 1) if re.search(pattern, line)]
    assert not hits, f"cite docs/api.md instead: {hits[:10]}"
