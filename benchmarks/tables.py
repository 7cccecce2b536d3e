"""Render benchmarks/results/*.json as the markdown tables in benchmarks/README.md.

A result file may carry ``"tables": [{"title", "columns", "rows"}]`` (rendered as is);
otherwise its ``"summary"`` (a dict, or a dict of dicts) is rendered. Every section
names the command that produced it and the machine it ran on.
"""

from __future__ import annotations

import json
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"

INTRO = """# Benchmarks

Scripts, not tests: each measures side by side in one run and writes `results/NAME.json`.
`python -m benchmarks` runs them all (about 10-20 minutes on a 2-core CPU) and rebuilds this page
from the JSON; `python -m benchmarks --smoke` runs tiny versions (CI does); `python -m benchmarks
--table` only rebuilds this page. Every figure below comes from the committed results file named
in its section, produced by the command shown there.
"""


def _cell(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _markdown(columns, rows) -> str:
    head = "| " + " | ".join(map(str, columns)) + " |\n|" + "---|" * len(columns) + "\n"
    return head + "".join("| " + " | ".join(_cell(c) for c in row) + " |\n" for row in rows)


def render(name: str, result: dict) -> str:
    machine = result.get("machine", {})
    out = [f"## {name}\n", f"`{result.get('command', '')}` -> `results/{name}.json`  \n",
           f"machine: {machine.get('platform', '?')}, {machine.get('cpu_count', '?')} CPUs, "
           f"{machine.get('date', '?')}\n"]
    tables = result.get("tables")
    if tables:
        for t in tables:
            out.append(f"\n**{t.get('title', '')}**\n\n" + _markdown(t["columns"], t["rows"]))
    elif isinstance(result.get("summary"), dict):
        summary = result["summary"]
        if all(isinstance(v, dict) for v in summary.values()):
            keys = sorted({k for v in summary.values() for k in v})
            out.append("\n" + _markdown(["", *keys], [[n, *[v.get(k, "") for k in keys]] for n, v in summary.items()]))
        else:
            out.append("\n" + _markdown(["metric", "value"], list(summary.items())))
    return "".join(out)


def write_readme() -> Path:
    parts = [INTRO]
    for path in sorted(RESULTS.glob("*.json")):
        try:
            parts.append(render(path.stem, json.loads(path.read_text())))
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            parts.append(f"## {path.stem}\n\n(unreadable result file: {exc})\n")
    readme = HERE / "README.md"
    readme.write_text("\n".join(parts))
    return readme
