from subtune.bench.harness import BenchSpec, markdown_table, run_bench, write_outputs

__all__ = ["BenchSpec", "run_bench", "markdown_table", "write_outputs"]
