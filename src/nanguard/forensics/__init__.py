"""Forensics: replay the bad step under instruments and name where the bad value was born.

* :mod:`~nanguard.forensics.capture` records each step cheaply enough to leave on (root-module calls,
  RNG, loss ops), so a step can be re-run without a closure;
* :mod:`~nanguard.forensics.investigate` checks the batch and the training state, replays the step
  (plain, traced, in float32), and hands the evidence to the rules;
* :mod:`~nanguard.forensics.replay` re-runs a step from a scoped :class:`~nanguard.state.SavedState`;
* :mod:`~nanguard.forensics.trace` is the operator tracer; :mod:`~nanguard.forensics.rules` the rules,
  by cause family; :mod:`~nanguard.forensics.triage` the replay-free diagnosis;
* :mod:`~nanguard.forensics.desk` is what the guard talks to: the budget, one answer for all ranks.

:func:`investigate` never raises, and leaves parameters, buffers, gradients, optimizer and GradScaler
state and RNG states exactly as it found them.
"""

from nanguard.forensics.investigate import Investigation, investigate
from nanguard.forensics.request import InvestigationRequest, RngState, StepCapture

__all__ = ["Investigation", "InvestigationRequest", "RngState", "StepCapture", "investigate"]
