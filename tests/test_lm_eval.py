"""lm-evaluation-harness scores a subtune adapter offline, by both documented routes (docs/EVALUATION.md).

The task is a local lm-eval YAML config in tests/data/lm_eval (`dataset_path: json` over a JSON-lines file of
LLM-Adapters records). The reference is subtune's own candidate ranking: each candidate response encoded as subtune
trains it (`encode_choice_record`: BOS + prompt + response) and scored by its summed log-likelihood. Sockets are
blocked while lm-eval runs, so anything that tries the network fails the test.
"""

import socket
from pathlib import Path

import pytest
import torch

import subtune
from conftest import perturb_trainable
from subtune.data.loaders import CausalCollator, encode_choice_record, load_records
from subtune.zoo import load_model

lm_eval = pytest.importorskip("lm_eval", reason="lm-eval is in the dev extra: pip install -e '.[dev]'")
import datasets  # noqa: E402  (installed with lm-eval)
from lm_eval.models.huggingface import HFLM  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
TASK_DIR = REPO / "tests" / "data" / "lm_eval"
TASK = "subtune_commonsense_tiny"


@torch.no_grad()
def subtune_choice_scores(model, tokenizer, records: list[dict]) -> list[torch.Tensor]:
    """Per record, the summed log-likelihood of each candidate's response tokens (the closing EOS left out: lm-eval
    scores the text only). All candidates go through one right-padded forward."""
    model.eval()
    per_record = [encode_choice_record(tokenizer, r)["candidates"] for r in records]
    candidates = [c for group in per_record for c in group]
    for c in candidates:
        assert c["input_ids"][-1] == tokenizer.eos_token_id
        c["labels"][-1] = -100
    batch = CausalCollator(tokenizer.pad_token_id)(candidates)
    logp = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
    logp = logp[:, :-1].log_softmax(-1)
    labels = batch["labels"][:, 1:]
    token_logp = logp.gather(-1, labels.clamp_min(0)[..., None])[..., 0] * (labels != -100)
    return list(token_logp.sum(-1).double().split([len(g) for g in per_record]))


def accuracy(scores: list[torch.Tensor], records: list[dict]) -> float:
    hits = [int(s.argmax()) == r["choices"].index(r["answer"]) for s, r in zip(scores, records)]
    return sum(hits) / len(hits)


def lm_eval_run(lm) -> tuple[float, list[torch.Tensor]]:
    """lm-eval's reported accuracy on the local task, and its per-choice log-likelihoods in document order."""
    tasks = TaskManager(include_path=str(TASK_DIR), include_defaults=False)
    out = lm_eval.simple_evaluate(model=lm, tasks=[TASK], task_manager=tasks, num_fewshot=0, log_samples=True)
    samples = sorted(out["samples"][TASK], key=lambda s: s["doc_id"])
    lls = [torch.tensor([resp[0][0] for resp in s["resps"]], dtype=torch.float64) for s in samples]
    return out["results"][TASK]["acc,none"], lls


def centred(scores: list[torch.Tensor]) -> torch.Tensor:
    """lm-eval moves the prompt's closing newline into every continuation, which adds the same log p("\\n") to
    each choice of a document; centring per document removes exactly that and keeps every ranking gap."""
    return torch.stack([s - s.mean() for s in scores])


@pytest.fixture(scope="module")
def scored(tmp_path_factory):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a few mid-sized forwards: one thread is faster than two on the shared cores
    try:
        yield score_both_ways(tmp_path_factory.mktemp("lm_eval"))
    finally:
        torch.set_num_threads(threads)


def score_both_ways(tmp: Path) -> dict:
    """A trained-looking S2FT adapter on the embedded model (base saved to a local directory), scored by subtune
    (base and adapted) and by lm-eval on the merged model object and with `peft=` on its LoRA export."""
    records = load_records(TASK_DIR / f"{TASK}.jsonl")
    model, tokenizer = load_model("default")
    base_dir = tmp / "base"  # a local base directory, as a user's own model would be
    model.save_pretrained(base_dir)
    tokenizer.save_pretrained(base_dir)
    base_scores = subtune_choice_scores(model, tokenizer, records)

    subtune.prepare(model, subtune.S2FTConfig())
    perturb_trainable(model, scale=0.2)  # stand-in for training: a non-zero update that moves the scores
    subtune.export_lora(model, tmp / "lora")
    adapted_scores = subtune_choice_scores(model, tokenizer, records)
    subtune.merge(model)

    attempts = []

    def no_network(sock, address, *args):
        attempts.append(address)
        raise OSError(f"test_lm_eval: network access to {address!r} is blocked (everything must be local)")

    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(REPO)  # the YAML's data_files is relative to the repository root
        mp.setattr(datasets.config, "HF_DATASETS_CACHE", tmp / "datasets_cache")
        mp.setattr(socket.socket, "connect", no_network)
        mp.setattr(socket.socket, "connect_ex", no_network)
        merged = lm_eval_run(HFLM(pretrained=model, tokenizer=str(base_dir), add_bos_token=True, batch_size=16))
        peft = lm_eval_run(HFLM(pretrained=str(base_dir), peft=str(tmp / "lora"), add_bos_token=True,
                                batch_size=16, device="cpu", dtype="float32"))
    return {"records": records, "base": base_scores, "adapted": adapted_scores, "merged": merged, "peft": peft,
            "network": attempts}


def test_adapter_moves_the_scores(scored):
    """Otherwise the routes below could agree with subtune while ignoring the adapter."""
    shift = (centred(scored["adapted"]) - centred(scored["base"])).abs().max()
    assert shift > 0.5  # 1.06 nats; the routes must match to 1e-4


@pytest.mark.parametrize("route", ["merged", "peft"])
def test_lm_eval_accuracy_equals_subtune_ranking(scored, route):
    acc, lls = scored[route]
    assert acc == accuracy(scored["adapted"], scored["records"])
    assert len(lls) == len(scored["records"]) == 16
    torch.testing.assert_close(centred(lls), centred(scored["adapted"]), atol=1e-4, rtol=0)


def test_merged_and_peft_routes_agree(scored):
    (acc_merged, lls_merged), (acc_peft, lls_peft) = scored["merged"], scored["peft"]
    assert acc_merged == acc_peft
    torch.testing.assert_close(torch.stack(lls_merged), torch.stack(lls_peft), atol=1e-4, rtol=0)


def test_nothing_reached_the_network(scored):
    assert scored["network"] == []
