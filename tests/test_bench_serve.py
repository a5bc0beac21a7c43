"""`subtune bench --serve` (issue #12, item 6) on the tiny preset with tiny sizes: the report's schema, positive
figures, the correctness guard (routed tokens = the adapter merged alone) and that the guard can fail, the fresh-
process worker, and the options refused before any run. The figures themselves live in docs/BENCHMARKS.md."""

from __future__ import annotations

import json
from unittest import mock

import pytest
from click.testing import CliRunner

from reliability import Case, cases_param, check_case
from subtune.bench import serve
from subtune.bench.serve import ServeBenchError, ServeBenchSpec
from subtune.cli import main
from subtune.serve import AdapterStore

TINY = dict(preset="tiny", widths=[64, 96], switch_presets=["tiny@1:bf16"], rank=4, warmup=1, rounds=4, blocks=2,
            adapter_counts=[1, 2, 4], rows=4, prompt_len=5, new_tokens=3, gen_warmup=0, gen_rounds=1, threads=1)
SWITCH_KEYS = {"median_ms", "min_ms", "max_ms", "cpu_median_ms", "rounds", "bit_exact", "max_abs_drift",
               "checked_modules"}
GEN_KEYS = {"tokens_per_s", "median_s", "min_s", "max_s", "cpu_median_s", "rounds"}


@pytest.fixture(scope="module")
def report():
    return serve.run_serve_bench(ServeBenchSpec(**TINY), progress=False, fresh_processes=False)


def _check_switch(row: dict) -> None:
    assert "error" not in row, row
    for system in ("subtune", "peft"):
        assert set(row[system]) == SWITCH_KEYS
        assert row[system]["median_ms"] > 0 and row[system]["min_ms"] <= row[system]["median_ms"]
        assert row[system]["rounds"] == TINY["rounds"] and row[system]["checked_modules"] >= 1
    assert row["subtune"]["bit_exact"] and row["subtune"]["max_abs_drift"] == 0.0  # activate(None) restores the base
    assert row["speedup"] == pytest.approx(row["peft"]["median_ms"] / row["subtune"]["median_ms"])
    assert row["adapter_values"]["subtune"] > 0 and len(row["loadavg"]["before"]) == 3


def test_the_serve_bench_reports_every_part_with_positive_figures(report, tmp_path):
    paths = serve.write_outputs(report, tmp_path)
    assert {p.name for p in paths.values()} == {f"bench-serve-tiny-fp32-cpu.{e}" for e in ("json", "md", "png")}
    data = json.loads(paths["json"].read_text())
    assert set(data) == {"spec", "layers", "models", "generation", "targets", "environment"}
    assert [r["width"] for r in data["layers"]] == [64, 96]
    for row in data["layers"]:
        _check_switch(row)
        # the paper's matching: S²FT k = 2r columns of a square layer hold exactly LoRA rank r's values
        assert row["columns"] == 2 * TINY["rank"]
        assert row["adapter_values"] == {"subtune": 2 * TINY["rank"] * row["width"],
                                         "peft": 2 * TINY["rank"] * row["width"]}
    assert [(r["preset"], r["layers"], r["dtype"]) for r in data["models"]] == [("tiny", 2, "fp32"),
                                                                                ("tiny", 1, "bf16")]
    for row in data["models"]:
        _check_switch(row)
        values = row["adapter_values"]  # S²FT is matched to LoRA's value count (to within one unit's rounding)
        assert abs(values["subtune"] - values["peft"]) <= 0.02 * values["peft"]
        assert row["modules"]["peft"] == 5 * row["layers"]
    generation = data["generation"]
    assert [r["adapters"] for r in generation["results"]] == TINY["adapter_counts"]
    for row in generation["results"]:
        for system in ("base", "subtune", "peft"):
            assert set(row[system]) == GEN_KEYS and row[system]["tokens_per_s"] > 0
        # the routed path's stacked copy: the K adapters' values (and indices), padded by at most 25%
        assert 0 < row["adapter_bytes"] <= row["stacked_bytes"] <= 1.25 * row["adapter_bytes"]
    assert generation["merged_tokens_per_s"] > 0 and generation["base_linear_bytes"] > 0
    assert data["environment"]["threads"] == 1
    md = paths["md"].read_text()
    assert "| 64 | fp32 |" in md and "PEFT `adapter_names=`" in md and "**Targets**" in md and "stacked copy" in md
    assert paths["png"].stat().st_size > 5000


def test_routed_generation_equals_each_adapter_merged_alone(report):
    """The bench's guard: every row of every mixed batch gives its adapter's merged tokens, and the adapters really
    change the tokens (so the comparison is not base against base)."""
    rows = report["generation"]["rows"]
    for row in report["generation"]["results"]:
        assert row["rows_equal_merged"] == rows, row
        assert row["rows_changed_vs_base"] > 0, row
    assert serve.guard_failures(report) == []
    routed = [t for t in report["targets"] if t["target"].startswith("routed")]
    assert len(routed) == 3 and all(t["met"] for t in routed)


def test_the_guard_catches_rows_routed_to_the_wrong_adapter():
    """A store that routes row i to the adapter of row i+1 must fail the guard (it compares with merged runs)."""
    real = AdapterStore.generate

    def shifted(self, input_ids, adapter_names, **kwargs):
        return real(self, input_ids, list(adapter_names[1:]) + list(adapter_names[:1]), **kwargs)

    spec = ServeBenchSpec(**{**TINY, "widths": [], "switch_presets": [], "adapter_counts": [4]})
    job = serve.plan_jobs(spec)[-1]
    with mock.patch.object(AdapterStore, "generate", shifted):
        result = serve.run_job(job)
    assert result["results"][0]["rows_equal_merged"] < spec.rows
    report = {"layers": [], "models": [], "generation": {**result, "label": "generation"}}
    report["targets"] = serve.check_targets(report)
    assert any("routed tokens equal" in p for p in serve.guard_failures(report))


def test_the_worker_prints_one_json_line_and_a_refused_job_as_its_error(capsys):
    """What the fresh process runs (`python -m subtune.bench.serve '<job>'`), called here to stay fast."""
    jobs = serve.plan_jobs(_spec(widths=[64], switch_presets=["134m"]))
    serve.main([json.dumps(jobs[0])])
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    _check_switch(result)
    assert result["width"] == 64
    with mock.patch.object(serve, "_available_bytes", lambda device: 2**20):
        serve.main([json.dumps(jobs[2])])  # 134m does not fit in 1 MiB: the job's row says so
    refused = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert refused["job"] == "model" and "fewer layers" in refused["error"]


@pytest.mark.slow  # ~15 s here, mostly the new interpreter importing torch, transformers and peft
def test_a_job_runs_in_a_fresh_process():
    job = serve.plan_jobs(_spec(widths=[64], switch_presets=[]))[0]
    result = serve.run_job_in_fresh_process(job)
    _check_switch(result)
    assert result["width"] == 64


# ------------------------------------------------------------------------------------ the bad-input catalogue
def _spec(**changes) -> ServeBenchSpec:
    return ServeBenchSpec(**{**TINY, **changes})


def _too_big_for_memory(tmp):
    job = serve.plan_jobs(_spec(widths=[], switch_presets=[], preset="134m"))[0]
    with mock.patch.object(serve, "_available_bytes", lambda device: 256 * 2**20):
        serve.model_job(job)


def _cli(*args):
    return CliRunner().invoke(main, ["bench", *args, "--out", "unused"], catch_exceptions=False, standalone_mode=False)


CASES_BENCH_SERVE = [
    Case("serve-bench-bad-dtype", lambda tmp: serve.check_spec(_spec(switch_presets=["llama2-7b:fp16"])),
         ServeBenchError, ("fp16", "NAME[@LAYERS][:fp32|bf16]"), tries="a switch preset in fp16",
         before="new"),
    Case("serve-bench-bad-layers", lambda tmp: serve.check_spec(_spec(switch_presets=["llama2-7b@0"])),
         ServeBenchError, ("@0", "positive number of layers"), tries="a switch preset with 0 layers", before="new"),
    Case("serve-bench-unknown-preset", lambda tmp: serve.check_spec(_spec(switch_presets=["llama9"])),
         serve.SubtuneError, ("llama9", "tiny"), tries="an unknown switch preset", before="new"),
    Case("serve-bench-narrow-width", lambda tmp: serve.check_spec(_spec(widths=[4])), ServeBenchError,
         ("[4]", "2·rank", "larger widths"), tries="a layer narrower than the matched S²FT columns", before="new"),
    Case("serve-bench-more-adapters-than-rows", lambda tmp: serve.check_spec(_spec(adapter_counts=[8])),
         ServeBenchError, ("[8]", "rows=4", "raise rows"), tries="K adapters over a batch of fewer rows",
         before="new"),
    Case("serve-bench-zero-rounds", lambda tmp: serve.check_spec(_spec(rounds=0)), ServeBenchError,
         ("rounds", "positive int"), tries="no timed rounds", before="new"),
    Case("serve-bench-out-of-memory", _too_big_for_memory, ServeBenchError,
         ("134m", "available", "bf16", "fewer layers"), tries="a model larger than the free memory (no swap)",
         before="new"),
    Case("serve-bench-training-option", lambda tmp: _cli("--serve", "--methods", "lora"), Exception,
         ("--methods", "training-bench", "drop"), tries="--methods with --serve", before="new"),
    Case("serve-bench-serve-option", lambda tmp: _cli("--widths", "1024"), Exception,
         ("--widths", "--serve option", "add --serve"), tries="--widths without --serve", before="new"),
    Case("serve-bench-bad-list", lambda tmp: _cli("--serve", "--adapters", "1,four"), Exception,
         ("1,four", "comma-separated list of integers"), tries="--adapters 1,four", before="new"),
]


@cases_param(CASES_BENCH_SERVE)
def test_catalogue_bench_serve(case, tmp_path):
    check_case(case, tmp_path)
