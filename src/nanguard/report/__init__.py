"""The run report: HTML and Markdown pages, with plots, of what the guard saw and did.

    from nanguard.report import render_report
    render_report("runs/exp1")   # -> runs/exp1/report.html (+ report.md, report_files/*.png)

Importing this package is light: matplotlib is imported only when a chart is drawn.
"""

from nanguard.report.load import RunData, load_run
from nanguard.report.render import render_report, write_reports

__all__ = ["RunData", "load_run", "render_report", "write_reports"]
