"""``nanguard lint``: check training configs for settings that lead to NaN/Inf, and fix them.

    from nanguard.lint import lint_config, fix_config
    for finding in lint_config("train.yaml"):
        print(finding.rule, finding.path, finding.value, "->", finding.fix)
    fix_config("train.yaml")   # writes train_fixed.yaml, comments and key order kept

Reads Hugging Face TrainingArguments, Lightning CLI, DeepSpeed and Accelerate configs, and free-form
YAML/JSON by key names. The rules and their thresholds are listed in :data:`RULES`
(``nanguard lint --list-rules``).
"""

from nanguard.lint.api import FixResult, config_shape, fix_config, lint_config
from nanguard.lint.findings import RULES, Finding, Rule

__all__ = ["RULES", "Finding", "FixResult", "Rule", "config_shape", "fix_config", "lint_config"]
