"""Promise 38's first half, checked instead of inspected: no test asserts on wall-clock time."""

from __future__ import annotations

import ast
from pathlib import Path

CLOCKS = {"time", "perf_counter", "monotonic", "process_time", "perf_counter_ns", "monotonic_ns", "time_ns"}


def _clock_call(node: ast.AST) -> bool:
    return isinstance(node, ast.Call) and (
        (isinstance(node.func, ast.Attribute) and node.func.attr in CLOCKS)
        or (isinstance(node.func, ast.Name) and node.func.id in CLOCKS))


def _timed_names(fn: ast.AST) -> set[str]:
    """Names assigned from an expression that reads a clock (t0 = time.perf_counter(); dt = now() - t0 ...)."""
    names: set[str] = set()
    changed = True
    while changed:
        changed = False
        for node in ast.walk(fn):
            if isinstance(node, ast.Assign):
                reads = any(_clock_call(n) or (isinstance(n, ast.Name) and n.id in names) for n in ast.walk(node.value))
                for target in node.targets:
                    for t in ast.walk(target):
                        if reads and isinstance(t, ast.Name) and t.id not in names:
                            names.add(t.id)
                            changed = True
    return names


def wall_clock_asserts(tree: ast.AST) -> list[int]:
    """Line numbers of assert statements that read a clock or a value derived from one."""
    lines = []
    for fn in [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]:
        timed = _timed_names(fn)
        for node in ast.walk(fn):
            if isinstance(node, ast.Assert) and any(
                    _clock_call(n) or (isinstance(n, ast.Name) and n.id in timed) for n in ast.walk(node.test)):
                lines.append(node.lineno)
    return lines


def test_the_scan_catches_a_timed_assert():
    src = "import time\ndef test_x():\n    t0 = time.perf_counter()\n    f()\n    dt = time.perf_counter() - t0\n    assert dt < 1\n"
    assert wall_clock_asserts(ast.parse(src)) == [6]
    assert wall_clock_asserts(ast.parse("def test_y():\n    x = 3\n    assert x < 4\n")) == []


def test_no_test_asserts_on_wall_clock_time():
    files = sorted(Path(__file__).resolve().parent.rglob("*.py"))
    assert len(files) > 30  # the scan found the suite, whatever the cwd
    found = {str(f): lines for f in files if (lines := wall_clock_asserts(ast.parse(f.read_text())))}
    assert found == {}
