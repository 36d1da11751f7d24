"""From evidence to exactly one cause: the rules, by cause family.

``Facts`` is everything the replays and checks found; :func:`diagnose` walks the rules in order and
the first that matches names the cause. The order encodes what explains what (DESIGN.md, "Where it was
born, and why"): the batch (``data``) before the training state (``state``) before the operator that
made the first non-finite value (``op``) before finite trouble (``driver``); a finite replay from
identical state is ``nondeterministic``; ``unknown`` says what was checked.

Adding a cause is one entry in :mod:`nanguard.causes` and one rule in the module of its family, listed
in ``RULES`` below.
"""

from __future__ import annotations

from collections.abc import Callable

from nanguard.events import Diagnosis
from nanguard.forensics.rules.data import rule_extreme_scale, rule_input_nonfinite, rule_label_out_of_range
from nanguard.forensics.rules.driver import (
    FLOAT32_NORM_OVERFLOW,
    driver_over_precision,
    rule_nondeterministic,
    rule_norm_overflow,
    rule_spikes,
    rule_unknown,
)
from nanguard.forensics.rules.facts import Facts
from nanguard.forensics.rules.ops import rule_exception, rule_from_trace, rule_masked_target
from nanguard.forensics.rules.state import (
    rule_optimizer_state,
    rule_update_flag,
    rule_update_sim,
    rule_weights,
)

Rule = Callable[[Facts], "Diagnosis | None"]

RULES: tuple[Rule, ...] = (
    rule_input_nonfinite,
    rule_label_out_of_range,
    rule_update_flag,
    rule_weights,
    rule_optimizer_state,
    rule_exception,
    rule_masked_target,
    rule_from_trace,
    rule_update_sim,
    rule_norm_overflow,
    rule_extreme_scale,
    rule_nondeterministic,
    rule_spikes,
)

# Causes that an input outlier can push an op into: the outlier is then named in ``contributing``.
_PUSHED_BY_OUTLIER = frozenset({
    "invalid_math_domain", "backward_singularity", "forward_overflow", "backward_overflow", "gradient_explosion",
    "masked_softmax_all_masked", "batchnorm_degenerate",
})


def diagnose(facts: Facts) -> Diagnosis:
    """The first rule that matches names the cause; ``unknown`` says what was checked."""
    for rule in RULES:
        diagnosis = rule(facts)
        if diagnosis is not None:
            return _with_outlier(facts, driver_over_precision(facts, diagnosis))
    return rule_unknown(facts)


def _with_outlier(facts: Facts, diagnosis: Diagnosis) -> Diagnosis:
    """An op's cause leads even when an input outlier pushed it there; the outlier follows in ``contributing``.

    DESIGN.md, "Where it was born, and why", clause (3): the place stays the birth's, and the outlier's
    fixes come after the op's own.
    """
    if not facts.extreme_scale or diagnosis.cause not in _PUSHED_BY_OUTLIER:
        return diagnosis
    outlier = rule_extreme_scale(facts)
    if outlier is None:
        return diagnosis
    item: dict[str, object] = {"cause": outlier.cause, "evidence": outlier.evidence[:3]}
    if outlier.tensor is not None:
        item["tensor"] = outlier.tensor
    diagnosis.contributing.append(item)
    diagnosis.fixes += [fix for fix in outlier.fixes if fix not in diagnosis.fixes]
    return diagnosis


__all__ = ["FLOAT32_NORM_OVERFLOW", "RULES", "Facts", "diagnose"]
