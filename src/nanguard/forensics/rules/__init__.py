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
    rule_extreme_scale,
    rule_update_flag,
    rule_weights,
    rule_optimizer_state,
    rule_exception,
    rule_masked_target,
    rule_from_trace,
    rule_update_sim,
    rule_norm_overflow,
    rule_nondeterministic,
    rule_spikes,
)


def diagnose(facts: Facts) -> Diagnosis:
    """The first rule that matches names the cause; ``unknown`` says what was checked."""
    for rule in RULES:
        diagnosis = rule(facts)
        if diagnosis is not None:
            return diagnosis
    return rule_unknown(facts)


__all__ = ["FLOAT32_NORM_OVERFLOW", "RULES", "Facts", "diagnose"]
