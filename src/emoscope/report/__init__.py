"""Reports of a run: self-contained HTML pages (open offline) beside the JSON they show.

Pages are rendered from Jinja2 templates with autoescape on, so text from corpora, models and
users can never inject markup; see :mod:`emoscope.report.render`.
"""

from __future__ import annotations

from emoscope.report.extraction import TARGETS, summary_rows, write_report

__all__ = ["TARGETS", "summary_rows", "write_report"]
