"""Short fine-tunes of a tiny model that get SIGKILLed, for tests/test_reliability_train.py:

    python tests/train_worker.py ROOT METHOD:after:STEP METHOD:during:STEP ...

Each spec trains in a forked child (the imports, most of the cost, happen once) into ROOT/METHOD-HOW-STEP and is
killed with SIGKILL right after checkpoint-STEP is complete (`after`) or while checkpoint-STEP is being written,
after its model files and before its optimizer state (`during`). Prints one line per spec: the spec and the
signal that ended the child. The test process imports RUNS and `run` from here, so the killed run, its resume and
the uninterrupted reference train exactly the same thing.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from conftest import CharTokenizer, make_tiny  # noqa: E402

import subtune  # noqa: E402

RECORDS = [{"instruction": f"question {i}", "output": f"answer {i % 4}"} for i in range(16)]
TRAIN = {"max_steps": 6, "batch_size": 4, "learning_rate": 1e-2, "save_steps": 2, "logging_steps": 1,
         "progress": False}
RUNS = {
    "s2ft": lambda: subtune.S2FTConfig(o_ratio=0.25, v_ratio=0.25, d_ratio=0.1, u_ratio=0.1),
    "smt": lambda: subtune.SMTConfig(block_size=8, num_blocks=6, warmup_steps=2),
    # T_f = 3 of 6 steps: 2 of B's 4 columns are frozen at step 2, all of them (B leaves the optimizer) from step 3
    "lamda": lambda: subtune.LaMDAConfig(r=4, freeze_fraction=0.5),
    "lora": lambda: subtune.LoraConfig(r=4, lora_dropout=0.1),  # dropout: the RNG state must resume as well
    "senszo": lambda: subtune.SensZOConfig(density=0.05, quantize="none", mask_source="magnitude"),
}


def run(method: str, output: str | Path, resume: bool = False):
    from subtune.recipes import finetune

    return finetune(make_tiny(0), CharTokenizer(), RUNS[method](), RECORDS, output, resume=resume, **TRAIN)


def _kill_after(step: int) -> None:
    from subtune.train import runs

    original = runs.mark_complete

    def mark_then_die(folder, extra=None):
        original(folder, extra)
        if Path(folder).name == f"checkpoint-{step}":
            os.kill(os.getpid(), signal.SIGKILL)

    runs.mark_complete = mark_then_die


def _kill_during(step: int) -> None:
    from transformers import Trainer

    original = Trainer._save_optimizer_and_scheduler

    def die_midway(self, output_dir):
        if self.state.global_step == step:
            os.kill(os.getpid(), signal.SIGKILL)
        original(self, output_dir)

    Trainer._save_optimizer_and_scheduler = die_midway


def _killed_run(root: Path, spec: str) -> int:
    """Fork a child that trains `spec` and gets killed; returns the signal that ended it (0: it was not killed)."""
    method, how, step = spec.split(":")
    pid = os.fork()
    if pid == 0:
        try:
            (_kill_after if how == "after" else _kill_during)(int(step))
            torch.manual_seed(int.from_bytes(os.urandom(4), "little"))  # any start state: the run is seeded
            run(method, root / f"{method}-{how}-{step}")
        finally:
            os._exit(1)  # never returns into the parent's code
    _, status = os.waitpid(pid, 0)
    return os.WTERMSIG(status) if os.WIFSIGNALED(status) else 0


if __name__ == "__main__":
    torch.set_num_threads(1)  # before any op, so a forked child has no thread pool to lose; the test uses 1 too
    root = Path(sys.argv[1])
    for spec in sys.argv[2:]:
        print(spec, _killed_run(root, spec), flush=True)
