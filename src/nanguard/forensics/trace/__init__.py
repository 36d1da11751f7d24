"""The operator tracer, split by concern: ``tracer`` (the instruments), ``births`` (what they find),
``inputs`` (facts about loss targets and batch-norm inputs), ``ops`` (operator vocabularies)."""

from nanguard.forensics.trace.births import (
           Birth,
           ModuleStat,
           absmax_values,
           iter_births,
           root_of,
           rows_with,
           summarize,
)
from nanguard.forensics.trace.inputs import batchnorm_stats, class_target_stats
from nanguard.forensics.trace.ops import LOSS_OPS, SOFTMAX_OPS
from nanguard.forensics.trace.tracer import OpTracer

__all__ = ["LOSS_OPS", "SOFTMAX_OPS", "Birth", "ModuleStat", "OpTracer", "absmax_values", "batchnorm_stats",
           "class_target_stats", "iter_births", "root_of", "rows_with", "summarize"]
