"""Render the README's measured tables from the JSON that the test suite and the benchmarks write, so that
the numbers in the README have one source and cannot drift apart.

    python -m pytest -q && python tools/bench.py --quick   # writes out/measured.json and out/bench.json
    python tools/report.py --take     # copy those two into docs/measurements/, then rewrite the README
    python tools/report.py            # rewrite the README sections from docs/measurements/*.json
    python tools/report.py --check    # exit 1 if the README differs from the render (tests/test_report.py)

The README holds each rendered table between ``<!-- report:NAME -->`` and ``<!-- /report:NAME -->``;
everything between the two markers is replaced. Sections:
- ``parity``: the errors the suite measured (``measured`` fixture, tests/conftest.py), one row per line of
  ``PARITY`` below, each the maximum (or range) over the keys it names;
- ``performance``: every row of ``tools/bench.py``'s table (ours vs a same-run baseline, goal, met);
- ``caches``: the per-policy detail of the bench's caching section;
- ``mutants``: which test catches each known bug (``tools/mutants.py``).
"""
from __future__ import annotations

import argparse
import fnmatch
import json
import pathlib
import shutil
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs" / "measurements"
README = ROOT / "README.md"

#: (what, reference, key patterns, quantity): a row of the parity table; the patterns are fnmatch globs over
#: the keys the suite records (the test that records each is named by the key's first two parts)
PARITY = [
    ("UMT5 encoder", "transformers `UMT5EncoderModel`", ["component/umt5/*rel_l2"], "relative L2"),
    ("transformer (T2V shapes incl. odd frames, non-square; I2V image tokens; per-token timesteps)",
     "`WanTransformer3DModel`", ["component/transformer/*rel_l2"], "relative L2"),
    ("VAE 2.1 / 2.2 decode and encode", "`AutoencoderKLWan`", ["component/vae*rel_l2"], "relative L2"),
    ("CLIP vision (penultimate layer)", "transformers `CLIPVisionModelWithProjection`", ["component/clip*rel_l2"],
     "relative L2"),
    ("UniPC / flow-match Euler trajectories", "diffusers schedulers", ["component/scheduler/*"], "max abs"),
    ("whole pipeline, final latents: every family, with and without image, across both experts",
     "`WanPipeline` / `WanImageToVideoPipeline` (`output_type=\"latent\"`)", ["pipeline/*latents_max_abs"], "max abs"),
    ("whole pipeline, final latents", "the same", ["pipeline/*latents_rel_l2"], "relative L2"),
    ("whole pipeline, decoded frames in [0, 1] (incl. `wan-run --output x.npy`)", "the same pipelines",
     ["pipeline/*frames_max_abs"], "max abs"),
    ("negative controls: guidance off, another negative prompt, guidance_2 = guidance, the expert boundary one "
     "step later (what such a bug would move the frames by; the tests require >= 100x their bound)",
     "our own run with the bug's effect", ["pipeline/*_frames_moved"], "max abs"),
    ("step caching (MagCache, CFG cache, TeaCache, FirstBlockCache), final latents",
     "a reference loop in the test on diffusers' transformer", ["caching/*latents_max_abs"], "max abs"),
    ("8 simulated devices, every mesh and context-attention mode, latents", "the same run on one device",
     ["sharding/*latents_max_abs"], "max abs"),
    ("8 simulated devices, frames", "the same run on one device", ["sharding/*frames_max_abs"], "max abs"),
    ("optimizations shown unchanged: one loop vs per-step calls vs 3 + 1 steps, KV cache on vs off, weights "
     "recast vs cast at use, attention padding", "the run without the optimization",
     ["optimization/one_loop*", "optimization/kv_cache*", "optimization/weights_recast*",
      "optimization/attention_padding*"], "max abs / rel. L2"),
    ("VAE decode and encode in chunks of 2, 3, 4 latent frames", "chunk 1",
     ["optimization/vae_chunk/*/decode/*", "optimization/vae_chunk/*/encode/*"], "relative L2"),
    ("float32 attention temporaries at B=1, H=12, S=32,768, Dh=128 (XLA memory analysis; the plain formula "
     "needs 96 GiB)", "the test requires < 4 GiB", ["optimization/attention_memory/*"], "GiB"),
    ("VAE decode working memory (XLA memory analysis), 41 vs 21 latent frames", "flat",
     ["optimization/vae_chunk/*/decode_memory/*"], "relative growth"),
    ("1.3B-shaped denoise step, 480p x 81 frames, float32, CFG batch of 2, 512-token K/V cache: temporaries "
     "(XLA memory analysis, compile only)", "the test requires < 16 GiB", ["optimization/step_memory/*"], "GiB"),
    ("`wan-run --plan`, Wan2.2-T2V-A14B widths (2 layers per expert) at 720p x 81 frames, float32: the denoise "
     "stage's working memory", "a hand-built step of the same shapes (within 15%)", ["plan/*"], "GiB"),
    ("LoRAs (diffusers/PEFT, PEFT metadata alpha, original Wan with .alpha and .diff_b, kohya; two stacked; one per Wan "
     "2.2 expert), applied at load and merged at conversion: frames", "diffusers `load_lora_weights` + `fuse_lora`",
     ["lora/*/at_load/frames_max_abs", "lora/*/merged/frames_max_abs"], "max abs"),
    ("quantized block matmul, float8_e4m3fn and int8 weights with per-channel scales, random data",
     "the float32 matmul (the issue's bounds: 3e-2, 1e-2)", ["quant/matmul_rel_error/*"], "relative L2"),
    ("`--offload` encoders, experts, all: device bytes freed during each denoise step (`jax.live_arrays()`), "
     "output bitwise equal", "the offloaded weights' bytes, exactly", ["optimization/offload_*"], "bytes"),
]
#: (what, key patterns): bf16 against float32, PSNR of uint8 frames
BF16 = [("bf16 checkpoint + compute (`dtype=\"bfloat16\"`, the GPU/TPU default) vs float32, uint8 frames, every "
         "family", ["bf16/wan*psnr_db"]),
        ("bf16 dtypes (`Dtypes()`) vs float32 (`test_optimizations`)", ["optimization/dtypes/default*"]),
        ("transformer blocks quantized at load (e4m3, int8; float32 compute) vs float32 (`test_quant`)",
         ["quant/at_load_psnr_db/*"])]


def _matching(measured: dict, patterns) -> list[tuple[str, float]]:
    return sorted((k, v["value"]) for k, v in measured.items() if any(fnmatch.fnmatch(k, p) for p in patterns))


def _span(values, fmt) -> str:
    lo, hi = min(values), max(values)
    return fmt(hi) if fmt(lo) == fmt(hi) else f"{fmt(lo)} - {fmt(hi)}"


def render_parity(measured: dict) -> str:
    e = lambda v: f"{v:.1e}"  # noqa: E731
    lines = ["| what | reference | measured | quantity | cases |", "|---|---|---|---|---|"]
    for what, ref, patterns, quantity in PARITY:
        got = _matching(measured, patterns)
        if got:
            lines.append(f"| {what} | {ref} | {_span([v for _, v in got], e)} | {quantity} | {len(got)} |")
    for what, patterns in BF16:
        got = _matching(measured, patterns)
        if got:
            lines.append(f"| {what} | float32 run, same latents | {_span([v for _, v in got], lambda v: f'{v:.1f} dB')}"
                         f" | PSNR (peak 255) | {len(got)} |")
    return "\n".join(lines)


def fmt(v) -> str:
    """The bench's number format (tools/bench.py prints with the same rule)."""
    if v is None:
        return "-"
    if abs(v) >= 100:
        return f"{v:.0f}"
    return f"{v:.3g}" if abs(v) < 10 else f"{v:.1f}"


def render_machine(bench: dict) -> str:
    m = bench["machine"]
    flags = ", ".join(m.get("cpu_flags", []))
    la = lambda k: f"{m[k][0]:.1f}" if m.get(k) else "?"  # noqa: E731
    return (f"Run of {m['date']} (`tools/bench.py{' --quick' if bench.get('quick') else ''}`, "
            f"{bench['total_seconds'] / 60:.1f} min): {m.get('cpu', '?')} ({flags}), {m['cores']} cores, "
            f"{m['ram_gib']} GiB; Python {m['python']}, jax {m['jax']}, torch {m['torch']}, diffusers "
            f"{m['diffusers']}; load average {la('load_average_start')} at the start, {la('load_average_end')} at "
            "the end.")


def render_performance(bench: dict) -> str:
    lines = [render_machine(bench), "", "| section | what | ours | baseline | ratio | goal | met | note |",
             "|---|---|---|---|---|---|---|---|"]
    last = None
    for r in bench["rows"]:
        met = "-" if r["met"] is None else ("yes" if r["met"] else "**no**")
        ratio = "-" if r["ratio"] is None else f"{r['ratio']:.2f}"
        section = "" if r["section"] == last else r["section"]
        last = r["section"]
        lines.append(f"| {section} | {r['metric'].strip()} | {fmt(r['ours'])} | {fmt(r['baseline'])} | {ratio} | "
                     f"{r['goal']} | {met} | {r['note']} |")
    for name, err in bench.get("failed", {}).items():
        lines.append(f"| {name} | FAILED: {err} | | | | | | |")
    return "\n".join(lines)


def render_caches(bench: dict) -> str:
    res = bench.get("raw", {}).get("caches")
    if not res:
        return "(no caching section in this bench run)"
    lines = ["| policy | forwards | denoise s | speed-up | bound | of bound | PSNR vs dense | SSIM |",
             "|---|---|---|---|---|---|---|---|"]
    for x in res:  # the first row is the dense run itself
        psnr = "-" if x is res[0] else "identical" if x["psnr"] == float("inf") else f"{x['psnr']:.1f} dB"
        lines.append(f"| {x['policy']} | {x['forwards']:.4g}/{x['dense_forwards']} | {x['denoise_s']:.2f} | "
                     f"{x['speedup']:.2f} | {x['bound']:.2f} | {x['of_bound']:.2f} | {psnr} | {x['ssim']:.3f} |")
    return "\n".join(lines)


def render_mutants(mutants: dict) -> str:
    lines = [f"Run of {mutants['date']}:", "", "| bug put back | change | caught by |", "|---|---|---|"]
    for m in mutants["mutants"]:
        change = m["change"].replace("|", "\\|")
        caught = f"`{m['detail']}`" if m["verdict"] == "caught" else f"**{m['verdict']}**"
        lines.append(f"| {m['name']} | `{m['file']}`: `{change}` | {caught} |")
    return "\n".join(lines)


def render_all(measured: dict | None, bench: dict | None, mutants: dict | None = None) -> dict[str, str]:
    out = {}
    if mutants is not None:
        out["mutants"] = render_mutants(mutants)
    if measured is not None:
        out["parity"] = render_parity(measured)
    if bench is not None:
        out["performance"] = render_performance(bench)
        out["caches"] = render_caches(bench)
    return out


def splice(text: str, sections: dict[str, str]) -> str:
    """Replace what lies between each section's two markers (both must exist, once)."""
    for name, body in sections.items():
        start, end = f"<!-- report:{name} -->", f"<!-- /report:{name} -->"
        if text.count(start) != 1 or text.count(end) != 1:
            raise ValueError(f"README.md: expected one {start} and one {end}")
        a, b = text.index(start) + len(start), text.index(end)
        text = text[:a] + "\n" + body + "\n" + text[b:]
    return text


def load(path: pathlib.Path):
    return json.loads(path.read_text()) if path.is_file() else None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--take", action="store_true", help="copy out/{measured,bench,mutants}.json into docs/ first")
    ap.add_argument("--check", action="store_true", help="exit 1 if README.md differs from the render")
    a = ap.parse_args(argv)
    if a.take:
        DOCS.mkdir(parents=True, exist_ok=True)
        for name in ("measured.json", "bench.json", "mutants.json"):
            if (ROOT / "out" / name).is_file():
                shutil.copyfile(ROOT / "out" / name, DOCS / name)
                print(f"took out/{name}")
    text = README.read_text()
    new = splice(text, render_all(load(DOCS / "measured.json"), load(DOCS / "bench.json"), load(DOCS / "mutants.json")))
    if a.check:
        if new != text:
            print("README.md differs from tools/report.py's render of docs/measurements/; run python tools/report.py",
                  file=sys.stderr)
            return 1
        return 0
    if new != text:
        README.write_text(new)
        print("README.md updated")
    return 0


if __name__ == "__main__":
    sys.exit(main())
