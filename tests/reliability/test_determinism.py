"""The same inputs and seed give identical output bytes run after run (separate wan-run processes), and
a prompt over 512 tokens is truncated with a warning.

The first process compiles into a fresh persistent compilation cache and the others load from it, so
this also shows that a cached executable computes the same bits as a fresh compile. The mp4 is compared
byte for byte: imageio-ffmpeg's libx264 at fixed settings is deterministic."""
import json

import numpy as np

from tests.reliability.conftest import run_cli

LONG = " ".join(["a red fox runs through fresh snow"] * 120)  # far more than 512 tokens


def test_same_seed_same_bytes(converted, tmp_path):
    cache = tmp_path / "xla-cache"

    def run(name, seed, prompt=LONG):
        out = tmp_path / name
        r = run_cli("wan-run", "--checkpoint", converted["wan2.1-t2v"], "--prompt", prompt, "--height", "16",
                    "--width", "16", "--frames", "5", "--steps", "2", "--seed", seed, "--compile-cache", cache,
                    "--output", out, "-q")
        assert r.returncode == 0, r.stderr
        return out, r

    a, ra = run("a.npy", 7)
    b, rb = run("b.npy", 7)
    for r in (ra, rb):
        warn = [l for l in r.stderr.splitlines() if "warning" in l]
        assert warn == ["wan-run: warning: --prompt is longer than 512 tokens; it is truncated"], r.stderr
    assert a.read_bytes() == b.read_bytes()
    side_a, side_b = (json.loads(p.with_suffix(".json").read_text()) for p in (a, b))
    assert {k: v for k, v in side_a.items() if k != "timings"} == {k: v for k, v in side_b.items() if k != "timings"}
    c, _ = run("c.mp4", 7)
    d, _ = run("d.mp4", 7)
    assert c.read_bytes() == d.read_bytes() and c.stat().st_size > 0
    e, re = run("e.npy", 8, prompt="a red fox")  # the control: another seed (and a short prompt) differs
    assert "warning" not in re.stderr
    assert not np.array_equal(np.load(a), np.load(e))
