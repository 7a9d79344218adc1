"""The opening table of a study's report: claim → verdict, seed-level interval, the paper's number vs ours."""

from __future__ import annotations

from collections.abc import Sequence

from mergelab.analysis.verdict import Claim

__all__ = ["claims_table"]

_MARK = {"supported": "✅ supported", "not supported": "❌ not supported", "inconclusive": "❔ inconclusive"}


def claims_table(claims: Sequence[Claim], digits: int = 3) -> str:
    """A Markdown table with one row per claim; the interval is printed as ``mean [low, high]``."""
    if not claims:
        return "_(no claims)_\n"
    level = claims[0].interval.level
    lines = [
        f"| claim | setting | measured (ours) | mean [{level:.0%} CI], seeds | verdict | paper |",
        "|---|---|---|---|---|---|",
    ]
    for c in claims:
        ours = f"{c.interval.format(digits, c.scale)}{(' ' + c.unit) if c.unit else ''}, n={c.interval.n}"
        cells = [c.claim, c.setting or "—", c.measure, ours, _MARK[c.verdict], c.paper]
        lines.append("| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |")
    return "\n".join(lines) + "\n"
