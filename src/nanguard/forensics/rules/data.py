"""Rules of the data family: the batch itself is bad (non-finite values, labels or token ids out of range),
and the batch of extreme scale that drove the step (a driver, checked here next to the other batch checks)."""

from __future__ import annotations

from typing import Any

from nanguard.events import Diagnosis
from nanguard.forensics.rules.facts import Facts, count, fmt, make, mod


def _at(finding: dict[str, Any], words: str) -> str:
    """"; first at [2, 17]" for a field of two or more dimensions (which token or feature), else nothing."""
    positions = [p for p in finding.get("positions") or [] if len(p) >= 2]
    return f"; {words} {', '.join(str(p) for p in positions[:3])}" if positions else ""


def rule_input_nonfinite(f: Facts) -> Diagnosis | None:
    if not f.batch_nonfinite:
        return None
    first = f.batch_nonfinite[0]
    evidence = [
        f"batch field `{b['field']}` holds "
        f"{', '.join(count(n, w) for n, w in ((b['nan'], 'NaN'), (b['inf'], 'Inf')) if n)} among {b['numel']:,} "
        f"values (rows {b['rows']}{_at(b, 'first at')})"
        for b in f.batch_nonfinite[:4]
    ]
    used = next(
        (b for b in f.births if b.phase == "input" and b.source == f"batch field {first['field']}"), None
    )
    if used is not None and used.extra.get("first_used_by"):
        evidence.append(f"first used by {used.extra['first_used_by']} in {mod(used.module)}")
    return make(
        "input_nonfinite",
        "data",
        confidence=0.97,
        evidence=evidence,
        tensor=first["field"],
        module=used.module if used is not None else None,
        reproducible=f.reproduced,
        fix={"rows": first["rows"]},
    )


def rule_label_out_of_range(f: Facts) -> Diagnosis | None:
    if f.labels:
        first = f.labels[0]
        evidence = [lab["evidence"] for lab in f.labels[:4]]
        if f.exception is not None and f.exception["kind"] in ("target_out_of_bounds", "class_out_of_range"):
            evidence.append(f"the step raised {f.exception['text']}")
        return make(
            "label_out_of_range",
            "data",
            confidence=0.95,
            evidence=evidence,
            tensor=first.get("field"),
            module=first.get("module"),
            op=first.get("op"),
            reproducible=True,
            fix={"classes": first.get("num_classes"), "needed": first.get("needed")},
        )
    if f.tokens:
        first = f.tokens[0]
        evidence = [
            f"token id {t['max']} >= num_embeddings {t['num_embeddings']} of {mod(t['module'])} "
            f"(field `{t.get('field') or '?'}`, {t['out_of_range']} id(s) out of range)"
            for t in f.tokens[:4]
        ]
        if f.exception is not None:
            evidence.append(f"the step raised {f.exception['text']}")
        return make(
            "label_out_of_range",
            "data",
            confidence=0.9,
            evidence=evidence,
            tensor=first.get("field"),
            module=first.get("module"),
            op=first.get("op"),
            reproducible=True,
            variant="tokens",
            fix={"classes": first["num_embeddings"]},
        )
    return None


def rule_extreme_scale(f: Facts) -> Diagnosis | None:
    if not f.extreme_scale:
        return None
    first = max(f.extreme_scale, key=lambda e: e["ratio"])
    evidence = [
        f"batch field `{e['field']}`: abs-max {fmt(e['absmax'])} vs median {fmt(e['history_median'])} of earlier "
        f"batches ({fmt(e['ratio'])}x; previous max {fmt(e['history_max'])})"
        for e in f.extreme_scale[:4]
    ]
    if f.loss is not None:
        evidence.append(f"loss {fmt(f.loss)}")
    return make(
        "input_extreme_scale",
        "data",
        confidence=0.85,
        evidence=evidence,
        tensor=first["field"],
        reproducible=f.reproduced,
        fix={"ratio": fmt(first["ratio"])},
    )


