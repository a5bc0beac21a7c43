"""The fusion demo (issue #12, item 7) end to end at one training step per run: every row is evaluated on both tasks,
the disjoint S²FT pair shares no weight entry while the independently selected pair does, and the table and JSON
carry every row. (The accuracies at one step mean nothing; README.md has the real run.)"""

from __future__ import annotations

import json

from subtune.fusion_demo import ROWS, format_fusion_table, run_fusion_demo


def test_fusion_demo_rows_overlap_and_table(tmp_path):
    result = run_fusion_demo({"commonsense": 1, "arithmetic": 1}, batch_size=2, limit=3, output_dir=tmp_path,
                             progress=False)
    assert list(result.accuracy) == [label for label, _ in ROWS]
    assert all(set(acc) == {"commonsense", "arithmetic"} for acc in result.accuracy.values())
    assert result.shared_entries["S2FT fused disjoint"] == 0
    assert result.shared_entries["S2FT fused overlapping"] > 0  # independent random selections meet by chance
    assert result.settings["s2ft-math-disjoint"]["config"]["disjoint_from"] == [str(tmp_path / "s2ft-cs" / "adapter")]
    for label, acc in result.accuracy.items():
        assert f"| {label} | {100 * acc['commonsense']:.1f}% | {100 * acc['arithmetic']:.1f}% |" in \
            format_fusion_table(result)
    assert json.loads(result.to_json())["accuracy"] == result.accuracy
