"""Build the embedded default model, tokenizer and tasks from scratch (seeded).

    python -m subtune.zoo.build [--steps 3000] [--out src/subtune/zoo/default]

1. generate the synthetic world (`world.py`) and a pretraining corpus that states it;
2. train a byte-level BPE tokenizer on that corpus (`tokenizers`);
3. pretrain a tiny GQA LLaMA from random init on the corpus (bf16 autocast on CPU);
4. write the tasks (train/test JSON in the LLM-Adapters format) and a `build_report.json` with the final loss and a
   zero-shot knowledge probe against chance.

On the 2-core CPU used for development the default settings take about 25 minutes.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from subtune.zoo import world as W

ZOO_DIR = Path(__file__).resolve().parent
TASKS_DIR = ZOO_DIR.parent / "data" / "tasks"
SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<unk>"]


def model_config(vocab_size: int) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=vocab_size, hidden_size=256, intermediate_size=768, num_hidden_layers=4,
        num_attention_heads=8, num_key_value_heads=2, head_dim=32, max_position_embeddings=512,
        rms_norm_eps=1e-5, tie_word_embeddings=False, pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )


def train_tokenizer(texts: list[str], vocab_size: int) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>", padding_side="left", model_max_length=512)


def pack(token_docs: list[list[int]], seq_len: int, bos: int, eos: int) -> torch.Tensor:
    stream: list[int] = []
    for ids in token_docs:
        stream.extend([bos, *ids, eos])
    n = len(stream) // seq_len
    return torch.tensor(stream[: n * seq_len]).view(n, seq_len)


@torch.no_grad()
def knowledge_probe(model, tokenizer, world: W.World) -> dict:
    """Zero-shot: does the model rank the true statement above the false ones? (chance = 1/len(options))"""
    model.eval()
    hits = total = 0
    for p in world.people:
        for template, truth, pool in [
            ("{n} lives in {x}.", p.city, list(W.CITIES)),
            ("{n} has a pet {x}.", p.pet, list(W.PETS)),
            ("{n} works as a {x}.", p.job, list(W.JOBS)),
        ]:
            texts = [template.format(n=p.name, x=x) for x in pool]
            enc = tokenizer(texts, return_tensors="pt", padding=True)
            logits = model(**enc).logits.float()
            logp = torch.log_softmax(logits[:, :-1], -1).gather(-1, enc.input_ids[:, 1:, None])[..., 0]
            scores = (logp * enc.attention_mask[:, 1:]).sum(-1)
            hits += int(pool[int(scores.argmax())] == truth)
            total += 1
    chance = (1 / len(W.CITIES) + 1 / len(W.PETS) + 1 / len(W.JOBS)) / 3
    return {"accuracy": hits / total, "chance": chance, "questions": total}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--docs", type=int, default=45000)
    ap.add_argument("--vocab", type=int, default=2048)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=ZOO_DIR / "default")
    ap.add_argument("--tasks-out", type=Path, default=TASKS_DIR)
    ap.add_argument("--tasks-only", action="store_true", help="rewrite the task files only (no pretraining)")
    args = ap.parse_args(argv)
    if args.tasks_only:
        write_tasks(W.build_world(seed=args.seed), args.tasks_out)
        return

    torch.manual_seed(args.seed)
    random.seed(args.seed)
    world = W.build_world(seed=args.seed)
    docs = W.corpus_documents(world, args.docs, seed=args.seed + 1)
    tokenizer = train_tokenizer(docs, args.vocab)
    data = pack([tokenizer(d).input_ids for d in docs], args.seq, tokenizer.bos_token_id, tokenizer.eos_token_id)
    print(f"corpus: {len(docs)} documents, {data.numel():,} tokens, vocab {len(tokenizer)}", flush=True)

    model = LlamaForCausalLM(model_config(len(tokenizer)))
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params / 1e6:.2f}M parameters", flush=True)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1)
    warmup = max(1, args.steps // 30)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / args.steps))))
    gen = torch.Generator().manual_seed(args.seed)
    model.train()
    start, losses = time.time(), []
    for step in range(args.steps):
        batch = data[torch.randint(len(data), (args.batch,), generator=gen)]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if step % 100 == 0 or step == args.steps - 1:
            recent = sum(losses[-100:]) / len(losses[-100:])
            print(f"step {step:5d}  loss {recent:.4f}  {time.time() - start:7.1f}s", flush=True)

    final_loss = sum(losses[-100:]) / len(losses[-100:])
    probe = knowledge_probe(model, tokenizer, world)
    print(f"knowledge probe: {probe}", flush=True)

    args.out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(args.out, safe_serialization=True)
    tokenizer.save_pretrained(args.out)
    write_tasks(world, args.tasks_out)
    report = {
        "parameters": n_params, "steps": args.steps, "batch": args.batch, "seq": args.seq,
        "tokens_seen": args.steps * args.batch * args.seq, "final_train_loss": round(final_loss, 4),
        "minutes": round((time.time() - start) / 60, 1), "knowledge_probe": probe, "seed": args.seed,
    }
    (args.out / "build_report.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


def write_tasks(world: W.World, out: Path) -> None:
    tasks = {
        "commonsense": W.commonsense_records(world, seed=world.seed + 2),
        "arithmetic": W.arithmetic_records(world, seed=world.seed + 3),
    }
    for name, records in tasks.items():
        train, test = W.split_records(records, test_fraction=0.25, seed=world.seed + 4)
        (out / name).mkdir(parents=True, exist_ok=True)
        for split, recs in [("train", train), ("test", test)]:
            (out / name / f"{split}.json").write_text(json.dumps(recs, indent=1) + "\n")


if __name__ == "__main__":
    main()
