"""One small module per chart; each takes loaded records and returns PNG bytes (matplotlib, Agg).

Nothing here imports matplotlib at module level: :func:`nanguard.report.plots.style.load_matplotlib`
does, and raises :class:`~nanguard.errors.MissingExtraError` naming the ``report`` extra without it.
"""
