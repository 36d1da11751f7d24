"""Everything a page template needs, computed once: the run, its overview, and the drawn charts."""

from __future__ import annotations

from dataclasses import dataclass

from nanguard.report.charts import Chart
from nanguard.report.load import RunData
from nanguard.report.overview import Overview


@dataclass(frozen=True)
class ReportContent:
    run: RunData
    overview: Overview
    charts: list[Chart]
    plot_note: str | None = None
