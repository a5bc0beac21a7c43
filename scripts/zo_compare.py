"""SensZOQ (0.1% sensitive) vs MeZO (all weights) vs a random 0.1% mask, same steps, on the embedded model.

    python scripts/zo_compare.py [--task commonsense] [--steps 400] [--lr-senszo 3e-3] [--lr-mezo 3e-5]

Accuracy is measured two ways: generation + answer extraction (`subtune eval`), and — for multiple-choice tasks —
picking the candidate answer with the highest mean log-likelihood (the MeZO/SensZOQ protocol). Learning rates were
not tuned per arm beyond a short sweep; see the closing note of the issue for the numbers this printed.
"""

from __future__ import annotations

import argparse
import copy
import time

import torch

import subtune
from subtune.data.loaders import ChoiceCollator, encode_choice_record, load_records
from subtune.eval.evaluate import evaluate
from subtune.recipes import finetune
from subtune.zoo import load_model


@torch.no_grad()
def choice_accuracy(model, tokenizer, records) -> float:
    model.eval()
    collate = ChoiceCollator(tokenizer.pad_token_id)
    hits = 0
    for start in range(0, len(records), 16):
        chunk = records[start:start + 16]
        batch = collate([encode_choice_record(tokenizer, r) for r in chunk])
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
        labels = batch["labels"][:, 1:]
        logp = torch.log_softmax(logits[:, :-1], -1).gather(-1, labels.clamp_min(0)[..., None])[..., 0]
        mask = (labels != -100).float()
        scores = (logp * mask).sum(-1) / mask.sum(-1)
        offset = 0
        for count, gold in zip(batch["choice_counts"].tolist(), batch["gold"].tolist()):
            hits += int(scores[offset:offset + count].argmax()) == gold
            offset += count
    return hits / len(records)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--task", default="commonsense")
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--lr-senszo", type=float, default=3e-3)
    ap.add_argument("--lr-mezo", type=float, default=3e-5)
    ap.add_argument("--limit", type=int, default=100)
    ap.add_argument("--quantize", default="nf4")
    ap.add_argument("--calibration", type=int, default=100, help="corpus windows for the sensitivity mask")
    args = ap.parse_args()

    train = load_records(args.task, "train")
    test = load_records(args.task, "test", need_answer=True)[: args.limit]
    base, tokenizer = load_model("default")
    print(f"zero-shot: generation {evaluate(base, tokenizer, test, progress=False).accuracy:.3f}, "
          f"choice {choice_accuracy(base, tokenizer, test):.3f}")
    arms = {
        "senszo (0.1% sensitive)": (subtune.SensZOConfig(quantize=args.quantize, objective="choice",
                                                         calibration_samples=args.calibration), args.lr_senszo),
        "random 0.1% mask": (subtune.SensZOConfig(quantize=args.quantize, mask_source="random", objective="choice"),
                             args.lr_senszo),
        "mezo (all weights)": (subtune.MeZOConfig(objective="choice"), args.lr_mezo),
    }
    print("| arm | tuned values | lr | steps | choice acc | generation acc | s |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, (config, lr) in arms.items():
        model = copy.deepcopy(base)
        start = time.perf_counter()
        finetune(model, tokenizer, config, train, f"runs/zo_compare/{config.method}", max_steps=args.steps,
                 learning_rate=lr, batch_size=args.batch, logging_steps=50, save_steps=10**9, warmup=0.0,
                 progress=False)
        seconds = time.perf_counter() - start
        tuned = sum(t.numel() for t in model.subtune_state.method.zo_tensors(model))
        print(f"| {name} | {tuned:,} | {lr:g} | {args.steps} | {choice_accuracy(model, tokenizer, test):.3f} | "
              f"{evaluate(model, tokenizer, test, progress=False, with_perplexity=False).accuracy:.3f} | "
              f"{seconds:.0f} |", flush=True)


if __name__ == "__main__":
    main()
