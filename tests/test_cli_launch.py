"""`subtune train` under a launcher (issue 14): torchrun starts 2 gloo ranks on loopback running `python -m subtune
train`; only rank 0 prints and writes, the adapter loads and trained something. `--fsdp` on the CPU is refused
before any work, naming the path that works."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import torch
from click.testing import CliRunner
from safetensors.torch import load_file

import subtune
from subtune.cli import main

TIMEOUT_S = 300


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_torchrun_two_ranks_train_once_print_once_and_the_adapter_loads(tmp_path):
    out = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                             "MASTER_PORT")}
    env.update(HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), "-m", "subtune", "train", "--method", "s2ft", "--model", "default",
           "--max-steps", "4", "--batch-size", "4", "--output", str(out), "--save-steps", "1000"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=TIMEOUT_S)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.count("adapter saved to") == 1, proc.stdout  # rank 0 prints, rank 1 does not
    assert proc.stdout.count("method s2ft:") == 1
    from subtune.zoo import load_model

    model, _ = load_model("default")
    subtune.load(model, out / "adapter")
    tensors = load_file(out / "adapter" / "adapter.safetensors")
    deltas = [t for name, t in tensors.items() if name.startswith("delta.") and t.is_floating_point()]
    assert deltas and max(float(t.abs().max()) for t in deltas) > 0  # 4 steps moved the trained values
    assert not list(tmp_path.glob("run/adapter.tmp*")) and not list(tmp_path.glob("run/.*tmp*"))


def test_fsdp_on_the_cpu_is_refused_before_the_model_loads_naming_what_works(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    result = CliRunner().invoke(main, ["train", "--method", "s2ft", "--fsdp", "--max-steps", "1", "--output",
                                       str(tmp_path / "run")])
    assert result.exit_code != 0
    message = " ".join(result.output.split())
    assert "--fsdp needs CUDA" in message and "fully_shard" in message and "drop --fsdp" in message
    assert not (tmp_path / "run").exists()
