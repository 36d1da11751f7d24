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
