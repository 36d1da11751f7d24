"""Pieces every part of the HTML page uses: escaping, badges, names, images, the style sheet.

Every string that came from the run (module names, evidence, fixes, tensor names, summary values)
goes through :func:`esc`; only numbers this package formats itself go in unescaped.
"""

from __future__ import annotations

import base64
import html
from typing import Any

from nanguard.report.charts import Chart
from nanguard.report.load import EventRecord
from nanguard.report.text import ROOT_MODULE, action_phrase, module_name, split_code_spans

CSS = """
*{box-sizing:border-box}
body{margin:0;background:#f1f3f5;color:#212529;font:15px/1.5 -apple-system,"Segoe UI",Roboto,"Helvetica Neue",Arial,sans-serif}
main{max-width:1180px;margin:0 auto;padding:24px}
code,pre{font:13px/1.45 "SFMono-Regular",Menlo,Consolas,"Liberation Mono",monospace}
code{background:#f1f3f5;border-radius:4px;padding:1px 5px;overflow-wrap:anywhere}
header.verdict{border-radius:10px;padding:20px 24px;color:#fff;margin-bottom:20px}
.state-finite{background:#2b8a3e}.state-non-finite,.state-aborted{background:#c92a2a}.state-unknown{background:#495057}
.state-finite.with-events{background:#e8590c}
.kicker{opacity:.9;font-size:13px;letter-spacing:.02em}
.kicker code{background:rgba(255,255,255,.18);color:#fff}
h1{font-size:23px;line-height:1.3;margin:6px 0 14px}
.tiles{display:flex;flex-wrap:wrap;gap:10px}
.tile{background:rgba(255,255,255,.16);border-radius:8px;padding:6px 12px;min-width:96px}
.tile b{display:block;font-size:19px}.tile span{font-size:12px;opacity:.92}
section{background:#fff;border-radius:10px;padding:18px 22px;margin-bottom:18px;box-shadow:0 1px 2px rgba(0,0,0,.06)}
h2{font-size:18px;margin:0 0 12px}
h3{font-size:16px;margin:0}
h4{font-size:13px;text-transform:uppercase;letter-spacing:.05em;color:#495057;margin:14px 0 4px}
ol.findings{padding-left:22px;margin:0}ol.findings li{margin:8px 0}
ol.findings .sub{color:#495057;font-size:14px}
section.todo{border-left:6px solid #1c7ed6}
section.todo ol{margin:0;padding-left:22px}section.todo li{margin:5px 0}
.count{color:#868e96;font-size:13px}
img.chart{display:block;max-width:100%;height:auto;margin:6px auto}
table{border-collapse:collapse;width:100%;font-size:14px}
th,td{text-align:left;padding:6px 8px;border-bottom:1px solid #dee2e6;vertical-align:top}
th{background:#f8f9fa;font-weight:600}
td.num{text-align:right;white-space:nowrap}
.badge{display:inline-block;border-radius:999px;padding:1px 10px;font-size:12px;font-weight:600;color:#fff;white-space:nowrap}
.a-skip{background:#e8590c}.a-clip{background:#e0a800;color:#212529}.a-rollback{background:#7048e8}
.a-lr_backoff{background:#1c7ed6}.a-abort{background:#c92a2a}.a-none,.a-other{background:#868e96}
article.card{border:1px solid #dee2e6;border-left:6px solid #868e96;border-radius:8px;padding:14px 18px;margin:14px 0}
article.c-skip{border-left-color:#e8590c}article.c-clip{border-left-color:#e0a800}
article.c-rollback{border-left-color:#7048e8}article.c-lr_backoff{border-left-color:#1c7ed6}
article.c-abort{border-left-color:#c92a2a}
.card-head{display:flex;gap:10px;align-items:center;flex-wrap:wrap}
p.cause{font-size:16px;margin:10px 0 6px}
dl.where{display:grid;grid-template-columns:max-content 1fr max-content 1fr;gap:3px 14px;margin:6px 0}
p.where{margin:4px 0 8px}
dl.where dt{color:#495057}dl.where dd{margin:0}
.root{font-style:italic;color:#495057}
.meter{display:inline-block;width:90px;height:8px;background:#e9ecef;border-radius:4px;vertical-align:middle;margin-right:6px}
.meter i{display:block;height:100%;background:#1c7ed6;border-radius:4px}
ol.fixes li{background:#e7f5ff;border-radius:6px;padding:4px 10px;margin:4px 0}
ul.evidence li{margin:2px 0}
.note{background:#fff3bf;border-radius:6px;padding:8px 12px}
details.events>summary{cursor:pointer;font-weight:600;margin:4px 0}
details pre,pre.json{background:#f8f9fa;padding:10px;border-radius:6px;overflow:auto;white-space:pre-wrap;overflow-wrap:anywhere}
footer{color:#868e96;font-size:12px;text-align:center;padding:8px}
.letter{display:inline-block;min-width:26px;height:26px;border-radius:13px;background:#343a40;color:#fff;font-weight:700;
text-align:center;line-height:26px;padding:0 6px;font-size:14px}
a.letter{text-decoration:none}
table .letter{min-width:20px;height:20px;line-height:20px;font-size:12px;padding:0 4px}
p.steps{color:#495057;font-size:13px;margin:4px 0}
td.where code{white-space:nowrap}
.more{color:#868e96;font-size:13px;margin:6px 0}
"""


def esc(value: Any) -> str:
    return html.escape("" if value is None else str(value), quote=True)


def esc_text(value: Any) -> str:
    """Escaped prose in which `backtick spans` (as fixes and evidence write names) become <code>."""
    parts = split_code_spans("" if value is None else str(value))
    return "".join(f"<code>{esc(part)}</code>" if i % 2 else esc(part) for i, part in enumerate(parts))


def code_or_dash(value: str | None) -> str:
    return f"<code>{esc(value)}</code>" if value is not None else "—"


def module_html(value: str | None) -> str:
    """The root module (``''``) in words, a named one as code (``0`` as ``model[0]``), an unknown one as a dash."""
    if value == "":
        return f'<span class="root">{ROOT_MODULE}</span>'
    return code_or_dash(module_name(value))


def action_class(action: str) -> str:
    known = ("skip", "clip", "rollback", "lr_backoff", "abort", "none")
    return f"a-{action}" if action in known else "a-other"


def badge(action: str, count: int | None = None) -> str:
    times = f" ×{count}" if count is not None and count > 1 else ""
    return f'<span class="badge {action_class(action)}">{esc(action_phrase(action))}{times}</span>'


def img(chart: Chart) -> str:
    data = base64.b64encode(chart.png).decode("ascii")
    return f'<img class="chart" alt="{esc(chart.alt)}" src="data:image/png;base64,{data}">'


def where_html(event: EventRecord) -> str:
    parts = [module_html(value) if label == "module" and value == "" else
             f"{label} {module_html(value) if label == 'module' else code_or_dash(value)}"
             for label, value in (("module", event.module), ("op", event.op), ("tensor", event.tensor))
             if value is not None]
    return ", ".join(parts)
