"""The LLM-Adapters (Alpaca-style) prompt, in the downstream variant used by the SMT/S2FT/DoRA repos.

We drop the original 16-space indentation (the downstream variant does too) and use the same text for training and
evaluation, so what the model is trained on is exactly what it is asked.
"""

HEADER = ("Below is an instruction that describes a task. Write a response that appropriately completes the request.")
HEADER_WITH_INPUT = ("Below is an instruction that describes a task, paired with an input that provides further "
                     "context. Write a response that appropriately completes the request.")


def build_prompt(instruction: str, input_text: str = "") -> str:
    """The prompt up to and including '### Response:\\n'; the response follows it directly."""
    if input_text:
        return f"{HEADER_WITH_INPUT}\n\n### Instruction:\n{instruction}\n\n### Input:\n{input_text}\n\n### Response:\n"
    return f"{HEADER}\n\n### Instruction:\n{instruction}\n\n### Response:\n"
