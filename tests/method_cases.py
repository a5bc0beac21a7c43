"""One row per registered method: how to configure it on the tiny test models. A new method joins by adding a row."""

import subtune

CASES = {
    "full": {"config": lambda: subtune.FullConfig(), "exports_lora": False},
    "lora": {"config": lambda: subtune.LoraConfig(r=4), "exports_lora": True},
    "dora": {"config": lambda: subtune.DoraConfig(r=4), "exports_lora": True},
    "s2ft": {"config": lambda: subtune.S2FTConfig(o_ratio=0.25, v_ratio=0.25, d_ratio=0.1, u_ratio=0.1),
             "exports_lora": True},
    "s2ft-gradient": {"config": lambda: subtune.S2FTConfig(o_ratio=0.25, d_ratio=0.1, strategy="gradient",
                                                           allocation="uniform"), "exports_lora": True},
    "smt": {"config": lambda: subtune.SMTConfig(block_size=8, num_blocks=6, warmup_steps=2), "exports_lora": True},
    "smt-mlp-ragged": {"config": lambda: subtune.SMTConfig(block_size=10, num_blocks=3, mlp_num_blocks=4,
                                                           score="l2", scope="per_matrix", warmup_steps=2),
                       "exports_lora": True},
    "lamda": {"config": lambda: subtune.LaMDAConfig(r=4, lora_alpha=8), "exports_lora": True},
    "lamda-identity-residual": {"config": lambda: subtune.LaMDAConfig(r=4, init="svd_identity_residual"),
                                "exports_lora": True},
    "lamda-code-init": {"config": lambda: subtune.LaMDAConfig(r=4, init="code"), "exports_lora": True},
    # sparse deltas export exactly when their rank fits (on these tiny models it does; at 0.1% of a real model's
    # weights nearly every row and column is touched, and export refuses above max_rank)
    "senszo": {"config": lambda: subtune.SensZOConfig(density=0.05, quantize="none", calibration_samples=3),
               "exports_lora": True},
    "senszo-global-random": {"config": lambda: subtune.SensZOConfig(density=0.02, quantize="none", scope="global",
                                                                    mask_source="random"), "exports_lora": True},
    "mezo": {"config": lambda: subtune.MeZOConfig(), "exports_lora": False},
    "lamda++": {"config": lambda: subtune.LaMDAPlusConfig(r=4, rank_min=2, rank_max=8, rank_multiple=2),
                "exports_lora": True},
}

