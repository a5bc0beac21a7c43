"""Write docs/RELIABILITY.md from the bad-input catalogue, so the document is the tests and cannot drift from them.

Every parametrised `test_catalogue_*` test in tests/ runs `Case` rows (tests/reliability.py); each row states what it
tries and what the code did before issue 10 (`before`), and its error type and message fragments say what it does
now. The behaviour tests that are not rows are listed in BEHAVIOUR below, checked to exist.

    python scripts/reliability_table.py           # rewrite docs/RELIABILITY.md and the README's counts paragraph
    python scripts/reliability_table.py --check   # exit 1 if either differs from what the rows give
"""

from __future__ import annotations

import argparse
import importlib
import math
import sys
import textwrap
from pathlib import Path
from typing import NamedTuple

ROOT = Path(__file__).resolve().parent.parent
TESTS = ROOT / "tests"
DOC = ROOT / "docs" / "RELIABILITY.md"

# `before` is "<status>" or "<status>: what happened"; the status is one of these.
STATUSES = ("clear", "raw", "silent", "silent, data loss", "new")

# The catalogue tests in the order the document shows them: test function -> (area title, what it covers).
AREAS = {
    "test_catalogue_core": ("Prepare, save, load, merge, export",
                            "the library's persistence doors: what `prepare` is given, what `save` would destroy, "
                            "damaged or foreign adapter directories, non-finite adapters, export limits"),
    "test_catalogue_training": ("Training runs", "`subtune train` options and `finetune` / `build_trainer`: steps, "
                                "rates, output directories holding other runs, resume, divergence"),
    "test_catalogue_configs": ("Method configs", "every method's config fields: types, finite floats, ranges, "
                               "limits that need the model (ranks, block sizes)"),
    "test_catalogue_data_and_eval": ("Data, config files, model, evaluation",
                                     "data files and records, YAML/JSON configs, `--model`, `evaluate` and "
                                     "`perplexity`"),
    "test_catalogue_cli": ("CLI commands", "`subtune train` (config and data handling), `eval`, `export`, `bench`, "
                           "`senszo-mask`, `demo`"),
    "test_catalogue_senszo": ("SensZOQ", "masks made for another model or damaged, ZO settings, calibration, "
                              "edited adapters"),
    "test_catalogue_calibration": ("Calibration", "data-driven selection (S²FT, SMT, SensZOQ) fed no batches or "
                                   "batches that cannot reach the weights"),
    "test_catalogue_deltas": ("Update records (`core/deltas`, new code)",
                              "reading, merging and exporting the method-neutral `Delta` records"),
    "test_catalogue_layer_merge": ("Layer merge and unmerge", "the generic merge in the training layers"),
    "test_catalogue_serve": ("Serving (`serve/`, new code)", "the multi-adapter `AdapterStore`: adding, routing, "
                             "fusing"),
    "test_catalogue_serve_http": ("HTTP serving (`subtune serve`, new code)", "the completions endpoint's request "
                                  "bodies, the app's settings, `subtune serve` options"),
    "test_catalogue_bench_serve": ("Serving benchmark (`subtune bench --serve`, new code)",
                                   "the serving benchmark's presets, widths, adapter counts and options"),
    "test_catalogue_s2ft_disjoint": ("S²FT `disjoint_from` (new code)", "the adapters whose heads and channels an "
                                     "S²FT run must keep clear of, and budgets the free units cannot meet"),
}

# What the document says about behaviour that a row cannot show: (behaviour, what is checked, tests).
BEHAVIOUR = [
    ("Kill during save", "A process saving two adapters in turn is SIGKILLed at random moments (20 times each for "
     "S²FT and LoRA r=64, and more with the two-rename fallback); after every kill the directory loads and equals "
     "the old or the new adapter, and the next save removes the stale temporaries. Before: 13 of 35 kills left no "
     "loadable adapter.",
     ["test_reliability_core.py::test_a_kill_during_save_always_leaves_the_old_or_the_new_adapter",
      "test_reliability_core.py::test_stale_temporaries_of_killed_saves_are_removed_by_the_next_save",
      "test_reliability_core.py::test_two_rename_fallback_recovers_the_old_adapter_after_a_kill_between_renames"]),
    ("Kill during training, then `--resume`", "Runs SIGKILLed after a checkpoint resume to adapters bit-identical to "
     "an uninterrupted run (S²FT, SMT, LaMDA with B partly frozen and with B out of the optimizer, LoRA with dropout, "
     "SensZOQ with its ZO history); a checkpoint killed mid-write is skipped with a warning and the newest complete "
     "one is used.",
     ["test_reliability_train.py::test_sigkill_after_a_checkpoint_then_resume_is_bit_identical",
      "test_reliability_train.py::test_a_checkpoint_killed_mid_write_is_skipped_with_a_warning",
      "test_reliability_train.py::test_build_trainer_resume_true_takes_the_newest_complete_checkpoint"]),
    ("Checkpoint size", "A checkpoint of an S²FT run on the embedded model holds the adapter, optimizer, scheduler, "
     "RNG and trainer state and no copy of the base: under 1 MB plus the optimizer state, which is AdamW's two "
     "moments of the trained slices (before: 15.4 MB). An unmodified HF `Trainer` writes and resumes the same "
     "checkpoints; full and MeZO hold the model once, not twice.",
     ["test_reliability_train.py::test_s2ft_checkpoint_on_the_embedded_model_is_under_1mb_plus_optimizer_state",
      "test_reliability_train.py::test_an_unmodified_hf_trainer_saves_and_resumes_adapter_only_checkpoints",
      "test_reliability_train.py::test_save_model_writes_the_adapter_and_unload_gives_back_hf_saving",
      "test_reliability_train.py::test_full_and_mezo_checkpoints_hold_the_model_once"]),
    ("Seeds", "Two runs with one seed, started from different global RNG states, write byte-identical adapters for "
     "every method case; `prepare` seeds the selection and PEFT's initialisation and leaves the caller's RNG as it "
     "was. Before: two identical LoRA runs had 0 of 40 tensors equal.",
     ["test_reliability_train.py::test_two_seeded_runs_write_byte_identical_adapters",
      "test_reliability_train.py::test_the_seed_changes_a_random_init_and_an_explicit_config_seed_wins",
      "test_reliability_core.py::"
      "test_two_prepares_with_one_seed_give_byte_identical_adapters_and_leave_the_callers_rng",
      "test_reliability_core.py::test_the_seed_decides_the_lora_initialisation"]),
    ("Stop on divergence", "A non-finite loss or trained value stops training with an error naming the step and the "
     "fix, before anything of that step is saved; the last good checkpoints stay (LoRA at lr 1e6, SensZOQ's ZO step "
     "at lr 1e30); the CLI shows it as one line with exit code 1.",
     ["test_reliability_train.py::test_divergence_stops_before_any_nan_is_saved_and_keeps_the_last_good_checkpoint",
      "test_reliability_train.py::test_cli_divergence_is_one_line_and_a_failing_exit_code"]),
    ("Non-finite adapters", "`save`, `load`, `merge` and `export_lora` refuse a NaN adapter of every method unless "
     "`allow_nonfinite=True`; `eval` reports an overflowing or NaN perplexity as `null` in valid JSON.",
     ["test_reliability_core.py::test_nonfinite_adapters_are_refused_by_save_load_merge_and_export",
      "test_reliability_inputs.py::test_overflowing_perplexity_is_inf_and_reported_as_null",
      "test_reliability_inputs.py::test_eval_prints_valid_json_when_the_perplexity_is_nan"]),
    ("SensZOQ NF4 merge", "After eval-mode forwards and a ZO step, the merged model equals the trained model on fp32 "
     "and bf16 bases, for aligned widths and widths that are not multiples of 64 (before: off by up to 1.4 / 20 in "
     "the logits, or a dtype error, because bitsandbytes repacked the 4-bit weight for its CPU kernel).",
     ["test_senszo.py::test_nf4_merge_equals_the_trained_model_after_eval_forwards_and_a_zo_step",
      "test_senszo.py::test_dequantized_weight_reads_a_weight_bitsandbytes_repacked_for_its_cpu_kernel",
      "test_senszo.py::test_4bit_layers_keep_the_standard_layout_so_state_dict_leaves_them_unchanged",
      "test_senszo.py::test_nf4_works_on_widths_the_cpu_repack_cannot_take"]),
    ("Fingerprint", "An adapter refuses a base whose decoder weights differ although embeddings and norm match, "
     "naming the first differing tensor; the fingerprint agrees across dtypes and samples every decoder weight.",
     ["test_reliability_core.py::test_an_adapter_refuses_a_base_whose_decoder_differs_though_embeddings_and_norm_match",
      "test_reliability_core.py::test_fingerprint_agrees_across_dtypes_and_samples_every_decoder_weight",
      "test_reliability_core.py::test_an_adapter_with_the_old_fingerprint_is_checked_on_the_keys_it_has"]),
    ("Prepare and load roll back", "A `prepare` or `load` that fails at any door leaves the model exactly as it was "
     "(every parameter, buffer and module), including residual initialisations and SMT's warm-up updates; a damaged "
     "adapter gives one clear error and leaves the model untouched.",
     ["test_reliability_core.py::test_a_failed_prepare_leaves_the_model_exactly_as_it_was",
      "test_reliability_core.py::test_a_failed_load_leaves_the_model_exactly_as_it_was",
      "test_reliability_core.py::test_a_residual_init_is_undone_exactly_after_a_failure",
      "test_reliability_core.py::test_smt_warmup_updates_are_undone_after_a_failure",
      "test_reliability_core.py::test_a_damaged_adapter_gives_one_clear_error_and_leaves_the_model_untouched"]),
    ("Runs never clobber runs", "`save` over an adapter of another method, base or format is refused unless "
     "`overwrite=True`; `subtune train` into another run's directory is refused unless `--overwrite`, which then "
     "replaces the adapter and every checkpoint.",
     ["test_reliability_core.py::test_saving_over_another_adapter_is_refused_unless_overwrite",
      "test_reliability_core.py::test_lora_export_replaces_an_earlier_export_but_not_a_subtune_adapter",
      "test_reliability_train.py::test_cli_refuses_another_run_and_overwrite_replaces_it"]),
    ("Warnings and tracebacks", "A `--max-length` that cuts some answers warns with the count; every float field of "
     "every config refuses NaN and inf, every int field strings, bools and fractions; a real bug in the CLI keeps "
     "its traceback instead of becoming a one-line error.",
     ["test_reliability_train.py::test_max_length_cutting_some_answers_warns_with_the_count",
      "test_reliability_inputs.py::test_every_float_field_refuses_non_finite_values",
      "test_reliability_inputs.py::test_every_int_field_refuses_strings_bools_and_fractions",
      "test_reliability_inputs.py::test_cli_real_bugs_keep_their_traceback"]),
]


class Area(NamedTuple):
    test: str  # file::function
    title: str
    covers: str
    cases: list


def _import(name: str):
    if str(TESTS) not in sys.path:
        sys.path.insert(0, str(TESTS))
    return importlib.import_module(name)


def _case_lists(function) -> list:
    """The Case rows a parametrised test runs (its `@cases_param` mark)."""
    from reliability import Case

    for mark in getattr(function, "pytestmark", []):
        if mark.name == "parametrize" and mark.args and mark.args[0] == "case" and mark.args[1] \
                and all(isinstance(c, Case) for c in mark.args[1]):
            return list(mark.args[1])
    return []


def collect() -> list[Area]:
    """Every catalogue test of tests/test_*.py, known areas first in AREAS order, then any new one by name."""
    found = {}
    for path in sorted(TESTS.glob("test_*.py")):
        if "cases_param(" not in path.read_text():
            continue
        module = _import(path.stem)
        for name, function in vars(module).items():
            if name.startswith("test_") and callable(function) and (cases := _case_lists(function)):
                title, covers = AREAS.get(name, (name.removeprefix("test_catalogue_").replace("_", " ").title(), ""))
                found[name] = Area(f"tests/{path.name}::{name}", title, covers, cases)
    order = [n for n in AREAS if n in found] + sorted(n for n in found if n not in AREAS)
    return [found[n] for n in order]


def status(case) -> tuple[str, str]:
    head, _, note = case.before.partition(":")
    return head.strip(), note.strip()


def check(areas: list[Area]) -> None:
    """Every row states what it tries and a known `before` status; ids are unique across the catalogue."""
    problems, seen = [], {}
    for area in areas:
        for case in area.cases:
            where = f"{area.test} row {case.id!r}"
            if not case.tries.strip():
                problems.append(f"{where}: no tries= (the bad input in a few words)")
            if status(case)[0] not in STATUSES:
                problems.append(f"{where}: before={case.before!r} must start with one of {list(STATUSES)} "
                                "(optionally followed by ': what happened')")
            if case.id in seen:
                problems.append(f"{where}: id also used in {seen[case.id]}")
            seen[case.id] = area.test
    if problems:
        raise SystemExit("catalogue rows to fix before docs/RELIABILITY.md can be written:\n  " + "\n  ".join(problems))


def counts(cases) -> dict[str, int]:
    heads = [status(c)[0] for c in cases]
    return {"tried": len(heads), "clear": heads.count("clear"), "raw": heads.count("raw"),
            "silent": heads.count("silent") + heads.count("silent, data loss"),
            "data loss": heads.count("silent, data loss"), "new": heads.count("new")}


def cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def code(text: str) -> str:
    fence = "``" if "`" in text else "`"
    pad = " " if fence == "``" or text.startswith(" ") or text.endswith(" ") else ""
    return f"{fence}{pad}{text}{pad}{fence}"


def now(case) -> str:
    name = case.error.__name__
    cli = name == "CliError" or any(c.__name__ == "ClickException" for c in case.error.__mro__)
    what = "one `Error:` line, non-zero exit" if cli else code(name)
    return f"{what}, naming " + ", ".join(code(f) for f in case.fragments) if case.fragments else what


def before(case) -> str:
    head, note = status(case)
    return f"**{head}**" + (f": {note}" if note else "")


def behaviour_tests() -> list[tuple[str, str, list[str]]]:
    """BEHAVIOUR with each test checked to exist, and its parametrised cases counted."""
    rows = []
    for title, text, tests in BEHAVIOUR:
        shown = []
        for test in tests:
            file, _, name = test.partition("::")
            function = getattr(_import(Path(file).stem), name, None)
            if function is None:
                raise SystemExit(f"BEHAVIOUR names {test}, which does not exist: update scripts/reliability_table.py")
            sizes = [len(m.args[1]) for m in getattr(function, "pytestmark", []) if m.name == "parametrize"]
            shown.append(f"`{name}`" + (f" ({math.prod(sizes)} cases)" if sizes else "") + f" in `tests/{file}`")
        rows.append((title, text, shown))
    return rows


def summary(every) -> str:
    """The counts in one sentence (the document's and the README's)."""
    n = counts(every)
    return (f"{n['tried']} bad inputs tried; of the {n['tried'] - n['new']} that existed before issue 10, "
            f"{n['clear']} gave a clear error, {n['raw']} a traceback or raw exception and {n['silent']} were "
            f"accepted silently, {n['data loss']} of them destroying data; {n['new']} more cover code written since. "
            "Every one is now refused with a subtune error (one `Error:` line at the CLI) and changes nothing on disk.")


INTRO = [
    "# Reliability: the bad-input catalogue",
    "",
    "<!-- Generated by `python scripts/reliability_table.py` from the catalogue rows in tests/; "
    "tests/test_reliability_doc.py fails when this file differs. Edit the rows, not this file. -->",
    "",
    "Issue #10 tried subtune as a hostile user would. Every bad input found then, while fixing them, or in code "
    "written since is a row of a parametrised test: the row runs the input and asserts the subtune error type, that "
    "the message contains the fragments listed under *now* (what is wrong, and the fix), and that no file under the "
    "test's directory changed. The CLI rows run the real command and accept only a non-zero exit with one "
    "`Error:` line and no traceback.",
    "",
    "*Before issue 10* is what the code at commit 6e1ed7a did with the same input: **clear** (already a clear "
    "error, perhaps late or without naming the fix), **raw** (a traceback or a raw library exception), **silent** "
    "(accepted, with wrong behaviour), **silent, data loss** (accepted, and files on disk were destroyed), **new** "
    "(the code the row exercises did not exist before).",
]


def counts_table(areas: list[Area]) -> list[str]:
    every = [c for a in areas for c in a.cases]
    out = ["## Counts", "", summary(every) + " (The issue's first pass counted 95 inputs: 48 clear, 23 raw, "
           "21 silent, 3 of them destroying data.)", "",
           "| area | tried | clear before | raw before | silent before | data loss before | new code |",
           "|---|---:|---:|---:|---:|---:|---:|"]
    for title, n in [(f"[{a.title}](#{anchor(a.title)})", counts(a.cases)) for a in areas] + [("**all**",
                                                                                               counts(every))]:
        bold = "**" if title == "**all**" else ""
        values = " | ".join(f"{bold}{n[k]}{bold}" for k in ("tried", "clear", "raw", "silent", "data loss", "new"))
        out.append(f"| {title} | {values} |")
    return out


def behaviour_table() -> list[str]:
    out = ["## Behaviour tests beside the rows", "",
           "What a single bad input cannot show: kills, resumes, sizes, seeds, numerics.", "",
           "| behaviour | what is checked | tests |", "|---|---|---|"]
    for title, text, shown in behaviour_tests():
        out.append(f"| {cell(title)} | {cell(text)} | {'<br>'.join(cell(s) for s in shown)} |")
    return out


def rows_tables(areas: list[Area]) -> list[str]:
    out = ["## The rows", ""]
    for area in areas:
        covers = f"{area.covers[0].upper()}{area.covers[1:]}. " if area.covers else ""
        out += [f"### {area.title}", "", f"{covers}{len(area.cases)} rows of `{area.test}`.", "",
                "| id | what it tries | before issue 10 | now |", "|---|---|---|---|"]
        out += [f"| `{c.id}` | {cell(c.tries)} | {cell(before(c))} | {cell(now(c))} |" for c in area.cases]
        out.append("")
    return out


def render(areas: list[Area] | None = None) -> str:
    """docs/RELIABILITY.md as the rows give it."""
    areas = collect() if areas is None else areas
    check(areas)
    return "\n".join(INTRO + [""] + counts_table(areas) + [""] + behaviour_table() + [""] + rows_tables(areas))


README = ROOT / "README.md"
README_BEGIN = "<!-- reliability counts: written by scripts/reliability_table.py -->"
README_END = "<!-- end of reliability counts -->"


def readme(areas: list[Area] | None = None, text: str | None = None) -> str:
    """README.md with its counts paragraph (between the two markers) as the rows give it."""
    areas = collect() if areas is None else areas
    check(areas)
    text = README.read_text() if text is None else text
    if README_BEGIN not in text or README_END not in text:
        raise SystemExit(f"README.md lacks the markers {README_BEGIN!r} ... {README_END!r} around its counts")
    head, rest = text.split(README_BEGIN, 1)
    tail = rest.split(README_END, 1)[1]
    every = [c for a in areas for c in a.cases]
    block = textwrap.fill(f"{summary(every)} The table of every case: [docs/RELIABILITY.md](docs/RELIABILITY.md).",
                          width=120, break_long_words=False, break_on_hyphens=False)
    return f"{head}{README_BEGIN}\n{block}\n{README_END}{tail}"


def anchor(title: str) -> str:
    """GitHub's heading anchor: lower case, punctuation dropped, spaces to hyphens."""
    kept = "".join(ch for ch in title.lower() if ch.isalnum() or ch in " -_")
    return kept.replace(" ", "-")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if docs/RELIABILITY.md or the README's counts "
                                                             "are not what the rows give")
    args = parser.parse_args()
    areas = collect()
    wanted = {DOC: render(areas), README: readme(areas)}
    stale = [path for path, text in wanted.items() if not path.exists() or path.read_text() != text]
    if args.check:
        if stale:
            names = ", ".join(p.name for p in stale)
            raise SystemExit(f"out of date: {names}; run python scripts/reliability_table.py")
        print("docs/RELIABILITY.md and the README's counts are up to date")
        return
    for path in stale:
        path.write_text(wanted[path])
        print(f"wrote {path.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
