"""The caption stage's report (Markdown)."""

from __future__ import annotations

from vlprep.reports.html import md_table


def captions_markdown(summary: dict) -> str:
    rows = [{"file": k, "images": v} for k, v in summary["files"].items() if k.endswith(".jsonl")]
    text = (f"# Caption annotations ({summary['dataset']})\n\nWritten to `{summary['out']}` from "
            f"{summary['shards']} shard(s).\n\n")
    text += md_table(rows)
    missing = summary["files"].get("test1k_missing_ids")
    if missing:
        text += f"\n**{missing} id(s) of the test1k list are not in the Karpathy file.**\n"
    return text
