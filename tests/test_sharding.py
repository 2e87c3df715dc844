"""Scale out on 8 simulated CPU devices: every mesh and context-attention mode gives the one-device result.

Models: tiny Wan 2.1 T2V and Wan 2.2 T2V A14B with 8 attention heads ("tiny8"), so Ulysses can split the
heads over up to 8 devices. float32 throughout; the tolerance covers float reassociation only (sums
split across devices and the ring's online softmax), orders of magnitude below any real error.
"""
import jax
import numpy as np
import pytest

import make_tiny_checkpoint as mtc
from wan_runtime import sharding as shd

W21, W22, TI2V = "wan2.1-t2v", "wan2.2-t2v-a14b", "wan2.2-ti2v-5b"
# (mesh, context attention mode, family)
MESHES = [
    ("data=2", "auto", W21),
    ("data=2", "auto", W22),
    ("fsdp=8", "allgather", W22),
    ("fsdp=8", "ring", W21),
    ("context=8", "allgather", W22),
    ("context=8", "ulysses", W21),
    ("context=8", "ulysses", W22),
    ("context=8", "ring", W22),
    ("context=4,tensor=2", "ulysses", W21),
    ("context=4,tensor=2", "ring", W22),
    ("data=2,fsdp=2,tensor=2", "auto", W21),
    ("context=4,tensor=2", "auto", TI2V),  # per-token timesteps: the modulation is split along the sequence too
]
TOL = 2e-5  # max abs error on flow predictions / frames of magnitude ~1


@pytest.fixture(scope="module")
def tiny8(tmp_path_factory):
    """Tiny8 Wan 2.1 T2V, Wan 2.2 T2V A14B and TI2V 5B repos, converted in float32 for 8 devices (fsdp=8)."""
    from wan_convert.convert import convert

    root = tmp_path_factory.mktemp("tiny8")
    out = {}
    for fam in (W21, W22, TI2V):
        src = mtc.write(fam, root / f"src-{fam}", seed=3, size="tiny8")
        out[fam] = convert(str(src), root / f"ck-{fam}", weights_dtype="float32", mesh="fsdp=8").output
    return out


def test_vae_decode_is_split_spatially(tiny8):
    """On 8 devices the VAE decode's activations are split along width: each device's working memory
    is a fraction of the one-device figure, and the convs exchange halos (collective-permute)."""
    import functools

    import jax.numpy as jnp

    from wan_runtime.pipeline import WanPipeline, _decode

    temp = {}
    for mesh in (None, "context=8"):
        pipe = WanPipeline.from_converted(tiny8[W21], mesh=mesh, dtype="float32", compilation_cache="off")
        z, stats = jnp.zeros((1, 16, 3, 16, 16)), jnp.zeros((1, 16, 1, 1, 1))
        fn = functools.partial(_decode, vcfg=pipe.vcfg, dtype=jnp.float32, as_uint8=True, layout=pipe.layout)
        compiled = jax.jit(fn).lower(pipe.params["vae"], z, stats, stats + 1).compile()
        temp[mesh] = compiled.memory_analysis().temp_size_in_bytes
        assert ("collective-permute" in compiled.as_text()) == (mesh is not None)
    assert temp["context=8"] < temp[None] / 3, temp


def test_activation_rules_and_mode_choice():
    from wan_runtime.models import context_parallel as cp

    mesh = shd.make_mesh(shd.parse_mesh("data=2,context=2,tensor=2"))
    layout = shd.Layout(mesh, "auto")
    assert layout.seq_axes == ("context",) and layout.seq_shards == 2
    assert tuple(layout.spec((2, 64, 96), ("batch", "seq", "act_embed"))) == ("data", "context", None)
    assert tuple(layout.spec((1, 64, 96), ("batch", "seq", "act_embed"))) == (None, "context", None)  # 1 row
    layout = shd.Layout(shd.make_mesh(shd.parse_mesh("fsdp=2,context=4")), "auto")
    assert layout.seq_axes == ("fsdp", "context") and layout.seq_shards == 8
    assert cp.choose_mode("auto", 8, 1, 8) == "ulysses" and cp.choose_mode("auto", 12, 1, 8) == "ring"
    with pytest.raises(ValueError, match="ulysses"):
        cp.choose_mode("ulysses", 2, 1, 8)
    assert not shd.Layout(None).active and shd.Layout(None).constrain("x", ()) == "x"


@pytest.mark.parametrize("mode", ["allgather", "ulysses", "ring"])
def test_context_attention_with_padding_mask(mode):
    """The three modes equal plain attention, with padded (masked) keys at the end of the sequence."""
    from wan_runtime.models import context_parallel as cp
    from wan_runtime.models.attention import attention

    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((2, 40, 8, 12), np.float32) for _ in range(3))
    mask = np.broadcast_to(np.arange(40) < 35, (2, 40))
    layout = shd.Layout(shd.make_mesh(shd.parse_mesh("data=2,context=4")), mode)
    ref = attention(q, k, v, key_mask=mask)
    out = jax.jit(lambda q, k, v, m: cp.self_attention(q, k, v, m, layout, mode))(q, k, v, mask)
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=2e-6, rtol=0)


@pytest.fixture(scope="module")
def single(tiny8):
    """One-device outputs of both models: a 3-step generation (float frames) and the latents."""
    from wan_runtime.pipeline import WanPipeline

    out = {}
    for fam, ck in tiny8.items():
        pipe = WanPipeline.from_converted(ck, dtype="float32", compilation_cache="off")
        out[fam] = _generate(pipe, fam)
    return out


def _generate(pipe, fam):
    from PIL import Image

    image = None
    if fam == TI2V:  # with an image: per-token timesteps (frame 0 at t = 0)
        image = Image.fromarray(np.random.default_rng(1).integers(0, 256, (64, 64, 3), np.uint8))
    frames = pipe("a red fox runs through fresh snow", "blurry", height=64, width=64, num_frames=5,
                  num_inference_steps=3, guidance_scale=4.0, guidance_scale_2=3.0, seed=0, output_type="np",
                  image=image)
    return frames, np.asarray(pipe.last_latents)


@pytest.mark.parametrize("mesh,mode,fam", MESHES, ids=[f"{f}-{m}-{a}" for m, a, f in MESHES])
def test_mesh_matches_one_device(tiny8, single, mesh, mode, fam):
    from wan_runtime.pipeline import WanPipeline

    pipe = WanPipeline.from_converted(tiny8[fam], mesh=mesh, dtype="float32", compilation_cache="off",
                                      context_attention=mode)
    n = shd.mesh_size(shd.parse_mesh(mesh))
    leaf = pipe.params["transformer"]["blocks"]["ffn"]["fc_in"]["weight"]
    assert len(leaf.sharding.device_set) == n
    frames, latents = _generate(pipe, fam)
    ref_frames, ref_latents = single[fam]
    np.testing.assert_allclose(latents, ref_latents, atol=TOL, rtol=0)
    np.testing.assert_allclose(frames, ref_frames, atol=TOL, rtol=0)


# ------------------------------------------------------------------------------ restore on any mesh
class FileOpens:
    """Which files under a folder get opened (Linux inotify, IN_OPEN): observes the real reads, whatever
    code does them, in this process or any other."""

    IN_OPEN = 0x20

    def __init__(self, root):
        import ctypes
        import os

        self.libc = ctypes.CDLL("libc.so.6", use_errno=True)
        self.fd = self.libc.inotify_init1(os.O_NONBLOCK)
        if self.fd < 0:
            pytest.skip("inotify unavailable")
        self.dirs = {}
        for d in [root, *[p for p in root.rglob("*") if p.is_dir()]]:
            wd = self.libc.inotify_add_watch(self.fd, str(d).encode(), self.IN_OPEN)
            if wd < 0:
                pytest.skip("inotify watch limit")
            self.dirs[wd] = d
        self.root = root

    def opened(self) -> list[str]:
        """Relative paths of the chunk files opened since the last call (one entry per open)."""
        import os
        import struct

        out = []
        while True:
            try:
                buf = os.read(self.fd, 1 << 20)
            except BlockingIOError:
                break
            i = 0
            while i < len(buf):
                wd, _, _, n = struct.unpack_from("iIII", buf, i)
                name = buf[i + 16:i + 16 + n].rstrip(b"\0").decode()
                i += 16 + n
                path = (self.dirs[wd] / name).relative_to(self.root)
                if "c" in path.parts and (self.root / path).is_file():
                    out.append(str(path))
        return out


def _leaf_arrays(params, prefix=""):
    out = {}
    for k, v in params.items():
        if isinstance(v, dict):
            out.update(_leaf_arrays(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = np.asarray(v)
    return out


def test_checkpoint_for_8_devices_restores_on_1_and_4(tiny8):
    from wan_runtime import checkpoint as ckpt_lib

    ck = ckpt_lib.open_checkpoint(tiny8["wan2.1-t2v"])
    full = _leaf_arrays(ckpt_lib.restore_component(ck, "transformer", shd.make_mesh(shd.parse_mesh("fsdp=8"))))
    for mesh in ("1", "fsdp=4", "tensor=4", "fsdp=2,tensor=2"):
        m = shd.make_mesh(shd.parse_mesh(mesh))
        params = ckpt_lib.restore_component(ck, "transformer", m)
        w = params["blocks"]["ffn"]["fc_in"]["weight"]
        assert len(w.sharding.device_set) == m.devices.size
        got = _leaf_arrays(params)
        assert got.keys() == full.keys()
        for k in full:
            np.testing.assert_array_equal(got[k], full[k], err_msg=f"{mesh}: {k}")


def test_matching_mesh_reads_each_chunk_once(tiny8):
    """Converted for fsdp=8, restored on fsdp=8: every chunk file is opened exactly once, so no device
    reads a chunk of another device's shard (each chunk lies inside one shard: test_convert checks)."""
    import collections

    from wan_runtime import checkpoint as ckpt_lib

    ck = ckpt_lib.open_checkpoint(tiny8["wan2.1-t2v"])
    watch = FileOpens(ck.root / "transformer")
    ckpt_lib.restore_component(ck, "transformer", shd.make_mesh(shd.parse_mesh("fsdp=8")))
    counts = collections.Counter(watch.opened())
    chunks = {str(p.relative_to(ck.root / "transformer")) for p in (ck.root / "transformer").rglob("c/**/*")
              if p.is_file()}
    assert set(counts) == chunks
    assert max(counts.values()) == 1, [k for k, n in counts.items() if n > 1][:5]
    sharded = [c for c in chunks if c.startswith("blocks.ffn.fc_in.weight/")]
    assert len(sharded) == 2 * 8  # 2 layers x 8 embed shards: the layout the restore relied on


# ------------------------------------------------------------------------------ multi-process
def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_match_one(tiny8, tmp_path):
    """wan-run as 2 processes x 4 CPU devices (jax.distributed, gloo) on mesh fsdp=2,context=4 gives the
    one-process video; each process reads only its half of the fsdp-sharded chunks (each process restores
    from its own copy of the checkpoint, as separate hosts would), and only process 0 writes."""
    import os
    import shutil
    import subprocess
    import sys

    ck = tiny8["wan2.1-t2v"]
    copies = [tmp_path / "host0", tmp_path / "host1"]
    for c in copies:
        shutil.copytree(ck, c)
    args = ["--prompt", "a red fox runs through fresh snow", "--negative-prompt", "blurry", "--height", "64",
            "--width", "64", "--frames", "5", "--steps", "3", "--guidance", "4.0", "--dtype", "float32",
            "--compile-cache", "off", "-q"]
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    cmd = [sys.executable, "-m", "wan_runtime.cli"]
    ref = tmp_path / "one.npy"
    subprocess.run([*cmd, "--checkpoint", str(ck), "--output", str(ref), *args], env=env, check=True,
                   capture_output=True, timeout=600)
    watches = [FileOpens(c / "transformer") for c in copies]
    out = tmp_path / "two.npy"
    port = _free_port()
    env4 = {**env, "XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
    procs = [subprocess.Popen([*cmd, "--checkpoint", str(copies[i]), "--output", str(out), "--mesh", "fsdp=2,context=4",
                               "--coordinator", f"127.0.0.1:{port}", "--num-processes", "2", "--process-id", str(i),
                               *args], env=env4, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(2)]
    results = [p.communicate(timeout=900) for p in procs]
    for p, (so, se) in zip(procs, results):
        assert p.returncode == 0, se[-3000:]
    assert "wrote" in results[0][0] and "wrote" not in results[1][0]
    np.testing.assert_allclose(np.load(out), np.load(ref), atol=TOL, rtol=0)
    opened = [set(w.opened()) for w in watches]
    fc_in = [{c for c in o if c.startswith("blocks.ffn.fc_in.weight/")} for o in opened]
    # fc_in weight (L, F, D): D ("embed") is split over fsdp=2; converted for fsdp=8, so 8 chunks along D
    assert fc_in[0] and fc_in[1] and not fc_in[0] & fc_in[1]
    assert {int(c.split("/")[-1]) for c in fc_in[0]} == {0, 1, 2, 3}
    assert {int(c.split("/")[-1]) for c in fc_in[1]} == {4, 5, 6, 7}


def test_padded_sequence_batch_of_one_and_step_caching(tiny8):
    """18 tokens on 8 sequence shards (padded to 24, padded keys masked), a batch of one (guidance 1:
    the data axis cannot split it) and the CFG cache (single-branch steps) give the one-device result."""
    from wan_runtime import caching
    from wan_runtime.pipeline import WanPipeline

    def gen(pipe, **kw):
        pipe("a fox", "blurry", height=48, width=48, num_frames=5, num_inference_steps=3, seed=0,
             output_type="np", **kw)
        return np.asarray(pipe.last_latents)

    cases = [dict(guidance_scale=4.0), dict(guidance_scale=1.0),
             dict(guidance_scale=4.0, cache=caching.CacheConfig(policy="cfg", cfg_interval=2))]
    one = WanPipeline.from_converted(tiny8[W21], dtype="float32", compilation_cache="off")
    ref = [gen(one, **c) for c in cases]
    pipe = WanPipeline.from_converted(tiny8[W21], mesh="data=2,context=4", dtype="float32", compilation_cache="off",
                                      context_attention="ring")
    for case, want in zip(cases, ref):
        np.testing.assert_allclose(gen(pipe, **case), want, atol=TOL, rtol=0, err_msg=str(case))
