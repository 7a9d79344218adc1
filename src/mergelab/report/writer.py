"""A run folder's human-readable report, built section by section.

The report is written to disk on every ``save()``, so a long study leaves a readable (partial) report even if it
is interrupted.
"""

from __future__ import annotations

import json
import math
import platform
import sys
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    arr = np.asarray(values, dtype=float)
    if arr.size == 0:
        return math.nan, math.nan
    return float(arr.mean()), float(arr.std(ddof=1)) if arr.size > 1 else 0.0


def fmt(value: object, digits: int = 4) -> str:
    if isinstance(value, float):
        return "—" if math.isnan(value) else f"{value:.{digits}f}"
    if isinstance(value, tuple) and len(value) == 2 and all(isinstance(v, float) for v in value):
        m, s = value
        return f"{m:.{digits}f} ± {s:.{digits}f}"
    return str(value)


def markdown_table(
    rows: Sequence[Mapping[str, object]], columns: Sequence[str] | None = None, digits: int = 4
) -> str:
    """A GitHub-flavoured Markdown table; ``(mean, std)`` tuples print as ``m ± s``."""
    if not rows:
        return "_(no rows)_\n"
    columns = list(columns or rows[0].keys())
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    for r in rows:
        lines.append("| " + " | ".join(fmt(r.get(c, ""), digits) for c in columns) + " |")
    return "\n".join(lines) + "\n"


class Report:
    """Collects Markdown sections, figures and metrics for one run folder.

    Example:
        >>> import tempfile
        >>> r = Report(tempfile.mkdtemp(), "demo")
        >>> r.text("Hello.")
        >>> r.metrics["answer"] = 42
        >>> r.save().name
        'report.md'
    """

    def __init__(self, folder: str | Path, title: str, config: Mapping[str, Any] | None = None) -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.title = title
        self.config = dict(config or {})
        self.sections: list[str] = []
        self.lead: list[str] = []  # printed right under the title, before every section (the claims table)
        self.metrics: dict[str, Any] = {}

    def heading(self, text: str, level: int = 2) -> None:
        self.sections.append(f"{'#' * level} {text}\n")

    def text(self, text: str) -> None:
        self.sections.append(text.rstrip() + "\n")

    def table(
        self, rows: Sequence[Mapping[str, object]], columns: Sequence[str] | None = None, digits: int = 4
    ) -> None:
        self.sections.append(markdown_table(rows, columns, digits))

    def claims(self, claims: Sequence[Any], intro: str = "") -> None:
        """Open the report with the claims table (``mergelab.analysis.verdict.Claim`` rows) and keep them in
        metrics["claims"]; may be called after the sections are written, since results come last."""
        from mergelab.report.claims import claims_table

        text = (
            "## Claims and verdicts\n\n" + (intro.rstrip() + "\n\n" if intro else "") + claims_table(claims)
        )
        self.lead = [text]
        self.metrics["claims"] = [c.to_dict() for c in claims]

    def figure(self, path: str | Path, caption: str) -> None:
        rel = Path(path).resolve().relative_to(self.folder.resolve())
        self.sections.append(f"![{caption}]({rel.as_posix()})\n\n*{caption}*\n")

    def plot(self, fig: Any, name: str, caption: str, dpi: int = 110) -> Path:
        """Lay out, save as ``name`` in the run folder and close a matplotlib figure, then add it with ``caption``."""
        import matplotlib.pyplot as plt

        fig.tight_layout()
        path = self.folder / name
        fig.savefig(path, dpi=dpi)
        plt.close(fig)
        self.figure(path, caption)
        return path

    def save(self) -> Path:
        """Write report.md and metrics.json (with config, versions and time) and return report.md's path."""
        import torch

        env = {
            "python": sys.version.split()[0],
            "torch": torch.__version__,
            "platform": platform.platform(),
            "written": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        (self.folder / "metrics.json").write_text(
            json.dumps(
                {"title": self.title, "config": self.config, "environment": env, "metrics": self.metrics},
                indent=2,
                default=_default,
            )
            + "\n"
        )
        head = [
            f"# {self.title}\n",
            f"_Written {env['written']} · torch {env['torch']} · python {env['python']}_\n",
            *self.lead,
        ]
        if self.config:
            head.append(
                "<details><summary>Configuration</summary>\n\n```json\n"
                + json.dumps(self.config, indent=2, default=_default)
                + "\n```\n</details>\n"
            )
        path = self.folder / "report.md"
        path.write_text("\n".join(head + self.sections))
        return path


def _default(o: object) -> object:
    if isinstance(o, Path):
        return str(o)
    if hasattr(o, "item"):
        return o.item()
    if hasattr(o, "tolist"):
        return o.tolist()
    if hasattr(o, "to_dict"):
        return o.to_dict()
    return repr(o)
