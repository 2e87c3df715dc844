"""The runtime stays lean: a whole generation imports none of the converter-side stacks."""
import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
HEAVY = ("torch", "transformers", "diffusers", "safetensors", "huggingface_hub", "wan_convert", "orbax")


def test_generation_imports_nothing_heavy(tmp_path):
    from wan_convert.convert import convert

    ck = convert(str(ROOT / "assets" / "tiny-wan2.1-t2v"), tmp_path / "ck").output
    code = f"""
import sys
from wan_runtime.pipeline import WanPipeline
from wan_runtime.video import write_mp4
pipe = WanPipeline.from_converted({str(ck)!r})
frames = pipe("a fox", height=32, width=32, num_frames=5, num_inference_steps=2, output_type="uint8").frames
write_mp4({str(tmp_path / "x.mp4")!r}, frames, fps=8)
print("loaded:" + ",".join(sorted(m for m in {HEAVY!r} if m in sys.modules)))
"""
    env = {**os.environ, "PYTHONPATH": str(ROOT / "runtime")}  # the converter is not even importable
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    loaded = r.stdout.rstrip("\n").split("\n")[-1]
    assert loaded == "loaded:", f"heavy modules imported: {loaded}"
    assert (tmp_path / "x.mp4").stat().st_size > 0
