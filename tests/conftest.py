import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

torch.set_num_threads(2)


def make_tiny(seed: int = 0, *, hidden: int = 32, layers: int = 2, heads: int = 4, kv_heads: int = 2,
              intermediate: int = 48, vocab: int = 64, head_dim: int | None = None, bias: bool = False,
              dtype: torch.dtype = torch.float32) -> LlamaForCausalLM:
    """A tiny random LLaMA built in-process (nothing downloaded). Same seed -> same weights."""
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate,
                         num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                         head_dim=head_dim, attention_bias=bias, max_position_embeddings=64,
                         tie_word_embeddings=False)
    model = LlamaForCausalLM(config).to(dtype)
    if bias:  # random biases, so a method that drops or moves them is caught
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("bias"):
                    p.normal_(0, 0.1)
    model.config._name_or_path = f"tiny-seed{seed}"
    return model


def selected_device() -> torch.device:
    """The device tests run on: SUBTUNE_TEST_DEVICE (cpu, the default, or cuda / cuda:N), so the suite runs
    unchanged on a GPU machine. A CUDA request without a usable GPU fails loudly rather than testing the CPU."""
    name = os.environ.get("SUBTUNE_TEST_DEVICE", "cpu").strip() or "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise pytest.UsageError(f"SUBTUNE_TEST_DEVICE={name!r} is not a torch device; use cpu or cuda") from None
    if device.type not in ("cpu", "cuda"):
        raise pytest.UsageError(f"SUBTUNE_TEST_DEVICE={name!r}: the tests run on cpu or cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise pytest.UsageError(f"SUBTUNE_TEST_DEVICE={name!r} but torch sees no CUDA device; unset it to test "
                                "on the CPU")
    return device


@pytest.fixture(scope="session")
def device() -> torch.device:
    return selected_device()


@pytest.fixture
def tiny():
    return make_tiny


@pytest.fixture
def batch():
    gen = torch.Generator().manual_seed(123)
    ids = torch.randint(0, 64, (2, 9), generator=gen)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def perturb_trainable(model, scale: float = 0.05, seed: int = 7) -> None:
    """Stand-in for training: move every trainable value, so identity-initialised adapters become non-trivial."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=gen).to(p.dtype) * scale)


@pytest.fixture
def exact_norms(monkeypatch):
    """HF's LlamaRMSNorm and attention softmax compute in fp32 even for float64 models; keep float64 in both so
    1e-10 comparisons against a dense reference are meaningful."""
    from transformers.models.llama import modeling_llama

    def norm_forward(self, hidden_states):
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        return self.weight * (hidden_states * torch.rsqrt(variance + self.variance_epsilon))

    def attention(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
        key = modeling_llama.repeat_kv(key, module.num_key_value_groups)
        value = modeling_llama.repeat_kv(value, module.num_key_value_groups)
        scores = torch.matmul(query, key.transpose(2, 3)) * scaling
        causal = torch.ones(scores.shape[-2:], dtype=torch.bool).tril()
        probs = scores.masked_fill(~causal, float("-inf")).softmax(-1)
        return torch.matmul(probs, value).transpose(1, 2).contiguous(), probs

    monkeypatch.setattr(modeling_llama.LlamaRMSNorm, "forward", norm_forward)
    monkeypatch.setattr(modeling_llama.ALL_ATTENTION_FUNCTIONS, "get_interface", lambda impl, default: attention)

def lm_loss(model, input_ids):
    """Next-token loss in the logits' own dtype (HF's loss upcasts to fp32, which caps float64 comparisons at ~1e-9)."""
    logits = model(input_ids=input_ids).logits
    return torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), input_ids[:, 1:].reshape(-1))


class CharTokenizer:
    """A tokenizer stand-in (one id per character) for Trainer tests that need no real vocabulary."""

    pad_token_id, bos_token_id, eos_token_id = 0, 1, 2

    def __init__(self, keep_last: int | None = None):
        self.keep_last = keep_last

    def __call__(self, text, add_special_tokens=False):
        text = text[-self.keep_last:] if self.keep_last else text
        return type("Encoding", (), {"input_ids": [3 + ord(c) % 60 for c in text]})()
