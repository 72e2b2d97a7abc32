"""The shape of the package, for the before/after table of a re-layout.

    .venv/bin/python benchmarks/codebase.py [--rev REV]

Reads watcherd/**/*.py at the working tree (or at git revision REV, from `git show`, nothing
checked out) and prints: modules, lines, the largest module, class and function, modules over
450 lines, classes over 300, and the README's length.
"""

from __future__ import annotations

import argparse
import ast
import subprocess
from pathlib import Path

from harness import REPO, table


def files(rev: str | None) -> dict[str, str]:
    if rev is None:
        return {str(p.relative_to(REPO)): p.read_text() for p in sorted((REPO / "watcherd").rglob("*.py"))}
    names = subprocess.run(
        ["git", "-C", str(REPO), "ls-tree", "-r", "--name-only", rev, "watcherd"], capture_output=True, text=True
    ).stdout.split()
    return {n: show(rev, n) for n in names if n.endswith(".py")}


def show(rev: str | None, name: str) -> str:
    if rev is None:
        path = REPO / name
        return path.read_text() if path.exists() else ""
    return subprocess.run(["git", "-C", str(REPO), "show", f"{rev}:{name}"], capture_output=True, text=True).stdout


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rev", help="a git revision (default: the working tree)")
    args = parser.parse_args()
    sources = files(args.rev)
    lines = {name: src.count("\n") for name, src in sources.items()}
    classes: list[tuple[int, str]] = []
    functions: list[tuple[int, str]] = []
    for name, src in sources.items():
        for node in ast.walk(ast.parse(src)):
            size = (node.end_lineno or node.lineno) - node.lineno + 1 if hasattr(node, "lineno") else 0
            if isinstance(node, ast.ClassDef):
                classes.append((size, f"{name}:{node.name}"))
            elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                functions.append((size, f"{name}:{node.name}"))
    biggest = max(lines.items(), key=lambda kv: kv[1])
    readme = show(args.rev, "README.md").count("\n")
    rows = [
        ["modules", len(sources)],
        ["folders", len({str(Path(n).parent) for n in sources})],
        ["lines", sum(lines.values())],
        ["largest module", f"{biggest[0]} ({biggest[1]})"],
        ["modules over 450 lines", sum(v > 450 for v in lines.values())],
        ["largest class", f"{max(classes)[1]} ({max(classes)[0]})"],
        ["classes over 300 lines", sum(size > 300 for size, _ in classes)],
        ["largest function", f"{max(functions)[1]} ({max(functions)[0]})"],
        ["README lines", readme],
    ]
    print(table(f"watcherd/ at {args.rev or 'the working tree'}", ["what", "value"], rows))


if __name__ == "__main__":
    main()
