"""The rendered pages: escaping, self-contained images that decode, tables that match the events."""

from __future__ import annotations

import base64
import io
import json
import re
import sys
from html.parser import HTMLParser
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image

from nanguard.errors import UsageError
from nanguard.report import render_report, write_reports
from nanguard.report.charts import MAX_CARDS
from nanguard.report.html_cards import MAX_EVENT_ROWS
from nanguard.report.markdown_page import md_esc, md_literal
from nanguard.report.text import LR_BACKOFFS_LABEL, ROOT_MODULE, format_time

from .conftest import write_many_events_run

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


class PageParser(HTMLParser):
    """Collects what the tests look at: tags seen, <img> sources, events-table rows, all text."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: list[str] = []
        self.images: list[dict[str, str | None]] = []
        self.links: list[str] = []
        self.table_rows: list[list[str]] = []
        self.text: list[str] = []
        self.cards: list[str] = []
        self.counts: dict[str, list[str]] = {}
        self._count_key: str | None = None
        self._in_events_table = False
        self._row: list[str] | None = None
        self._cell: list[str] | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append(tag)
        attributes = dict(attrs)
        if tag == "img":
            self.images.append(attributes)
        if tag == "article" and "card" in (attributes.get("class") or ""):
            self.cards.append(attributes.get("id") or "")
        if attributes.get("data-count"):
            self._count_key = attributes["data-count"]
        if tag in ("a", "link") and attributes.get("href"):
            self.links.append(attributes["href"] or "")
        if tag == "table" and attributes.get("id") == "events-table":
            self._in_events_table = True
        if self._in_events_table and tag == "tr":
            self._row = []
        if self._row is not None and tag == "td":
            self._cell = []

    def handle_endtag(self, tag: str) -> None:
        if tag == "td" and self._row is not None and self._cell is not None:
            self._row.append("".join(self._cell).strip())
            self._cell = None
        if tag == "tr" and self._row:
            self.table_rows.append(self._row)
            self._row = None
        if tag == "table":
            self._in_events_table = False

    def handle_data(self, data: str) -> None:
        self.text.append(data)
        if self._count_key is not None and data.strip():
            self.counts.setdefault(self._count_key, []).append(data.strip())
            self._count_key = None
        if self._cell is not None:
            self._cell.append(data)


def parse(path: Path) -> PageParser:
    parser = PageParser()
    parser.feed(path.read_text(encoding="utf-8"))
    return parser


def decode_png(data: bytes) -> Image.Image:
    assert data.startswith(PNG_SIGNATURE)
    image = Image.open(io.BytesIO(data))
    image.load()
    assert image.width > 100 and image.height > 100
    return image


def read_events(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "events.jsonl").read_text().splitlines() if line.strip()]


def test_render_writes_html_md_and_pngs(run_dir: Path) -> None:
    html_path = render_report(run_dir)
    assert html_path == run_dir / "report.html"
    assert (run_dir / "report.md").is_file()
    pngs = sorted(p.name for p in (run_dir / "report_files").iterdir())
    assert pngs == ["curves.png", "lr_multiplier.png", "problemA_modules.png"]
    for name in pngs:
        decode_png((run_dir / "report_files" / name).read_bytes())


def test_every_img_is_an_inline_png_that_decodes(run_dir: Path) -> None:
    page = parse(render_report(run_dir))
    assert len(page.images) == 3
    for image in page.images:
        src = image["src"] or ""
        assert src.startswith("data:image/png;base64,")
        decode_png(base64.b64decode(src.split(",", 1)[1], validate=True))
        assert image.get("alt")


def test_page_is_self_contained(run_dir: Path) -> None:
    page = parse(render_report(run_dir))
    assert "script" not in page.tags and "link" not in page.tags and "iframe" not in page.tags
    assert all(href.startswith("#") for href in page.links)
    raw = (run_dir / "report.html").read_text()
    assert "http://" not in raw and "https://" not in raw and "url(" not in raw


def test_events_table_matches_events_jsonl(run_dir: Path) -> None:
    page = parse(render_report(run_dir))
    expected = []
    for index, event in enumerate(read_events(run_dir), start=1):
        d = event["diagnosis"]
        expected.append([str(index), str(event["step"]), "ABC"[index - 1], event["trigger"], None, d["cause"],
                         d["phase"], d.get("module") or "—", d.get("op") or "—", d.get("tensor") or "—"])
    assert len(page.table_rows) == len(expected)
    for row, want in zip(page.table_rows, expected, strict=True):
        want[4] = row[4]  # the action cell holds the readable badge; checked below
        assert row == want
    assert [row[4] for row in page.table_rows] == ["skipped", "rolled back", "LR backed off"]


def test_header_says_what_happened(run_dir: Path) -> None:
    page = parse(render_report(run_dir))
    text = " ".join(page.text)
    assert "3 events: NaN loss at step 120 (skipped), loss spike at step 300 (rolled back)" in text
    assert "run ended finite at step 399 (last training loss 1.813)" in text
    assert "What to do" in text and "compute attention scores in float32" in text
    assert "nanguard run train.py --lr 3e-4" in text  # summary.json is shown


def test_user_strings_are_escaped_in_html(evil_run_dir: Path, facts) -> None:
    html_path = render_report(evil_run_dir)
    raw = html_path.read_text()
    page = parse(html_path)
    assert "script" not in page.tags
    assert "<script>" not in raw and "<b>x</b>" not in raw
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in raw
    text = "".join(page.text)
    assert facts["evil_module"] in text and "<b>x</b>" in text  # shown literally, as text
    assert page.table_rows[0][7] == facts["evil_module"]


def test_user_strings_are_escaped_in_markdown(evil_run_dir: Path, facts) -> None:
    render_report(evil_run_dir)
    md = (evil_run_dir / "report.md").read_text()
    assert "<script>" not in md and "<b>x</b>" not in md
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in md
    assert md_esc("a_b|c*d`e") == r"a_b\|c\*d\`e"  # intraword "_" cannot start emphasis: left readable
    assert md_esc("_x_ [y](z)") == r"\_x\_ \[y\](z)"


def test_markdown_content(run_dir: Path) -> None:
    render_report(run_dir)
    md = (run_dir / "report.md").read_text()
    assert md.startswith("<!-- nanguard report -->\n# nanguard run report")
    assert "**3 events: NaN loss at step 120 (skipped)" in md
    assert "## What to do" in md and "1. compute attention scores in float32" in md
    assert "| 1 | 120 | A | nonfinite_loss | skip | forward_overflow | forward |" in md
    assert "![Loss and gradient norm against step, events marked by problem](report_files/curves.png)" in md
    assert "(report_files/problemA_modules.png)" in md
    assert "**Evidence (step 120)**" in md and "**Fixes**" in md and "## Run summary" in md


def test_without_matplotlib_the_report_still_renders(run_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    html_path = render_report(run_dir)
    page = parse(html_path)
    assert page.images == [] and len(page.table_rows) == 3
    assert "pip install 'nanguard[report]'" in " ".join(page.text)
    md = (run_dir / "report.md").read_text()
    assert "pip install 'nanguard\\[report\\]'" in md and "![" not in md
    assert not (run_dir / "report_files").exists()


def test_history_only_and_no_event_runs(make_run, tmp_path: Path) -> None:
    run_dir = make_run(tmp_path / "quiet", events=False, summary=False)
    page = parse(render_report(run_dir))
    text = " ".join(page.text)
    assert "No events: every guarded step was finite" in text and page.table_rows == []
    assert len(page.images) == 2  # curves and LR multiplier, no module charts


def test_out_paths_and_formats(run_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "elsewhere" / "r.html"
    out.parent.mkdir()
    assert write_reports(run_dir, out, "both") == [out, out.with_suffix(".md")]
    assert (out.parent / "r_files" / "curves.png").is_file()
    assert write_reports(run_dir, tmp_path / "only.md", "md") == [tmp_path / "only.md"]
    assert write_reports(run_dir, out.parent, "html") == [out.parent / "report.html"]
    with pytest.raises(UsageError, match="--format 'pdf'"):
        write_reports(run_dir, None, "pdf")


def test_never_overwrites_a_file_that_is_not_a_report(run_dir: Path, tmp_path: Path) -> None:
    precious = tmp_path / "notes.html"
    precious.write_text("<p>my notes</p>")
    with pytest.raises(UsageError, match="not a nanguard report; refusing to overwrite"):
        write_reports(run_dir, precious, "html")
    assert precious.read_text() == "<p>my notes</p>"
    first = render_report(run_dir)
    assert render_report(run_dir) == first  # its own report is replaced
    assert not [p for p in run_dir.iterdir() if p.name.startswith(".")]  # no temp files left


def test_dollar_signs_in_module_names_do_not_break_plots(make_run, tmp_path: Path) -> None:
    run_dir = make_run(tmp_path / "d", history=False, summary=False)
    lines = read_events(run_dir)
    lines[0]["details"]["module_stats"][0]["module"] = "a$b$_{c}"
    lines[0]["trigger"] = "nonfinite_$x$"
    (run_dir / "events.jsonl").write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    page = parse(render_report(run_dir))
    assert len(page.images) == 2


def test_lr_backoff_tile_counts_rollbacks_that_halved_the_lr(rollback_run_dir: Path) -> None:
    page = parse(render_report(rollback_run_dir))
    raw = (rollback_run_dir / "report.html").read_text()
    assert f"<b>2</b><span>{LR_BACKOFFS_LABEL}</span>" in raw
    assert "rolled back" in " ".join(page.text)
    md = (rollback_run_dir / "report.md").read_text()
    header, _, values = md.split("\n\n", 2)[2].splitlines()[:3]
    cells = dict(zip(header.strip("| ").split(" | "), values.strip("| ").split(" | "), strict=True))
    assert cells[LR_BACKOFFS_LABEL] == "2" and cells["rolled back"] == "2"


def test_root_module_is_named_not_an_empty_code_tag(rollback_run_dir: Path) -> None:
    html_path = render_report(rollback_run_dir)
    raw = html_path.read_text()
    page = parse(html_path)
    assert "<code></code>" not in raw
    assert page.table_rows[0][7] == ROOT_MODULE  # module column of the step-10 event
    assert page.table_rows[1][7] == "—"  # not located stays a dash
    assert f"{ROOT_MODULE}</span>, tensor <code>loss_mask</code>" in raw  # findings and card "Where"
    md = (rollback_run_dir / "report.md").read_text()
    assert "<code></code>" not in md
    assert f"- Module: {ROOT_MODULE}" in md and f"Where: {ROOT_MODULE}, tensor <code>loss_mask</code>" in md
    assert "| 1 | 10 | A | nonfinite_loss | skip | input_nonfinite | data | (root module) | — |" in md


def test_markdown_keeps_backtick_code_spans_in_fixes_and_evidence(run_dir: Path) -> None:
    """report.md showed \\`nanguard scan\\` literally: the escaped backticks broke the code span."""
    render_report(run_dir)
    md = (run_dir / "report.md").read_text()
    assert "run `nanguard scan` on the data" in md
    assert "\\`" not in md
    raw = (run_dir / "report.html").read_text()
    assert "run <code>nanguard scan</code> on the data" in raw  # the HTML page renders them as code too


def test_markdown_escaping_keeps_structure_and_code() -> None:
    assert md_esc("use `blocks.0.attn` now") == "use `blocks.0.attn` now"
    assert md_esc("`a|b`", table=True) == r"`a\|b`" and md_esc("`a|b`") == "`a|b`"
    assert md_esc("`<script>`") == "<code>&lt;script&gt;</code>"  # entities do not work inside code spans
    assert md_esc("``a`b``") == "``a`b``"
    assert md_esc("# not a heading") == r"\# not a heading" and md_esc("1. not a list") == r"1\. not a list"
    assert md_esc("812.5") == "812.5" and md_esc("-inf") == "-inf"
    assert md_literal("`x`") == r"\`x\`"


@given(st.text(max_size=80))
def test_markdown_escaping_never_emits_html_or_unpaired_structure(text: str) -> None:
    for escaped in (md_esc(text), md_esc(text, table=True), md_literal(text)):
        assert "<" not in escaped.replace("<code>", "").replace("</code>", "")
        assert "\n" not in escaped and not escaped.startswith(("# ", "- ", "+ "))
    assert re.search(r"(?<!\\)`", md_literal(text).replace("\\\\", "")) is None
    assert re.search(r"(?<!\\)\|", md_esc(text, table=True).replace("\\\\", "")) is None


def test_every_problem_gets_a_card_and_a_module_chart(run_dir: Path) -> None:
    """Only the first 3 events got a module chart ("event 4 gets no chart"); now every problem does."""
    lines = read_events(run_dir)
    stats = lines[0]["details"]["module_stats"]
    records = [{**lines[0], "step": 100 + k,
                "diagnosis": {**lines[0]["diagnosis"], "module": f"blocks.{k}.attn"}, "details": {"module_stats": stats}}
               for k in range(5)]
    (run_dir / "events.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n")
    page = parse(render_report(run_dir))
    assert page.cards == [f"problem-{letter}" for letter in "ABCDE"]
    files = sorted((run_dir / "report_files").glob("problem*_modules.png"))
    assert [p.name for p in files] == [f"problem{letter}_modules.png" for letter in "ABCDE"]
    inline = {base64.b64decode((image["src"] or "").split(",", 1)[1]) for image in page.images}
    assert {p.read_bytes() for p in files} <= inline  # drawn once: the same bytes in both reports
    md = (run_dir / "report.md").read_text()
    assert md.count("_modules.png)") == 5


def test_nine_thousand_events_give_a_small_report(tmp_path: Path) -> None:
    """A run with 9,090 events wrote a 12 MB report.html with a card per event."""
    run_dir = write_many_events_run(tmp_path / "many", count=9000, problems=5)
    page = parse(render_report(run_dir))
    size = (run_dir / "report.html").stat().st_size
    assert size < 1_000_000, size
    assert page.cards == [f"problem-{letter}" for letter in "ABCDE"]
    assert len(page.table_rows) == MAX_EVENT_ROWS
    text = " ".join(page.text)
    assert f"The first {MAX_EVENT_ROWS} of 9000 events are listed" in text
    assert "9000 events of 5 kinds" in text and page.counts["events"] == ["9000"]
    assert (run_dir / "report.md").stat().st_size < 200_000


def test_more_problems_than_cards_are_listed_in_the_problems_table(tmp_path: Path) -> None:
    run_dir = write_many_events_run(tmp_path / "distinct", count=MAX_CARDS + 6, problems=MAX_CARDS + 6, stats=False)
    page = parse(render_report(run_dir))
    assert len(page.cards) == MAX_CARDS
    assert f"{MAX_CARDS} of {MAX_CARDS + 6} distinct problems have a card" in " ".join(page.text)
    md = (run_dir / "report.md").read_text()
    assert len(re.findall(r"^### [A-Z]+ · ", md, re.MULTILINE)) == MAX_CARDS


def test_header_tiles_and_run_summary_show_the_same_counts(repeated_run_dir: Path) -> None:
    page = parse(render_report(repeated_run_dir))
    counts = page.counts
    assert counts["events"] == ["30", "30"] and counts["signatures"] == ["3"]
    assert counts["skipped"] == ["27"] and counts["rollbacks"] == ["3", "3"]
    assert counts["updates_not_applied"] == ["30", "30"]  # tile, and summary.json's "skipped" under its real name
    assert counts["steps"] == ["130", "130"]
    text = " ".join(page.text)
    assert "summary.json says" not in text


def test_what_to_do_lists_each_fix_once(repeated_run_dir: Path) -> None:
    """The same aten::log fix was listed four times, each with a different zero count."""
    render_report(repeated_run_dir)
    raw = (repeated_run_dir / "report.html").read_text()
    todo = raw.split('<section class="todo">', 1)[1].split("</section>", 1)[0]
    assert todo.count("clamp the probabilities") == 1
    assert "problem A · steps 20–89, 24 events; numbers from step 20" in todo
    md = (repeated_run_dir / "report.md").read_text()
    assert md.split("## What to do", 1)[1].split("##", 1)[0].count("clamp the probabilities") == 1


def test_repeats_are_told_once_per_problem(repeated_run_dir: Path) -> None:
    page = parse(render_report(repeated_run_dir))
    text = " ".join(page.text)
    assert page.cards == ["problem-A", "problem-B", "problem-C"]
    assert "Also at 23 other steps" in text and text.count("aten::log received") == 1
    assert "What made it worse" in text and "input_extreme_scale" in text  # diagnosis.contributing
    assert len(page.table_rows) == 30 and {row[2] for row in page.table_rows} == {"A", "B", "C"}
    raw = (repeated_run_dir / "report.html").read_text()
    assert "model[0]" in raw and "<code>0</code>, op" not in raw  # "module '0'" reads as the indexing


def test_card_times_and_summary_values_read_as_words(run_dir: Path) -> None:
    summary = json.loads((run_dir / "summary.json").read_text())
    (run_dir / "summary.json").write_text(json.dumps({**summary, "aborted": False, "causes": ["a_b", "c"]}))
    page = parse(render_report(run_dir))
    text = " ".join(page.text)
    assert re.search(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC", text) and "+00:00" not in text
    assert "a_b, c" in text and "False" not in text
    assert format_time("2026-11-25T20:36:15.941711+00:00") == "2026-11-25 20:36:15 UTC"
    assert format_time("yesterday") == "yesterday"
