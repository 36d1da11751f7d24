"""What the guard does about a verdict: ``respond`` (the response to each step), through the escalation
``policy``, ``rollback`` (snapshots, trust, repair), ``lr`` (multiplier, scheduler hold, applied LRs) and
the ``divergence`` watch."""
