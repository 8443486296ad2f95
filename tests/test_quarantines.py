"""Every skip/xfail in the suite is listed with a reason in tests/QUARANTINES.md (RELIABILITY 38)."""

import re
from collections import Counter
from pathlib import Path

TESTS = Path(__file__).parent
PATTERN = re.compile(r"pytest\.(skip|importorskip|xfail)\(|mark\.(skip|skipif|xfail)\b")


def test_quarantine_list_matches_code():
    found = Counter()
    for path in sorted(TESTS.glob("test_*.py")):
        if path.name == Path(__file__).name:
            continue
        for m in PATTERN.finditer(path.read_text()):
            found[(f"tests/{path.name}", m.group(1) or m.group(2))] += 1
    listed = Counter()
    for line in (TESTS / "QUARANTINES.md").read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 3 and cells[0].startswith("tests/"):
            assert cells[2], f"{cells[0]}: a quarantine needs a reason"
            listed[(cells[0], cells[1])] += 1
    assert found == listed
