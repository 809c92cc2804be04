"""Reports of runs: Markdown and CSV tables, PNG plots, and the tables committed in results/.

``python -m dpbench.report DIR... [--plot]``; see ``dpbench.report.__main__``.
"""

from dpbench.report.runs import Run, load_runs, read_run
from dpbench.report.table import csv_text, markdown, rank_grid, table

__all__ = ["Run", "csv_text", "load_runs", "markdown", "rank_grid", "read_run", "table"]
