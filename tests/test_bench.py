import json

from subtune.bench import BenchSpec, run_bench, write_outputs

NUMBERS = ("median_s", "min_s", "max_s", "cpu_median_s", "cpu_min_s", "tokens_per_s", "peak_mib", "baseline_mib")


def test_bench_on_the_tiny_preset_writes_table_json_png(tmp_path):
    report = run_bench(BenchSpec(methods=["full", "lora", "s2ft"], preset="tiny", batch=2, seq=64, steps=3,
                                 warmup=1), progress=False)
    paths = write_outputs(report, tmp_path)
    data = json.loads(paths["json"].read_text())
    assert set(data) == {"spec", "results", "environment"}
    kinds = [r["kind"] for r in data["results"]]
    assert kinds == ["full", "lora", "s2ft", "floor:inference", "floor:frozen_backward"]
    by_kind = {r["kind"]: r for r in data["results"]}
    for r in data["results"]:
        assert "error" not in r, r
        assert all(r[k] > 0 for k in NUMBERS), r
    for method in ("full", "lora", "s2ft"):
        assert by_kind[method]["trainable"] > 0 and by_kind[method]["optimizer_state_mib"] > 0
    # LoRA and S²FT are matched to the same budget; full trains everything
    assert by_kind["lora"]["trainable"] == by_kind["s2ft"]["trainable"] == data["spec"]["budget"]
    assert by_kind["full"]["trainable"] == by_kind["full"]["base_parameters"]
    floor, full = by_kind["floor:frozen_backward"], by_kind["full"]
    assert floor["peak_mib"] <= full["peak_mib"]
    # CPU seconds of the cheapest step: wall time on a shared machine jumps when another process takes the cores
    assert floor["cpu_min_s"] <= full["cpu_min_s"]
    assert paths["png"].stat().st_size > 1000 and "| full |" in paths["md"].read_text()
