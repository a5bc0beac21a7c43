"""The training options the CLI offers as choices, kept free of torch/transformers imports so `subtune --help`
stays fast (tests/test_cli_options.py checks them against transformers' own lists)."""

# transformers' SchedulerType values that need nothing beyond the warm-up and the step count (cosine_with_min_lr,
# cosine_warmup_with_min_lr and warmup_stable_decay also need lr_scheduler_kwargs, which subtune does not expose)
LR_SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup",
                 "inverse_sqrt", "reduce_lr_on_plateau", "greedy")
METRIC_SCHEDULERS = ("reduce_lr_on_plateau", "greedy")  # they step on the eval loss: they need an eval set
REPORT_TO = {"none": (), "tensorboard": ("tensorboard", "tensorboardX"), "wandb": ("wandb",)}  # -> its packages
