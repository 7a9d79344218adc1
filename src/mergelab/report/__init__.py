"""Reports: every study writes report.md + PNG plots + metrics.json into one run folder."""

from mergelab.report.claims import claims_table
from mergelab.report.writer import Report, markdown_table, mean_std

__all__ = ["Report", "claims_table", "markdown_table", "mean_std"]
