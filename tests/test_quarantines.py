"""Every skip/xfail in the suite is listed with a reason in tests/QUARANTINES.md (docs/RELIABILITY.md 38),
and the weak promises it names exist; every "docs/RELIABILITY.md N" citation names a real promise."""

import re
from collections import Counter
from pathlib import Path

TESTS = Path(__file__).parent
ROOT = TESTS.parent
SKIP_CALL = re.compile(r"pytest\.(skip|importorskip|xfail)\(|raise\s+(?:unittest\.)?(SkipTest)\b")
SKIP_MARK = re.compile(r"^(\s*)(?:(\w+)\s*=\s*)?@?pytest\.mark\.(skip|skipif|xfail)\b", re.M)


def skips_in(text: str) -> Counter:
    """(kind -> places guarded): direct calls and marks count 1; a mark kept in a variable counts
    once per `@variable` decoration."""
    found = Counter()
    for m in SKIP_CALL.finditer(text):
        found[m.group(1) or m.group(2)] += 1
    for m in SKIP_MARK.finditer(text):
        var, kind = m.group(2), m.group(3)
        found[kind] += len(re.findall(rf"^\s*@{var}\b", text, re.M)) if var else 1
    return found


def table(section: str) -> list[list[str]]:
    text = (TESTS / "QUARANTINES.md").read_text().split(f"## {section}")[1].split("\n## ")[0]
    rows = [[c.strip() for c in ln.strip().strip("|").split("|")] for ln in text.splitlines() if ln.startswith("|")]
    return [r for r in rows[2:]]  # header and separator first


def promises() -> set[int]:
    text = (ROOT / "docs" / "RELIABILITY.md").read_text()
    return {int(n) for n in re.findall(r"^(\d+)\. ", text, re.M)}


def test_quarantine_list_matches_code():
    found = Counter()
    files = [p for p in sorted(TESTS.rglob("*.py")) if p.name != Path(__file__).name]
    assert len(files) > 20
    for path in files:
        for kind, n in skips_in(path.read_text()).items():
            found[(str(path.relative_to(ROOT)), kind)] += n
    listed = Counter()
    for file, kind, guards, reason in table("Skips and xfails"):
        assert reason, f"{file}: a quarantine needs a reason"
        listed[(file, kind)] += int(guards)
    assert found == listed


def test_the_skip_scan_counts_what_it_should():
    text = ("needs_x = pytest.mark.skipif(True, reason='r')\n@needs_x\ndef a(): ...\n@needs_x\ndef b(): ...\n"
            "@pytest.mark.xfail\ndef c(): pytest.skip('no')\nimport unittest\nraise unittest.SkipTest('x')\n")
    assert skips_in(text) == Counter({"skipif": 2, "xfail": 1, "skip": 1, "SkipTest": 1})


def test_weak_promises_exist_and_have_reasons():
    known = promises()
    assert known == set(range(1, 40))
    rows = table("Promises of docs/RELIABILITY.md that are not strongly tested")
    numbers = [int(r[0]) for r in rows]
    assert rows and len(numbers) == len(set(numbers)) and set(numbers) <= known
    assert all(r[1] in ("weak", "untested") and r[2] for r in rows)


def test_reliability_citations_name_real_promises():
    cite = re.compile(r"(?:docs/)?RELIABILITY(?:\.md)?\s+(\d+(?:[-–]\d+)?(?:,\s*\d+(?:[-–]\d+)?)*)")
    known, seen = promises(), 0
    for folder in ("saekit", "tests", "dashboards", "scripts"):
        for path in (ROOT / folder).rglob("*.py"):
            text = path.read_text()
            for m in cite.finditer(text):
                assert m.group(0).startswith("docs/RELIABILITY.md "), f"{path}: cite as docs/RELIABILITY.md N"
                for part in re.split(r"[,\s]+", m.group(1).strip(" ,")):
                    lo, _, hi = part.replace("–", "-").partition("-")
                    assert set(range(int(lo), int(hi or lo) + 1)) <= known, (path, part)
                    seen += 1
    assert seen >= 10
