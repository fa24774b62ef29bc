"""Move project modules and rewrite every reference to them (the house moves of docs/house-plan.md).

    .venv/bin/python scripts/move_modules.py OLD=NEW [OLD=NEW ...]   e.g. actors.diffusion=actors.models.diffusion

For each pair: `git mv` the file (creating the new package's __init__.py), then, in every tracked .py, .md, .sh,
.toml, .yaml and .cfg file: dotted names (`actors.models.diffusion`, also inside strings), file paths
(`actors/models/diffusion.py`), and `from PACKAGE import a, b` lines, which are split by the package each name now lives
in. One pass over each file with all pairs at once, so a new name is never rewritten again. Multi-line
`from PACKAGE import (...)` of a moved module is reported, not rewritten. Nothing persisted names a module (see the
plan), so no alias is left behind.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
SUFFIXES = {".py", ".md", ".sh", ".toml", ".yaml", ".yml", ".cfg"}


def tracked_files() -> list[Path]:
    names = subprocess.run(["git", "ls-files"], cwd=REPO_ROOT, capture_output=True, text=True, check=True).stdout
    return [REPO_ROOT / name for name in names.splitlines()
            if Path(name).suffix in SUFFIXES and REPO_ROOT / name != Path(__file__).resolve()]


def rewrite(text: str, moves: dict[str, str]) -> tuple[str, list[str]]:
    dotted = re.compile(r"(?<![\w.])(" + "|".join(re.escape(old) for old in sorted(moves, key=len, reverse=True))
                        + r")(?![\w])")
    paths = {old.replace(".", "/") + ".py": new.replace(".", "/") + ".py" for old, new in moves.items()}
    slashed = re.compile(r"(?<![\w/])(" + "|".join(re.escape(p) for p in sorted(paths, key=len, reverse=True))
                         + r")(?![\w])")
    problems = []

    def from_line(match: re.Match) -> str:
        indent, package, names = match.group(1), match.group(2), match.group(3)
        if names.strip().startswith("("):
            if any(f"{package}.{n.strip(' (),')}" in moves for n in names.split(",")):
                problems.append(match.group(0))
            return match.group(0)
        groups: dict[str, list[str]] = {}
        for item in names.split(","):
            item = item.strip()
            module = item.split(" as ")[0].strip()
            target = moves.get(f"{package}.{module}", f"{package}.{module}")
            new_package, _, new_name = target.rpartition(".")
            alias = item[len(module):] or ("" if new_name == module else f" as {module}")  # code keeps its name
            groups.setdefault(new_package, []).append(new_name + alias)
        return "\n".join(f"{indent}from {pkg} import {', '.join(items)}" for pkg, items in groups.items())

    packages = {old.rpartition(".")[0] for old in moves}
    if packages:
        line = re.compile(r"^([ \t]*)from (" + "|".join(re.escape(p) for p in packages)
                          + r") import ([^#\n]+?)[ \t]*$", re.M)
        text = line.sub(from_line, text)
    text = dotted.sub(lambda m: moves[m.group(1)], text)
    text = slashed.sub(lambda m: paths[m.group(1)], text)
    return text, problems


def main(argv: list[str]) -> int:
    moves = dict(pair.split("=", 1) for pair in argv)
    for old, new in moves.items():
        source = REPO_ROOT / (old.replace(".", "/") + ".py")
        target = REPO_ROOT / (new.replace(".", "/") + ".py")
        target.parent.mkdir(parents=True, exist_ok=True)
        init = target.parent / "__init__.py"
        if not init.exists():
            init.write_text("")
            subprocess.run(["git", "add", str(init)], cwd=REPO_ROOT, check=True)
        subprocess.run(["git", "mv", str(source), str(target)], cwd=REPO_ROOT, check=True)
    problems = []
    for path in tracked_files():
        text = path.read_text(encoding="utf-8")
        new, found = rewrite(text, moves)
        problems += [f"{path.relative_to(REPO_ROOT)}: {p}" for p in found]
        if new != text:
            path.write_text(new, encoding="utf-8")
    for problem in problems:
        print("rewrite by hand:", problem)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
