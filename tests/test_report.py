"""The README's measured tables are the render of the quoted runs (docs/measurements/), so they cannot
drift from them or from each other; the known-bug list still applies to the code."""
import json
import pathlib

import report

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_readme_tables_are_the_render_of_the_quoted_runs():
    for name in ("measured.json", "bench.json", "mutants.json"):
        assert (report.DOCS / name).is_file(), f"docs/measurements/{name} is missing: python tools/report.py --take"
    assert report.main(["--check"]) == 0, "README.md differs from the render: run python tools/report.py"


def test_every_parity_row_has_figures():
    """A renamed key would silently drop its row: every row of the table must match recorded figures."""
    measured = json.loads((report.DOCS / "measured.json").read_text())
    for what, _, patterns, _ in report.PARITY:
        assert report._matching(measured, patterns), f"no recorded figure for the parity row {what!r}"
    for what, patterns in report.BF16:
        assert report._matching(measured, patterns), f"no recorded figure for {what!r}"


def test_quoted_mutant_run_caught_every_bug_and_the_bugs_still_apply():
    import mutants

    quoted = json.loads((report.DOCS / "mutants.json").read_text())["mutants"]
    assert {m["name"] for m in quoted} == {m.name for m in mutants.MUTANTS}
    assert all(m["verdict"] == "caught" for m in quoted), [m for m in quoted if m["verdict"] != "caught"]
    for m in mutants.MUTANTS:  # the text each mutant changes is still in the code, once
        text = (ROOT / m.file).read_text()
        for old, _ in ((m.old, m.new), *m.also):
            assert text.count(old) == 1, (m.name, old)
