"""The key names and values that mean the same setting across config formats.

Kept in one place so a new spelling is one line here rather than a change to a rule. Names are
compared lower-cased.
"""

from __future__ import annotations

LR_KEYS = frozenset(
    {
        "lr",
        "learning_rate",
        "base_lr",
        "max_lr",
        "peak_lr",
        "warmup_max_lr",
        "base_learning_rate",
        "max_learning_rate",
        "peak_learning_rate",
    }
)
CLIP_KEYS = frozenset(
    {
        "max_grad_norm",
        "grad_clip",
        "grad_clip_norm",
        "grad_norm_clip",
        "clip_grad",
        "clip_grad_norm",
        "clip_grad_norm_",
        "clip_norm",
        "gradient_clip_val",
        "gradient_clipping",
        "gradient_clip_norm",
        "max_gradient_norm",
        "clip_gradient",
    }
)
# ``max_norm`` is clipping under a training section (litgpt ``train.max_norm``, torchtitan
# ``[training] max_norm``); elsewhere it may be an embedding's renormalisation bound.
CLIP_MAX_NORM_PARENTS = frozenset({"", "train", "training", "trainer", "optim", "optimizer", "optimization"})
# A key that names a warmup length, and how to read its number.
WARMUP_RATIO_KEYS = frozenset(
    {"warmup_ratio", "warmup_fraction", "warmup_proportion", "warmup_pct", "pct_start"}
)
WARMUP_EPOCH_KEYS = frozenset({"warmup_epochs", "warmup_epoch", "num_warmup_epochs"})
WARMUP_STEP_KEYS = frozenset(
    {
        "warmup",
        "warmup_steps",
        "warmup_iters",
        "warmup_iterations",
        "warmup_num_steps",
        "num_warmup_steps",
        "warmup_updates",
        "lr_warmup_steps",
        "lr_warmup_iters",
    }
)
WARMUP_KEYS = WARMUP_RATIO_KEYS | WARMUP_EPOCH_KEYS | WARMUP_STEP_KEYS
TOTAL_STEP_KEYS = (
    "max_steps",
    "max_iters",
    "max_iter",
    "total_steps",
    "num_training_steps",
    "train_steps",
    "total_iters",
    "total_num_steps",
    "max_updates",
    "num_steps",
    "train_iters",
)
EPOCH_KEYS = ("max_epochs", "num_train_epochs", "num_epochs", "epochs")
ADAM_EPS_KEYS = frozenset({"adam_epsilon", "adam_eps"})
GENERIC_EPS_KEYS = frozenset({"eps", "epsilon"})

# Keys whose string value names an optimizer, and keys of an optimizer mapping that name its class.
OPTIMIZER_NAME_KEYS = frozenset(
    {"optim", "optimizer", "optimizer_name", "optimizer_type", "optimizer_cls", "optim_type", "opt"}
)
CLASS_NAME_KEYS = ("class_path", "_target_", "type", "name", "cls")
ADAM_HINT_KEYS = frozenset({"betas", "beta1", "beta2", "adam_beta1", "adam_beta2", "amsgrad"})
SGD_HINT_KEYS = frozenset({"momentum", "nesterov", "dampening"})

MASK_WORDS = ("mask", "fill")
MASK_KEYS = frozenset({"neg_inf", "neginf", "negative_inf", "masking", "min_value", "pad_value"})

FINE_TUNING_KEYS = frozenset(
    {
        "model_name_or_path",
        "pretrained_model_name_or_path",
        "base_model",
        "pretrained",
        "init_from",
        "finetune",
        "fine_tune",
        "finetuning",
        "lora_r",
        "lora_rank",
        "peft",
        "peft_config",
        "load_pretrained",
        "finetuning_type",
        "adapter",
        "base_model_config",
    }
)
NOT_FINE_TUNING_VALUES = frozenset({"scratch", "none", "null", "", "random", "false", "no", "resume"})
ADAPTER_KEYS = frozenset({"lora_r", "lora_rank", "lora_alpha", "peft_config", "lora_config", "use_peft", "use_lora"})
ADAPTER_VALUES = frozenset({"lora", "qlora", "dora", "ia3", "adalora", "loha", "lokr", "adapter", "prefix"})
# Schedulers whose own formula ramps the learning rate up (so no separate warmup is needed), and
# Noam-style ones whose "lr" is a multiplier of d_model**-0.5, not a learning rate.
RAMPING_SCHEDULER_WORDS = ("onecycle", "warmup", "noam", "inverse_sqrt", "inversesquareroot", "cosineannealingwarmup")
NOAM_WORDS = ("noam",)

# Hugging Face TrainingArguments fields that rarely appear elsewhere; two of them make a HF section.
# (Not max_grad_norm or warmup_ratio: the fixer inserts those into free-form files.)
HF_MARKER_KEYS = frozenset(
    {
        "output_dir",
        "per_device_train_batch_size",
        "per_device_eval_batch_size",
        "num_train_epochs",
        "logging_steps",
        "logging_strategy",
        "logging_nan_inf_filter",
        "eval_strategy",
        "evaluation_strategy",
        "save_strategy",
        "save_steps",
        "save_total_limit",
        "lr_scheduler_type",
        "adam_epsilon",
        "adam_beta1",
        "adam_beta2",
        "fp16_full_eval",
        "bf16_full_eval",
        "half_precision_backend",
        "load_best_model_at_end",
    }
)
DEEPSPEED_MARKER_KEYS = frozenset(
    {
        "train_batch_size",
        "train_micro_batch_size_per_gpu",
        "zero_optimization",
        "gradient_clipping",
        "steps_per_print",
        "wall_clock_breakdown",
        "zero_allow_untested_optimizer",
    }
)
ACCELERATE_MARKER_KEYS = frozenset(
    {"compute_environment", "distributed_type", "num_processes", "machine_rank", "main_training_function"}
)
DEEPSPEED_SECTION_KEYS = frozenset({"deepspeed", "deepspeed_config", "ds_config"})

# Precision spellings (lower-cased text of the value).
FP16_MIXED_VALUES = frozenset(
    {"16", "16-mixed", "fp16", "fp16-mixed", "float16", "half", "torch.float16", "amp", "f16"}
)
FP16_PURE_VALUES = frozenset({"16-true", "fp16-true", "half-true", "pure_fp16", "pure-fp16", "float16-true"})
BF16_VALUES = frozenset(
    {"bf16", "bf16-mixed", "bf16-true", "bfloat16", "torch.bfloat16", "bfloat16-mixed", "bfloat16-true"}
)
PRECISION_KEYS = frozenset({"precision", "mixed_precision"})
FP16_SWITCH_KEYS = frozenset({"fp16", "float16"})
BF16_SWITCH_KEYS = frozenset({"bf16", "bfloat16"})
AMP_SWITCH_KEYS = frozenset({"amp", "use_amp", "enable_amp", "autocast", "use_autocast"})
AMP_DTYPE_KEYS = frozenset({"amp_dtype", "autocast_dtype", "dtype"})
PURE_FP16_SWITCH_KEYS = frozenset(
    {"half", "pure_fp16", "pure_half", "fp16_pure", "fp16_master_weights_and_grads"}
)
WEIGHT_DTYPE_KEYS = frozenset({"torch_dtype", "model_dtype", "weights_dtype", "weight_dtype"})
FP16_DTYPE_VALUES = frozenset({"float16", "fp16", "half", "torch.float16", "torch.half", "16"})
SCALER_SWITCH_KEYS = frozenset(
    {
        "use_loss_scaling",
        "loss_scaling",
        "use_grad_scaler",
        "grad_scaler",
        "scaler",
        "use_scaler",
        "enable_loss_scaling",
        "enable_grad_scaler",
    }
)
DYNAMIC_SCALE_SWITCH_KEYS = frozenset({"dynamic_loss_scale", "dynamic_loss_scaling"})
