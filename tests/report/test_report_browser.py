"""Open the report in headless Chromium: it must render, its images must decode, no script errors.

The real report has no JavaScript. To read ``naturalWidth`` of its images, a *test copy* of the page
gets a tiny probe script that writes those widths into the DOM, which ``--dump-dom`` then prints.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from PIL import Image, ImageStat

from nanguard.report import render_report

CHROMIUM = next((path for path in ("/usr/bin/chromium", shutil.which("chromium"), shutil.which("chromium-browser"),
                                   shutil.which("google-chrome")) if path and os.path.exists(path)), None)
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="Chromium is not installed (apt-get install chromium)")

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]
PROBE = (
    '<script>window.addEventListener("load", function () {'
    'var p = document.createElement("pre"); p.id = "nanguard-probe";'
    "p.textContent = JSON.stringify(Array.from(document.images).map(function (i) { return i.naturalWidth; }));"
    "document.body.appendChild(p); });</script>"
)


def chromium(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    profile = tmp_path / f"profile{len(list(tmp_path.glob('profile*')))}"
    return subprocess.run([CHROMIUM or "chromium", *FLAGS, f"--user-data-dir={profile}", *args],
                          capture_output=True, text=True, timeout=120, check=False)


def test_screenshot_is_rendered_and_not_blank(evil_run_dir: Path, tmp_path: Path) -> None:
    html_path = render_report(evil_run_dir)
    shot = tmp_path / "report.png"
    result = chromium(tmp_path, f"--screenshot={shot}", "--window-size=1280,2000", html_path.resolve().as_uri())
    assert shot.is_file(), result.stderr[-2000:]
    with Image.open(shot) as image:
        image.load()
        assert image.size == (1280, 2000)
        variance = ImageStat.Stat(image.convert("L")).var[0]
    assert variance > 0


def test_images_decode_and_no_script_errors(evil_run_dir: Path, tmp_path: Path) -> None:
    html_path = render_report(evil_run_dir)
    page = html_path.read_text(encoding="utf-8")
    assert "<script" not in page  # the real report has no JavaScript; only the test copy below does
    expected_images = page.count("<img ")
    probe_copy = tmp_path / "probe.html"
    probe_copy.write_text(page.replace("</body>", PROBE + "</body>"), encoding="utf-8")
    result = chromium(tmp_path, "--virtual-time-budget=5000", "--enable-logging=stderr", "--v=0", "--dump-dom",
                      probe_copy.resolve().as_uri())
    assert "Uncaught" not in result.stderr
    match = re.search(r'<pre id="nanguard-probe">([^<]*)</pre>', result.stdout)
    assert match, result.stderr[-2000:]
    widths = json.loads(match.group(1))
    assert len(widths) == expected_images == 3
    assert all(width > 0 for width in widths)
    # The escaped module name arrived in the DOM as text, not as an element.
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in result.stdout


LAYOUT_PROBE = """<script>window.addEventListener("load", function () {
  var labels = Array.from(document.querySelectorAll(
      ".tile, .badge, .letter, .card-head h3, dl.where dt, dl.where dd, th, h1, h2"))
    .filter(function (e) { return e.checkVisibility() && e.getClientRects().length > 0; });
  var boxes = labels.map(function (e) { return [e, e.getBoundingClientRect()]; });
  var overlaps = [];
  for (var i = 0; i < boxes.length; i++) for (var j = i + 1; j < boxes.length; j++) {
    var a = boxes[i], b = boxes[j];
    if (a[0].contains(b[0]) || b[0].contains(a[0])) continue;
    var w = Math.min(a[1].right, b[1].right) - Math.max(a[1].left, b[1].left);
    var h = Math.min(a[1].bottom, b[1].bottom) - Math.max(a[1].top, b[1].top);
    if (w > 1 && h > 1) overlaps.push([a[0].textContent.trim(), b[0].textContent.trim()]);
  }
  var overflowing = labels.filter(function (e) { return e.scrollWidth > e.clientWidth + 1 && e.clientWidth > 0; })
    .map(function (e) { return e.textContent.trim(); });
  var counts = {};
  document.querySelectorAll("[data-count]").forEach(function (e) {
    var key = e.getAttribute("data-count");
    var value = (e.querySelector("b") || e).firstChild.textContent.trim();
    (counts[key] = counts[key] || []).push(value);
  });
  var p = document.createElement("pre"); p.id = "nanguard-layout";
  p.textContent = JSON.stringify({overlaps: overlaps, overflowing: overflowing, counts: counts,
    cards: document.querySelectorAll("article.card").length,
    problems: document.querySelectorAll("#problems-table tbody tr").length,
    images: Array.from(document.images).map(function (i) { return i.naturalWidth; })});
  document.body.appendChild(p);
});</script>"""


def layout(html_path: Path, tmp_path: Path) -> dict:
    """What a person sees, measured by the browser: label boxes that overlap, counts shown, cards drawn."""
    page = html_path.read_text(encoding="utf-8")
    probe_copy = tmp_path / f"layout-{html_path.parent.name}.html"
    probe_copy.write_text(page.replace("</body>", LAYOUT_PROBE + "</body>"), encoding="utf-8")
    result = chromium(tmp_path, "--window-size=1280,2000", "--virtual-time-budget=5000", "--dump-dom",
                      probe_copy.resolve().as_uri())
    match = re.search(r'<pre id="nanguard-layout">([^<]*)</pre>', result.stdout)
    assert match, result.stderr[-2000:]
    return json.loads(match.group(1).replace("&amp;", "&").replace("&lt;", "<").replace("&gt;", ">"))


def test_thirty_event_report_one_card_per_problem_consistent_counts_no_overlaps(repeated_run_dir: Path,
                                                                               tmp_path: Path) -> None:
    seen = layout(render_report(repeated_run_dir), tmp_path)
    assert seen["overlaps"] == [] and seen["overflowing"] == []
    assert seen["cards"] == seen["problems"] == 3
    assert all(len(set(values)) == 1 for values in seen["counts"].values()), seen["counts"]
    assert seen["counts"]["events"][0] == "30" and seen["counts"]["skipped"] == ["27"]
    assert seen["counts"]["updates_not_applied"] == ["30", "30"]  # the tile and the run summary's "skipped"
    assert len(seen["images"]) == 3 and all(width > 0 for width in seen["images"])  # curves, LR, problem A's modules


def test_demo_like_report_counts_agree_between_header_and_summary(tmp_path: Path) -> None:
    """The demo's header said 2 skipped and 2 rollbacks while its run summary said skipped 4."""
    from .test_counts import demo_like_run

    seen = layout(render_report(demo_like_run(tmp_path / "demo")), tmp_path)
    assert seen["overlaps"] == []
    counts = seen["counts"]
    assert counts["skipped"] == ["2"] and counts["rollbacks"] == ["2", "2"]
    assert counts["updates_not_applied"] == ["4", "4"] and counts["steps"] == ["400", "400"]
    assert seen["cards"] == 4


def test_the_layout_probe_sees_overlapping_tiles(tmp_path: Path, make_run) -> None:
    html_path = render_report(make_run(tmp_path / "run"))
    html_path.write_text(html_path.read_text().replace(".tile{", ".tile{margin-left:-60px;"))
    assert ["finiterun ended", "400optimizer steps"] in layout(html_path, tmp_path)["overlaps"]
