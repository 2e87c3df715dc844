"""Batched generation: videos of one settings class (``RunConfig.batch_key``) run as one batch through the
denoise loop (latents B > 1, CFG as 2B rows), each equal to its own run with its seed: float32 frames and
final latents within TOL max abs. Every comparison has a control that moves the result >= MOVE tolerances (another
seed, prompt, negative prompt or image), so a batch that shared seeds or mixed rows between videos fails.
``wan-run --prompts``: one load, lines grouped into batches, a bad line refused before any weights load."""
import dataclasses
import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from wan_runtime import caching, schedulers
from wan_runtime.pipeline import DEFAULT_NEGATIVE, Generation, InputError, WanPipeline
from wan_runtime.runconfig import group_batches

ROOT = pathlib.Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": f"{ROOT / 'runtime'}:{ROOT / 'convert'}"}

TOL = 1e-5  # float32 batch vs solo, frames and latents max abs: measured 0.3-2.7e-6 (other matmul shapes)
MOVE = 100  # a control lands at least this many tolerances away
# long prompts: the tiny model's cross-attention is near uniform over 512 text tokens, so short ones barely move it
PROMPTS = ("A red fox runs through fresh snow in a quiet forest at dawn. Waves crash on a rocky beach under a purple sky.",
           "A small robot walks along a busy city street at night, neon lights reflecting in puddles on the ground.",
           "An astronaut rides a horse on the moon. Slow motion close-up of a hummingbird drinking from a flower.")
NEGATIVES = (DEFAULT_NEGATIVE, "blurry, static, overexposed, worst quality, low quality, ugly, deformed", "")
SEEDS = (3, 11, 5)
SIZE = dict(height=32, width=48, num_frames=9, num_inference_steps=3)


@pytest.fixture(scope="module")
def pipes(converted_f32):
    cache = {}

    def get(family):
        if family not in cache:
            cache[family] = WanPipeline.from_converted(converted_f32(family), dtype="float32")
        return cache[family]
    return get


def _diff(a, b) -> float:
    return float(np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32)).max())


def _check(batch, solo, controls):
    """Each batched video equals its solo run; each control moved its solo run >= MOVE tolerances."""
    assert len(batch) == len(solo)
    for i, (b, s) in enumerate(zip(batch, solo)):
        assert b.config == s.config and b.frames.shape == s.frames.shape and b.latents.shape == s.latents.shape
        assert np.array_equal(b.token_counts, s.token_counts) and b.truncated == s.truncated
        errors = _diff(b.frames, s.frames), _diff(b.latents, s.latents)
        print(f"video {i}: frames {errors[0]:.1e}, latents {errors[1]:.1e} max abs from its solo run")
        assert max(errors) <= TOL, errors
    for name, (moved, ref) in controls.items():
        d = _diff(moved.frames, ref.frames)
        print(f"control {name}: frames moved {d:.1e}")
        assert d >= MOVE * TOL, (name, d)


def _ran_batch(pipe, b: int) -> bool:
    """The denoise loop was compiled for latents of batch b (so the videos did run together)."""
    return any(k[0] == "denoise" and k[3][0] == b for k in pipe.compiled)


@pytest.mark.parametrize("guidance", [5.0, 1.0])
def test_batch_equals_solo_runs(pipes, guidance):
    pipe = pipes("wan2.1-t2v")
    configs = [pipe.config(negative_prompt=n, seed=s, guidance_scale=guidance, **SIZE) for n, s in zip(NEGATIVES, SEEDS)]
    batch = pipe.generate_batch(PROMPTS, configs)
    assert _ran_batch(pipe, 3)
    solo = [pipe.generate(p, c) for p, c in zip(PROMPTS, configs)]
    controls = {"seed": (pipe.generate(PROMPTS[0], dataclasses.replace(configs[0], seed=SEEDS[1])), solo[0]),
                "prompt": (pipe.generate(PROMPTS[1], configs[0]), solo[0])}
    if guidance > 1:  # without guidance no unconditional row, so no negative prompt to see
        controls["negative prompt"] = (pipe.generate(PROMPTS[0], dataclasses.replace(
            configs[0], negative_prompt=NEGATIVES[1])), solo[0])
    _check(batch, solo, controls)


def test_two_experts_across_the_boundary(pipes):
    pipe = pipes("wan2.2-t2v-a14b")
    kw = dict(SIZE, num_inference_steps=4, guidance_scale=5.0, guidance_scale_2=2.0)
    configs = [pipe.config(negative_prompt=n, seed=s, **kw) for n, s in zip(NEGATIVES[:2], SEEDS[:2])]
    first_low = schedulers.expert_boundary_index(
        schedulers.make_schedule(configs[0].scheduler, 4, configs[0].flow_shift).timesteps, configs[0].boundary)
    assert 0 < first_low < 4  # both experts run
    batch = pipe.generate_batch(PROMPTS[:2], configs)
    solo = [pipe.generate(p, c) for p, c in zip(PROMPTS[:2], configs)]
    low = dataclasses.replace(configs[0], guidance_2=5.0)  # the low-noise expert's guidance is its own
    _check(batch, solo, {"seed": (pipe.generate(PROMPTS[0], dataclasses.replace(configs[0], seed=SEEDS[1])), solo[0]),
                         "guidance_2": (pipe.generate(PROMPTS[0], low), solo[0])})


def test_image_per_video(pipes):
    """Wan 2.1 I2V: each video its own image (VAE latents, CLIP tokens) in one batch."""
    from PIL import Image

    pipe = pipes("wan2.1-i2v")
    images = [Image.fromarray(np.random.default_rng(i).integers(0, 256, (40, 56, 3), dtype=np.uint8)) for i in (1, 2)]
    configs = [pipe.config(image=True, negative_prompt=n, seed=s, guidance_scale=5.0, **SIZE)
               for n, s in zip(NEGATIVES[:2], SEEDS[:2])]
    batch = pipe.generate_batch(PROMPTS[:2], configs, images=images)
    solo = [pipe.generate(p, c, image=im) for p, c, im in zip(PROMPTS[:2], configs, images)]
    _check(batch, solo, {"image": (pipe.generate(PROMPTS[0], configs[0], image=images[1]), solo[0])})


def test_videos_per_prompt_take_seed_plus_k(pipes):
    pipe = pipes("wan2.1-t2v")
    kw = dict(SIZE, guidance_scale=5.0)
    gens = pipe(list(PROMPTS[:2]), list(NEGATIVES[:2]), num_videos_per_prompt=2, seed=7, **kw)
    assert isinstance(gens, list) and [g.config.seed for g in gens] == [7, 8, 9, 10]
    assert _ran_batch(pipe, 4)
    order = [(0, 7), (0, 8), (1, 9), (1, 10)]  # prompt-major
    solo = [pipe(PROMPTS[p], NEGATIVES[p], seed=s, **kw) for p, s in order]
    assert all(isinstance(g, Generation) for g in solo)
    _check(gens, solo, {"seed s+1": (solo[1], solo[0])})
    one = pipe(PROMPTS[0], NEGATIVES[0], num_videos_per_prompt=2, seed=7, **kw)
    assert [g.config.seed for g in one] == [7, 8] and _diff(one[1].frames, solo[1].frames) <= TOL


def test_batch_keys():
    from wan_runtime.runconfig import RunConfig

    base = RunConfig(height=32, width=48, frames=9, steps=3)
    assert base.batch_key() == dataclasses.replace(base, seed=9, negative_prompt="x").batch_key()
    for change in (dict(steps=4), dict(guidance=2.0), dict(height=64), dict(scheduler="euler"), dict(fps=8)):
        assert dataclasses.replace(base, **change).batch_key() != base.batch_key(), change
    assert dataclasses.replace(base, cache=caching.CFGCache(interval=2)).batch_key() is None
    assert group_batches(["a", None, "b", "a", "a", "b"], 2) == [[0, 3], [4], [1], [2, 5]]
    assert group_batches(["a", "a", "a"]) == [[0, 1, 2]]


def test_refused_batches(pipes):
    pipe = pipes("wan2.1-t2v")
    a = pipe.config(**SIZE)
    with pytest.raises(InputError, match="differ in steps"):
        pipe.generate_batch(PROMPTS[:2], [a, dataclasses.replace(a, steps=4)])
    cached = dataclasses.replace(a, cache=caching.CFGCache(interval=2).validate())
    with pytest.raises(InputError, match="step caching"):
        pipe.generate_batch(PROMPTS[:2], [cached, dataclasses.replace(cached, seed=1)])
    with pytest.raises(InputError, match="prompt"):
        pipe.generate_batch([PROMPTS[0], " "], [a, a])
    # the API runs step-cached videos one at a time instead
    gens = pipe(list(PROMPTS[:2]), cache=caching.CFGCache(interval=2), **SIZE)
    assert [g.config.seed for g in gens] == [0, 1] and all(g.block_runs is not None for g in gens)


def test_mixed_images_refused(pipes):
    from PIL import Image

    pipe = pipes("wan2.2-ti2v-5b")  # the image is optional: a batch has one for every video or for none
    config = pipe.config(image=True, height=32, width=64, num_frames=9, num_inference_steps=1)
    with pytest.raises(InputError, match="--image"):
        pipe.generate_batch(PROMPTS[:2], [config, config], images=[Image.new("RGB", (64, 32)), None])


# ---------------------------------------------------------------------------------------------- wan-run --prompts
CLI_SIZE = ["--height", "32", "--width", "48", "--frames", "9", "--steps", "3", "--dtype", "float32", "-q"]


def _invoke(monkeypatch, *args) -> tuple[int, list[int]]:
    """wan-run in this process (click's CliRunner): (checkpoint loads, the size of each batch it ran)."""
    from click.testing import CliRunner

    from wan_runtime.cli import main

    loads, sizes = [], []
    load, batch = WanPipeline.from_converted.__func__, WanPipeline.generate_batch
    monkeypatch.setattr(WanPipeline, "from_converted", classmethod(lambda cls, *a, **k: loads.append(1) or load(cls, *a, **k)))
    monkeypatch.setattr(WanPipeline, "generate_batch", lambda self, prompts, *a, **k: sizes.append(len(prompts)) or batch(
        self, prompts, *a, **k))
    r = CliRunner().invoke(main, [str(a) for a in args])
    assert r.exit_code == 0, (r.output, r.exception)
    return len(loads), sizes


def test_prompts_file_txt(converted_f32, tmp_path, monkeypatch):
    ck = converted_f32("wan2.1-t2v")
    (tmp_path / "p.txt").write_text(f"{PROMPTS[0]}\n\n  {PROMPTS[1]}  \n{PROMPTS[2]}\n")
    out = tmp_path / "videos"  # made by wan-run
    assert _invoke(monkeypatch, "--checkpoint", ck, "--prompts", tmp_path / "p.txt", "--output", out,
                   "--max-batch", "2", *CLI_SIZE) == (1, [2, 1])
    assert sorted(p.name for p in out.iterdir()) == [f"000{i}.{x}" for i in range(3) for x in ("json", "mp4")]
    sides = [json.loads((out / f"000{i}.json").read_text()) for i in range(3)]
    assert [s["prompt"] for s in sides] == list(PROMPTS)


def test_prompts_file_jsonl(converted_f32, tmp_path, monkeypatch):
    """Lines 1-2 run as one batch (seeds and negative prompts their own), 3 and 4 alone (other steps; 4 writes
    .npy, another output type): each as a single wan-run of its settings (4: bitwise; 1-2: within TOL)."""
    ck = converted_f32("wan2.1-t2v")
    lines = [dict(prompt=PROMPTS[0], seed=3, output="a.npy"),
             dict(prompt=PROMPTS[1], seed=4, negative_prompt=NEGATIVES[1], output="b.npy"),
             dict(prompt=PROMPTS[2], steps=2, seed=5),
             dict(prompt=PROMPTS[0], steps=2, seed=6, output="d.npy")]
    (tmp_path / "p.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    out = tmp_path / "videos"
    assert _invoke(monkeypatch, "--checkpoint", ck, "--prompts", tmp_path / "p.jsonl", "--output", out,
                   *CLI_SIZE) == (1, [2, 1, 1])
    names = {"a": "npy", "b": "npy", "0002": "mp4", "d": "npy"}
    assert sorted(p.name for p in out.iterdir()) == sorted(f"{n}.{x}" for n, v in names.items() for x in ("json", v))
    sides = [json.loads((out / f"{n}.json").read_text()) for n in names]
    assert [(s["prompt"], s["seed"], s["settings"]["steps"]) for s in sides] == [
        (PROMPTS[0], 3, 3), (PROMPTS[1], 4, 3), (PROMPTS[2], 5, 2), (PROMPTS[0], 6, 2)]
    assert (sides[0]["negative_prompt"], sides[1]["negative_prompt"]) == (DEFAULT_NEGATIVE, NEGATIVES[1])
    singles = {}
    for name, line in (("a", lines[0]), ("b", lines[1]), ("d", lines[3])):
        flags = [f"--{k.replace('_', '-')}={v}" for k, v in line.items() if k not in ("prompt", "output")]
        assert _invoke(monkeypatch, "--checkpoint", ck, "--prompt", line["prompt"], *CLI_SIZE, *flags,
                       "--output", tmp_path / f"single-{name}.npy") == (1, [1])
        singles[name] = np.load(tmp_path / f"single-{name}.npy")
    assert np.array_equal(np.load(out / "d.npy"), singles["d"])  # ran alone: the same computation, bit for bit
    errors = [_diff(np.load(out / f"{n}.npy"), singles[n]) for n in "ab"]
    print(f"wan-run --prompts, batched lines vs single runs: frames max abs {max(errors):.1e}")
    assert max(errors) <= TOL and _diff(singles["a"], singles["b"]) >= MOVE * TOL


BAD_LINES = {'{"prompt": "a", "steps": 0}': "--steps: must be >= 1, got 0",
             '{"prompt": "a", "seed": -1}': "--seed: -1 is not in the range",
             '{"prompt": "a", "steps": "3"}': "--steps: expected an integer",
             '{"prompt": "a", "scheduler": "ddim"}': "--scheduler: 'ddim' is not one of",
             '{"prompt": "a", "stepz": 3}': "'stepz': not a per-line setting",
             '{"prompt": "a", "output": "../x.mp4"}': "output: a file name",
             '{"prompt": "b", "output": "0000.mp4"}': "output: 0000.mp4 is an earlier line's output too",
             '{"steps": 3}': "prompt: missing",
             '{"prompt": "a"': "not a JSON object"}


@pytest.mark.parametrize("bad", list(BAD_LINES))
def test_prompts_file_bad_line(converted_f32, tmp_path, bad):
    """One error line naming FILE:LINE and the field, exit 2, before any weights load; nothing made."""
    from click.testing import CliRunner

    from wan_runtime.cli import main

    path = tmp_path / "p.jsonl"
    path.write_text(f'{{"prompt": "fine"}}\n\n{bad}\n{{"prompt": "fine too"}}\n')
    args = ["--checkpoint", str(converted_f32("wan2.1-t2v")), "--prompts", str(path), "--output", str(tmp_path / "out")]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 2 and len(r.stderr.splitlines()) == 1, r.stderr
    assert r.stderr.startswith(f"wan-run: error: --prompts: {path}:3: {BAD_LINES[bad]}"), r.stderr
    assert not (tmp_path / "out").exists()


def test_prompts_file_bad_line_real_process(converted_f32, tmp_path):
    """The same in a real process: one line, no traceback; and --prompt with --prompts is a usage error."""
    (tmp_path / "prompts.jsonl").write_text('{"prompt": "fine"}\n{"prompt": "a", "steps": 0}\n')
    cmd = [sys.executable, "-m", "wan_runtime.cli", "--checkpoint", str(converted_f32("wan2.1-t2v")), "--prompts",
           "prompts.jsonl", "--output", "out"]
    r = subprocess.run(cmd, capture_output=True, text=True, env=ENV, cwd=tmp_path)
    assert (r.returncode, r.stderr) == (2, "wan-run: error: --prompts: prompts.jsonl:2: --steps: must be >= 1, got 0\n")
    r = subprocess.run(cmd + ["--prompt", "x"], capture_output=True, text=True, env=ENV, cwd=tmp_path)
    assert r.returncode == 2 and "Traceback" not in r.stderr and "--prompt: not with --prompts" in r.stderr
    assert not (tmp_path / "out").exists()
