"""The report of a whole local run (``vlprep run``): where every output is."""

from __future__ import annotations

import json

WEIGHT_FIELDS = ("weights", "text_weights", "matcher")  # the settings fields that name model weights


def weights_used(settings: dict[str, dict]) -> dict[str, dict]:
    """Per stage (its ``settings.json`` path), the weights its plan recorded: spec per field, ``random``
    (any spec is ``random:<seed>``) and ``fallback`` (why ``default`` became random weights, or "")."""
    used = {}
    for where, doc in sorted(settings.items()):
        specs = {k: doc[k] for k in WEIGHT_FIELDS if doc.get(k)}
        if specs:
            used[where] = {**specs, "random": any(str(v).startswith("random:") for v in specs.values()),
                           "fallback": doc.get("weights_fallback", "")}
    return used


def random_lines(used: dict[str, dict]) -> list[str]:
    """One warning per stage that ran with random weights (with the reason when ``default`` fell back)."""
    return [f"RANDOM weights in {where}: its outputs are not meaningful"
            + (f" (the published weights were not used: {u['fallback']})" if u["fallback"] else " (asked for)")
            for where, u in used.items() if u["random"]]


def run_markdown(run: dict) -> str:
    lines = [f"# vlprep run `{run['run_name']}`", "", f"pipeline: `{run['pipeline']}`", ""]
    used = run.get("weights", {})
    if used:
        lines += ["## Weights", ""] + [f"- **{w}**" for w in random_lines(used)]
        lines += [f"- `{where}`: " + ", ".join(f"{k} `{v}`" for k, v in u.items() if k in WEIGHT_FIELDS)
                  for where, u in used.items()] + [""]
    lines += ["## Outputs", ""] + [f"- `{p}`" for p in run.get("outputs", [])]
    lines += ["", "## Parameters", "", "```json", json.dumps(run["params"], indent=1), "```", ""]
    return "\n".join(lines)
