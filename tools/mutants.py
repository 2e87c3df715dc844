"""Reintroduce known bugs one at a time and show which test catches each (a test must be able to fail).

    python tools/mutants.py                # every mutant; one line each: caught by which test, or NOT CAUGHT
    python tools/mutants.py --only guidance-ignored,crc-skipped-on-mapped-chunks
    python tools/mutants.py --list

It writes out/mutants.json (``--json``), which ``tools/report.py --take`` renders into the README.

Each mutant is a textual change to one source file. The tree (runtime, convert, tools, tests, configs,
assets) is copied to a temporary folder, the change applied there (the text must occur exactly as
written: a mutant that no longer applies is reported, so the list is kept in step with the code), and the
mutant's tests run from the copy with ``pytest -x`` (the copy's conftest.py puts its own packages first on
``sys.path``). The working tree is never touched. Exit status: 1 if any mutant was not caught or no longer
applies.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
COPY = ("conftest.py", "pyproject.toml", "runtime", "convert", "tools", "tests", "configs", "assets")
PIPELINE, LOOP = "runtime/wan_runtime/pipeline.py", "runtime/wan_runtime/denoise.py"
FAMILY_TESTS = ["tests/test_families.py", "tests/test_pipeline.py"]


@dataclasses.dataclass(frozen=True)
class Mutant:
    name: str
    file: str
    old: str
    new: str
    tests: list
    also: tuple = ()  # further (old, new) edits in the same file


_AWAY = ("(((np.asarray({0}, np.float32).view(np.uint32) + np.uint32(0x8000)) & np.uint32(0xFFFF0000))"
         ".view(np.float32) if {1}.dtype.name == 'bfloat16' else {0})")

MUTANTS = [
    Mutant("guidance-ignored", LOOP, "v = v[b:] + guidance * (v[:b] - v[b:])", "v = v[:b]", FAMILY_TESTS),
    Mutant("guidance-2-ignored", PIPELINE, "guidance = config.guidance if k == 0 else config.guidance_low",
           "guidance = config.guidance", FAMILY_TESTS),
    Mutant("negative-prompt-ignored", PIPELINE,
           "rows += [negative_prompt] if isinstance(negative_prompt, str) else list(negative_prompt)",
           'rows += [""] * (1 if isinstance(negative_prompt, str) else len(negative_prompt))', FAMILY_TESTS),
    Mutant("expert-boundary-off-by-one", PIPELINE, "enumerate(((start, boundary), (max(start, boundary), steps)))",
           "enumerate(((start, boundary + 1), (max(start, boundary + 1), steps)))", FAMILY_TESTS),
    Mutant("cfg-cache-rebuild-without-difference", LOOP, 'v[:1] - cache["diff"]', "v[:1]",
           ["tests/test_caching.py"]),
    Mutant("teacache-accumulator-never-reset", "runtime/wan_runtime/caching.py", '"acc": jnp.where(compute, 0.0, acc)', '"acc": acc',
           ["tests/test_caching.py"]),
    Mutant("crc-skipped-on-mapped-chunks", "runtime/wan_runtime/checkpoint.py",
           'if int.from_bytes(os.pread(fd, 4, dest.nbytes), "little") != _crc32c(memoryview(dest)):', "if False:",
           ["tests/reliability/test_checkpoints.py", "tests/test_restore.py"]),
    Mutant("bf16-ties-away-from-zero", "convert/wan_convert/transforms.py",
           'np.copyto(out, x[region], casting="unsafe")',
           f'np.copyto(out, {_AWAY.format("x[region]", "out")}, casting="unsafe")', ["tests/test_convert.py"]),
]


def run(m: Mutant, keep: bool = False) -> tuple[str, str, float]:
    """(verdict, detail, seconds): verdict is "caught", "NOT CAUGHT" or "DOES NOT APPLY"."""
    t0 = time.perf_counter()
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f"wan-mutant-{m.name}-"))
    try:
        for name in COPY:
            src = ROOT / name
            if src.is_dir():
                shutil.copytree(src, tmp / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
            elif src.exists():
                shutil.copy2(src, tmp / name)
        target = tmp / m.file
        text = target.read_text()
        for old, new in ((m.old, m.new), *m.also):
            if text.count(old) != 1:
                return "DOES NOT APPLY", f"{m.file}: {old!r} found {text.count(old)} times, not once", 0.0
            text = text.replace(old, new)
        target.write_text(text)
        env = {**os.environ, "WAN_JAX_MEASURED": str(tmp / "out" / "measured.json"),
               "PYTHONPATH": os.pathsep.join(str(tmp / p) for p in ("runtime", "convert", "tools"))}
        r = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *m.tests],
                           cwd=tmp, env=env, capture_output=True, text=True)
        failed = re.findall(r"^(?:FAILED|ERROR) (\S+)", r.stdout, re.M)
        if r.returncode == 0:
            return "NOT CAUGHT", f"{' '.join(m.tests)} passed", time.perf_counter() - t0
        if not failed:
            return "NOT CAUGHT", f"pytest exited {r.returncode} without a failing test:\n{r.stdout[-2000:]}", \
                time.perf_counter() - t0
        return "caught", failed[0], time.perf_counter() - t0
    finally:
        if not keep:
            shutil.rmtree(tmp, ignore_errors=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", default="", help="comma-separated mutant names")
    ap.add_argument("--list", action="store_true")
    ap.add_argument("--keep", action="store_true", help="keep the mutated copies (their paths are printed)")
    ap.add_argument("--json", type=pathlib.Path, default=ROOT / "out" / "mutants.json")
    a = ap.parse_args(argv)
    names = [n for n in a.only.split(",") if n]
    unknown = set(names) - {m.name for m in MUTANTS}
    if unknown:
        print(f"mutants: --only: unknown mutant {sorted(unknown)[0]!r}", file=sys.stderr)
        return 2
    chosen = [m for m in MUTANTS if not names or m.name in names]
    if a.list:
        for m in chosen:
            for old, new in ((m.old, m.new), *m.also):
                print(f"{m.name:<40} {m.file}: {old!r} -> {new!r}")
        return 0
    bad, results = 0, []
    for m in chosen:
        verdict, detail, secs = run(m, a.keep)
        bad += verdict != "caught"
        print(f"{m.name:<40} {verdict:<14} {detail}  ({secs:.0f} s)", flush=True)
        results.append({"name": m.name, "file": m.file, "change": f"{m.old} -> {m.new}", "verdict": verdict,
                        "detail": detail, "seconds": round(secs, 1)})
    a.json.parent.mkdir(parents=True, exist_ok=True)
    a.json.write_text(json.dumps({"date": time.strftime("%Y-%m-%d"), "mutants": results}, indent=1) + "\n")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
