"""tools/gpu_check.py --smoke: every phase of the real-hardware check runs at tiny shapes on CPU, each in its
own process, and lands in the JSON report (so the script cannot rot while no accelerator is at hand)."""
import json
import math
import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
PHASES = ("env", "attention", "step13b", "step14b", "fp8", "vae", "restore")


def test_gpu_check_smoke(tmp_path):
    out = tmp_path / "gpu_check.json"
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}  # one plain CPU device
    r = subprocess.run([sys.executable, str(ROOT / "tools" / "gpu_check.py"), "--smoke", "--out", str(out)],
                       env=env, capture_output=True, text=True, timeout=300)
    assert out.is_file(), r.stderr[-2000:]
    report = json.loads(out.read_text())
    phases = report["phases"]
    assert tuple(phases) == PHASES
    failed = {n: p.get("error_tail") for n, p in phases.items() if not p.get("ok")}
    assert not failed and report["ok"] and r.returncode == 0, failed or r.stderr[-2000:]
    assert all(p["summary"] and p["seconds"] > 0 for p in phases.values())

    assert phases["env"]["backend"] == "cpu" and phases["env"]["mem_fraction"] == "0.95"
    att = phases["attention"]
    assert att["cases"] and att["throughput"]
    for case in att["cases"].values():
        assert case["impl"] == "blocked" and not case["cudnn_in_hlo"]
        for e in (case["err_selected"], case["err_blocked"]):
            assert math.isfinite(e) and 0 <= e <= att["bound"] <= 1e-2
    assert any(c["real_keys"] for c in att["cases"].values())  # the key-masked (padded) case ran
    for p in att["throughput"].values():
        assert p["tflops"] > 0 and p["padded"] % att["multiple"] == 0

    fp8 = phases["fp8"]["runs"]  # weight-only e4m3 against bf16 weights; fp8 x fp8 has no CPU kernel: skipped
    assert fp8["bf16"]["rel_err_vs_bf16"] == 0 and 0 < fp8["e4m3"]["rel_err_vs_bf16"] < 5e-2
    assert fp8["e4m3"]["param_bytes"] < 0.75 * fp8["bf16"]["param_bytes"]
    assert "skipped" in fp8["e4m3+fp8_matmul"]
    for name, want in (("step13b", {"480p"}), ("step14b", {"480p", "720p"})):
        runs = phases[name]["runs"]
        assert set(runs) == want
        for run in runs.values():
            assert run["finite"] and run["step_s"] > 0 and run["flops_source"] == "analytic"
            assert 0 < run["mfu"] < 1
            # XLA's count of one block (no cuDNN call and no loop at these sizes) agrees with the analytic
            # matmul count, plus XLA's elementwise ops
            assert 1.0 <= run["xla_vs_analytic_block"] < 1.3
    assert phases["vae"]["finite"] and len(phases["vae"]["video"]) == 5
    assert phases["restore"]["bitwise_equal"] and all(v > 0 for v in phases["restore"]["gb_per_s"].values())
