"""promed_jax.evaluation: reactive / proactive / full-information evaluation and its report."""

from promed_jax.evaluation.report import Summary, markdown_table, summarize, write_report

__all__ = ["Summary", "markdown_table", "summarize", "write_report"]
