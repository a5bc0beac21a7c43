"""`subtune repro CLAIM [--quick] [--seeds 3] [--out DIR]` (registered on the main group by subtune/cli.py).

Imports nothing heavy at module level: the claim's code loads only when the command runs.
"""

from __future__ import annotations

import click

from subtune.repro import CLAIMS


@click.command(name="repro", help="Measure a paper's headline claim in miniature on the embedded model (seeds, "
                                  "error bars, a verdict per sub-claim). Reports: OUT/CLAIM/report.md, result.json, "
                                  "chart.png. See docs/REPRODUCTION.md.")
@click.argument("claim", type=click.Choice(CLAIMS))
@click.option("--quick", is_flag=True, help="Tiny steps and subsets (< 2 min on one seed): checks the pipeline, "
                                            "not the claim.")
@click.option("--seeds", "num_seeds", type=click.IntRange(min=1), default=3, show_default=True,
              help="Run seeds 0..N-1 (one seed gives 'inconclusive' verdicts: no spread to compare with).")
@click.option("--out", "out_dir", type=click.Path(file_okay=False), default="runs/repro", show_default=True,
              help="Reports go to OUT/CLAIM/.")
def repro(claim: str, quick: bool, num_seeds: int, out_dir: str) -> None:
    from subtune.cli import _fail_cleanly, check_writable

    @_fail_cleanly
    def run() -> None:
        from subtune.repro import run_claim

        check_writable(out_dir, "--out")
        target = run_claim(claim, quick=quick, seeds=list(range(num_seeds)), out_dir=out_dir,
                           progress=lambda message: click.echo(f"[repro {claim}] {message}"))
        click.echo((target / "report.md").read_text())
        click.echo(f"report: {target / 'report.md'}  raw: {target / 'result.json'}  chart: {target / 'chart.png'}")

    run()
