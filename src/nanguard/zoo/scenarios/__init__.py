"""Zoo scenarios: one realistic fault per module; see :func:`nanguard.zoo.load_scenarios`."""
