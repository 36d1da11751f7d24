"""Moved to :mod:`nanguard.sinks.tensorboard`; this name stays importable."""
from nanguard.sinks.tensorboard import TensorBoardSink, finite_scalars  # noqa: F401
