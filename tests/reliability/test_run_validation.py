"""wan-run rejects bad input before loading any weights: one line naming the flag, exit code 2, no
traceback (``--debug`` shows it).

"Before loading" is shown three ways: the checks run against *hollow* checkpoints (configs, tokenizer,
manifest, but no arrays), where anything that reads weights fails with "cannot open" instead; the
restore function is replaced by one that fails the test if called; and the real process answers in
seconds (a load + compile of even the tiny model takes longer)."""
import os
import shutil
import time

import numpy as np
import pytest

from tests.reliability.conftest import PRIVATE_MOUNTS, assert_one_line_error, in_tmpfs, invoke, run_cli

OK = ("--height", "16", "--width", "16", "--frames", "5", "--steps", "2")


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    import PIL.Image

    d = tmp_path_factory.mktemp("inputs")
    PIL.Image.new("RGB", (32, 32), (200, 30, 30)).save(d / "first.png")
    (d / "not-an-image.png").write_text("hello")
    (d / "a-folder.png").mkdir()
    (d / "afile").write_text("x")
    (d / "out-folder.mp4").mkdir()
    (d / "unknown-setting.toml").write_text("height = 64\nsize = 3\n")
    (d / "bad-value.toml").write_text('height = "tall"\n')
    (d / "bad-toml.toml").write_text("height = \n")
    np.save(d / "lat-wrong.npy", np.zeros((16, 2, 1, 1), np.float32))
    (d / "lat-garbage.npy").write_text("not numpy")
    return d


def _no_restore(*a, **k):
    raise AssertionError("checkpoint.restore was called: the check must come before loading weights")


# (id, family, arguments after --checkpoint/--output, needles); {d} is the inputs folder
CASES = [
    ("frames-not-4k+1", "t2v", ["--frames", "8"], ["--frames", "4k+1"]),
    ("frames-zero", "t2v", ["--frames", "0"], ["--frames"]),
    ("height-not-multiple", "t2v", ["--height", "33"], ["--height", "multiple of 16"]),
    ("width-not-multiple", "t2v", ["--width", "50"], ["--width", "multiple of 16"]),
    ("height-zero", "t2v", ["--height", "0"], ["--height"]),
    ("steps-zero", "t2v", ["--steps", "0"], ["--steps", ">= 1"]),
    ("steps-not-a-number", "t2v", ["--steps", "abc"], ["--steps", "abc"]),
    ("guidance-negative", "t2v", ["--guidance", "-1"], ["--guidance", ">= 0"]),
    ("guidance-nan", "t2v", ["--guidance", "nan"], ["--guidance", "nan"]),
    ("guidance-inf", "t2v", ["--guidance", "inf"], ["--guidance", "inf"]),
    ("guidance-2-negative", "t2v", ["--guidance-2", "-0.5"], ["--guidance-2"]),
    ("flow-shift-zero", "t2v", ["--flow-shift", "0"], ["--flow-shift", "> 0"]),
    ("fps-zero", "t2v", ["--fps", "0"], ["--fps"]),
    ("prompt-empty", "t2v", ["--prompt", ""], ["--prompt", "empty"]),
    ("prompt-blank", "t2v", ["--prompt", "  \n\t "], ["--prompt", "empty"]),
    ("prompt-missing", "t2v", ["NO-PROMPT"], ["--prompt"]),
    ("unknown-flag", "t2v", ["--sampler", "x"], ["--sampler"]),
    ("scheduler-unknown", "t2v", ["--scheduler", "ddim"], ["--scheduler", "ddim"]),
    ("dtype-unknown", "t2v", ["--dtype", "int8"], ["--dtype", "int8"]),
    ("seed-negative", "t2v", ["--seed", "-1"], ["--seed"]),
    ("seed-over-32-bits", "t2v", ["--seed", str(2**32)], ["--seed"]),
    ("image-for-t2v", "t2v", ["--image", "{d}/first.png"], ["--image", "text-to-video"]),
    ("output-folder-missing", "t2v", ["--output", "{d}/nowhere/x.mp4"], ["--output", "nowhere"]),
    ("output-parent-is-a-file", "t2v", ["--output", "{d}/afile/x.mp4"], ["--output", "afile"]),
    ("output-is-a-folder", "t2v", ["--output", "{d}/out-folder.mp4"], ["--output", "is a folder"]),
    ("output-suffix", "t2v", ["--output", "{d}/x.avi"], ["--output", ".mp4 or .npy"]),
    ("preset-unknown", "t2v", ["--preset", "wan9"], ["--preset", "wan9", "available"]),
    ("preset-unknown-setting", "t2v", ["--preset", "{d}/unknown-setting.toml"], ["unknown-setting.toml", "'size'"]),
    ("preset-bad-value", "t2v", ["--preset", "{d}/bad-value.toml"], ["bad-value.toml", "height", "int"]),
    ("preset-bad-toml", "t2v", ["--preset", "{d}/bad-toml.toml"], ["bad-toml.toml", "line 1"]),
    ("preset-other-family", "t2v", ["--preset", "wan2.2-ti2v-5b"], ["--preset", "wan2.2-ti2v-5b", "wan2.1-t2v"]),
    ("latents-missing", "t2v", ["--latents", "{d}/none.npy"], ["--latents", "none.npy"]),
    ("latents-unreadable", "t2v", ["--latents", "{d}/lat-garbage.npy"], ["--latents", "lat-garbage.npy"]),
    ("latents-wrong-shape", "t2v", ["--latents", "{d}/lat-wrong.npy"], ["--latents", "[16, 2, 1, 1]", "[16, 2, 2, 2]"]),
    ("mesh-unreadable", "t2v", ["--mesh", "fsdp=x"], ["--mesh"]),
    ("mesh-too-many-devices", "t2v", ["--mesh", "fsdp=64"], ["--mesh", "64 devices"]),
    ("cache-unknown-curve", "t2v", ["--cache", "magcache", "--cache-model", "nope"], ["--cache-model", "nope"]),
    ("cache-calibration-missing", "t2v", ["--cache", "magcache", "--cache-model", "wan2.1_t2v_1.3B",
                                          "--cache-calibration", "{d}/none.json"], ["--cache-calibration", "none.json"]),
    ("cache-k-negative", "t2v", ["--cache", "magcache", "--cache-model", "wan2.1_t2v_1.3B", "--cache-k", "-1"],
     ["--cache-k"]),
    ("checkpoint-missing", "none", [], ["no-such-checkpoint", "no such checkpoint folder"]),
    ("i2v-without-image", "i2v", [], ["--image", "image-to-video"]),
    ("i2v-image-missing", "i2v", ["--image", "{d}/none.png"], ["--image", "none.png", "not found"]),
    ("i2v-image-not-an-image", "i2v", ["--image", "{d}/not-an-image.png"], ["--image", "not-an-image.png"]),
    ("i2v-image-is-a-folder", "i2v", ["--image", "{d}/a-folder.png"], ["--image", "a-folder.png"]),
]


def _args(family, extra, hollow, inputs, tmp_path):
    ck = {"t2v": hollow["wan2.1-t2v"], "i2v": hollow["wan2.1-i2v"], "none": tmp_path / "no-such-checkpoint"}[family]
    extra = [a.format(d=inputs) for a in extra]
    prompt = [] if extra == ["NO-PROMPT"] else ["--prompt", "a red fox"]
    extra = [] if extra == ["NO-PROMPT"] else extra
    return ["--checkpoint", ck, *prompt, *OK, "--output", tmp_path / "x.mp4", *extra]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input_fails_before_loading(case, hollow, inputs, tmp_path, monkeypatch):
    name, family, extra, needles = case
    monkeypatch.setattr("wan_runtime.checkpoint.restore", _no_restore)
    r = invoke("wan-run", *_args(family, extra, hollow, inputs, tmp_path))
    assert r.exception is None or isinstance(r.exception, SystemExit), repr(r.exception)
    assert_one_line_error("wan-run", r.exit_code, r.stderr, *needles)
    assert not (tmp_path / "x.mp4").exists()


def test_hollow_checkpoint_fails_at_loading_with_good_flags(hollow, tmp_path):
    """The control: with valid flags the hollow checkpoint gets as far as the weights, and fails there."""
    r = invoke("wan-run", "--checkpoint", hollow["wan2.1-t2v"], "--prompt", "a red fox", *OK,
               "--output", tmp_path / "x.mp4")
    assert_one_line_error("wan-run", r.exit_code, r.stderr, "cannot open", "the array is missing")


def test_real_process_one_line_and_debug(hollow, tmp_path):
    base = ["--checkpoint", hollow["wan2.1-t2v"], "--prompt", "a red fox", *OK, "--output", tmp_path / "x.mp4"]
    t0 = time.perf_counter()
    r = run_cli("wan-run", *base, "--frames", "8")
    seconds = time.perf_counter() - t0
    assert_one_line_error("wan-run", r.returncode, r.stderr, "--frames", "4k+1")
    print(f"a bad flag fails in {seconds:.2f} s, interpreter start-up included")
    assert seconds < 15, seconds
    r = run_cli("wan-run", *base, "--frames", "8", "--debug")
    assert r.returncode != 0 and "Traceback" in r.stderr and "InputError" in r.stderr
    r = run_cli("wan-run", *base, "--steps", "x")  # a click usage error: one line too, not click's block
    assert_one_line_error("wan-run", r.returncode, r.stderr, "--steps")


def test_unwritable_output_folder(hollow, tmp_path):
    """An output folder the user cannot write: a read-only folder (non-root), or a read-only filesystem
    (root, who may write anywhere else)."""
    target = tmp_path / "ro"
    args = ["--checkpoint", hollow["wan2.1-t2v"], "--prompt", "a red fox", *OK, "--output", target / "x.mp4"]
    if os.geteuid() != 0:
        target.mkdir()
        target.chmod(0o555)
        r = run_cli("wan-run", *args)
    elif PRIVATE_MOUNTS:
        r = run_cli("wan-run", *args, prefix=in_tmpfs(target, "ro,size=64k"))
    else:
        pytest.skip("root without private mounts: no folder is unwritable")
    assert_one_line_error("wan-run", r.returncode, r.stderr, "--output", str(target), "not writable")


def test_python_api_validates_before_generating(converted, inputs):
    """The API raises the same InputError before any compile or step (checks in WanPipeline.__call__)."""
    from wan_runtime.pipeline import InputError, WanPipeline

    pipe = WanPipeline.from_converted(converted["wan2.1-t2v"], dtype="float32")
    for kwargs, match in [(dict(num_frames=8), "--frames"), (dict(height=33), "--height"),
                          (dict(num_inference_steps=0), "--steps"), (dict(guidance_scale=float("nan")), "--guidance"),
                          (dict(image=str(inputs / "first.png")), "--image"),
                          (dict(guidance_scale_2=-1.0), "--guidance-2"), (dict(flow_shift=0.0), "--flow-shift"),
                          (dict(seed=2**32), "--seed"), (dict(seed=-1), "--seed")]:
        args = dict(height=16, width=16, num_frames=5, num_inference_steps=2) | kwargs
        with pytest.raises(InputError, match=match):
            pipe("a red fox", **args)
    with pytest.raises(InputError, match="--prompt"):
        pipe("   ", height=16, width=16, num_frames=5, num_inference_steps=2)
    assert pipe.compiled == (), "nothing was compiled"


def test_long_prompt_warns_before_loading(hollow, tmp_path):
    """The truncation warning comes before the load: on a checkpoint whose arrays are gone the run still
    fails (at the load), but the warning is already out."""
    long = " ".join(["a red fox runs through fresh snow"] * 120)
    r = run_cli("wan-run", "--checkpoint", hollow["wan2.1-t2v"], "--prompt", long, *OK, "--output", tmp_path / "x.mp4")
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and lines[0] == "wan-run: warning: --prompt is longer than 512 tokens; it is truncated", r.stderr
