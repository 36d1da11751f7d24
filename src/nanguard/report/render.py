"""Turn a run directory into ``report.html`` and/or ``report.md`` (+ ``report_files/*.png``).

Loading (``load``/``overview``), drawing (``plots``) and templating (``html_page``/``markdown_page``)
are separate modules; this one wires them and owns the file-system rules: files are written
atomically, and a file that is not a nanguard report is never overwritten.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from nanguard.errors import UsageError
from nanguard.report.charts import build_charts
from nanguard.report.content import ReportContent
from nanguard.report.html_page import GENERATOR, render_html
from nanguard.report.load import RunData, load_run
from nanguard.report.markdown_page import MARKER, render_markdown
from nanguard.report.overview import summarise

FORMATS = ("html", "md", "both")


def build_content(run: RunData) -> ReportContent:
    overview = summarise(run)
    drawn = build_charts(run, overview.groups)
    return ReportContent(run=run, overview=overview, charts=drawn.charts, plot_note=drawn.note)


def report_paths(run_dir: Path, out: str | os.PathLike[str] | None, fmt: str) -> dict[str, Path]:
    """Where each format goes: ``DIR/report.*`` by default; ``out`` names the file (or a folder for it).

    With both formats, ``out`` names the one its suffix matches and the other takes the other suffix.
    """
    if fmt not in FORMATS:
        raise UsageError(f"--format {fmt!r} is not one of {', '.join(FORMATS)}")
    wanted = ("html", "md") if fmt == "both" else (fmt,)
    if out is None:
        base = run_dir / "report"
    else:
        out_path = Path(out)
        base = out_path / "report" if out_path.is_dir() else out_path
        if base.suffix.lower() in (".html", ".htm", ".md") and len(wanted) == 1:
            return {wanted[0]: base}
        if base.suffix.lower() == ".md":
            return {kind: base if kind == "md" else base.with_suffix(".html") for kind in wanted}
        if base.suffix.lower() in (".html", ".htm"):
            return {kind: base if kind == "html" else base.with_suffix(".md") for kind in wanted}
    return {kind: base.with_name(f"{base.name}.{kind}") for kind in wanted}


def _is_own_report(path: Path, marker: str) -> bool:
    try:
        with open(path, encoding="utf-8", errors="replace") as handle:
            return marker in handle.read(4096)
    except OSError:
        return False


def _check_writable(path: Path, marker: str) -> None:
    if path.exists() and (not path.is_file() or not _is_own_report(path, marker)):
        raise UsageError(f"{path} exists and is not a nanguard report; refusing to overwrite it: choose another --out")
    if not path.parent.is_dir():
        raise UsageError(f"cannot write {path}: folder {path.parent} does not exist")


def write_atomic(path: Path, data: str | bytes) -> None:
    """Readers see the old file or the new one, never half of one."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        if isinstance(data, bytes):
            tmp.write_bytes(data)
        else:
            tmp.write_text(data, encoding="utf-8")
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_reports(run_dir: str | os.PathLike[str], out: str | os.PathLike[str] | None = None,
                  fmt: str = "both") -> list[Path]:
    """Render and write the requested formats; returns the written report files (HTML first)."""
    paths = report_paths(Path(run_dir), out, fmt)
    run = load_run(run_dir)
    for kind, path in paths.items():
        _check_writable(path, GENERATOR if kind == "html" else MARKER)
    content = build_content(run)
    written = []
    if "html" in paths:
        write_atomic(paths["html"], render_html(content))
        written.append(paths["html"])
    if "md" in paths:
        md_path = paths["md"]
        image_dir = f"{md_path.stem}_files"
        if content.charts:
            (md_path.parent / image_dir).mkdir(exist_ok=True)
            for chart in content.charts:
                write_atomic(md_path.parent / image_dir / f"{chart.name}.png", chart.png)
        write_atomic(md_path, render_markdown(content, image_dir))
        written.append(md_path)
    return written


def render_report(run_dir: str | os.PathLike[str], out: str | os.PathLike[str] | None = None,
                  *, formats: Sequence[str] = ("html", "md")) -> Path:
    """Write ``report.html`` and ``report.md`` for a run directory; returns the HTML path.

    ``out`` names the HTML file (the Markdown file goes next to it with a ``.md`` suffix). Raises
    :class:`~nanguard.errors.UsageError` for a missing directory or one without run files.
    """
    kinds = set(formats)
    fmt = "both" if kinds == {"html", "md"} else next(iter(kinds), "")
    return write_reports(run_dir, out, fmt)[0]
