"""The report of a whole local run (``vlprep run``): where every output is."""

from __future__ import annotations

import json


def run_markdown(run: dict) -> str:
    lines = [f"# vlprep run `{run['run_name']}`", "", f"pipeline: `{run['pipeline']}`", ""]
    lines += ["## Outputs", ""] + [f"- `{p}`" for p in run.get("outputs", [])]
    lines += ["", "## Parameters", "", "```json", json.dumps(run["params"], indent=1), "```", ""]
    return "\n".join(lines)
