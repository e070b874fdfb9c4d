"""The package stays readable: no function longer than 80 lines (STYLE.md, "functions a reader can hold")."""
from __future__ import annotations

import ast
from pathlib import Path
from typing import List

PACKAGE = Path(__file__).resolve().parents[1] / "memento_edge"
MAX_FUNCTION_LINES = 80


def long_functions(source: str, label: str) -> List[str]:
    """``label:line name (n lines)`` of each function (nested ones too) longer than the limit."""
    found = []
    for node in ast.walk(ast.parse(source, filename=label)):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            lines = (node.end_lineno or node.lineno) - node.lineno + 1  # def line to last line
            if lines > MAX_FUNCTION_LINES:
                found.append(f"{label}:{node.lineno} {node.name} ({lines} lines)")
    return found


def test_no_function_in_the_package_is_longer_than_80_lines() -> None:
    files = sorted(PACKAGE.rglob("*.py"))
    assert len(files) > 10  # the package really was found
    too_long = [f for path in files
                for f in long_functions(path.read_text(encoding="utf-8"), str(path.relative_to(PACKAGE.parent)))]
    assert too_long == []


def test_the_check_counts_from_def_to_last_line() -> None:
    def source(n: int) -> str:
        return "def f():\n" + "\n".join(f"    x{i} = {i}" for i in range(n - 1)) + "\n"

    assert long_functions(source(MAX_FUNCTION_LINES), "ok.py") == []
    too_long = MAX_FUNCTION_LINES + 1
    assert long_functions(source(too_long), "long.py") == [f"long.py:1 f ({too_long} lines)"]
