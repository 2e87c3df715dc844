"""``wan-run``: generate a video from a converted checkpoint.

Every flag is checked before any weights load (``RunConfig``: defaults <- the checkpoint's own configs <-
the preset <- flags); bad input is one line naming the flag, exit code 2 (``--debug``: the traceback).
"""
from __future__ import annotations

import os
import pathlib
import sys
import time

import click

from . import __version__, errors
from .caching import POLICIES
from .format import WEIGHT_DTYPES as DTYPES
#: flags that are settings of the run (RunConfig fields and step-caching settings)
SETTINGS = ("height", "width", "frames", "steps", "guidance", "guidance_2", "flow_shift", "scheduler", "seed",
            "fps", "mesh", "negative_prompt", "cache", "cache_thresh", "cache_k", "cache_retention", "cache_model",
            "cache_calibration", "cfg_cache_interval", "cfg_cache_start", "teacache_thresh", "firstblock_thresh")


class UsageError(ValueError):
    pass


class _Option(click.Option):
    """An option that belongs to a group of ``wan-run --help``."""

    def __init__(self, *args, group: str = "other", **kwargs):
        super().__init__(*args, **kwargs)
        self.group = group


class _Command(errors.Command):
    """``--help`` lists the options by group, in the order the groups first appear."""

    def format_options(self, ctx, formatter):
        groups: dict[str, list] = {}
        for p in self.get_params(ctx):
            rec = p.get_help_record(ctx)
            if rec:
                groups.setdefault(getattr(p, "group", "Other"), []).append(rec)
        for name, rows in groups.items():
            with formatter.section(name):
                formatter.write_dl(rows)


def _opt(group: str, *decls, **kw):
    return click.option(*decls, cls=_Option, group=group, **kw)


_G, _I, _P, _C, _D, _O = "Generation", "Image and video inputs", "Precision", "Step caching", "Devices and compilation", "Output"
OPTIONS = [
    _opt(_G, "--checkpoint", required=True, type=click.Path(), help="a checkpoint written by wan-convert"),
    _opt(_G, "--prompt", default=None, help="required unless --plan"),
    _opt(_G, "--negative-prompt", default=None, help="default: the preset's, else Wan's standard negative prompt"),
    _opt(_G, "--preset", default=None, help="configs/ preset name or .toml path (default: matched to the checkpoint)"),
    _opt(_G, "--height", type=int, default=None), _opt(_G, "--width", type=int, default=None),
    _opt(_G, "--frames", type=int, default=None, help="number of frames, 4k+1"),
    _opt(_G, "--steps", type=int, default=None),
    _opt(_G, "--guidance", type=float, default=None, help="guidance scale (1.0 or less: no unconditional pass)"),
    _opt(_G, "--guidance-2", type=float, default=None, help="guidance of the low-noise expert (Wan 2.2 A14B)"),
    _opt(_G, "--flow-shift", type=float, default=None, help="default: the checkpoint's scheduler config"),
    _opt(_G, "--scheduler", type=click.Choice(["unipc", "euler", "euler-linear"]), default=None),
    _opt(_G, "--seed", type=click.IntRange(0, 2**32 - 1), default=0, show_default=True,
         help="0 .. 2**32-1 (the PRNG key takes 32 bits: larger seeds would repeat smaller ones)"),
    _opt(_G, "--lora", multiple=True, metavar="FILE[:STRENGTH]",
         help="a LoRA for the transformer (diffusers/PEFT, original Wan/ComfyUI or kohya keys), repeatable, "
              "applied in order; strength default 1"),
    _opt(_G, "--lora-2", multiple=True, metavar="FILE[:STRENGTH]",
         help="a LoRA for Wan 2.2 A14B's low-noise expert (transformer_2), repeatable"),
    _opt(_G, "--lora-ignore-unknown", is_flag=True, help="skip LoRA keys that name no Wan module (with a warning)"),
    _opt(_I, "--image", type=click.Path(), default=None, help="first frame for image-to-video (I2V, TI2V)"),
    _opt(_I, "--latents", type=click.Path(), default=None,
         help="initial latents .npy, (C, F', H', W') or (1, C, F', H', W')"),
    _opt(_P, "--dtype", type=click.Choice(DTYPES), default=None,
         help="every dtype at once, weights included (the scheduler stays float32); default: bfloat16 "
              "transformer and text encoder, float32 VAE, weights as converted on GPU/TPU; float32 on CPU"),
    _opt(_P, "--transformer-dtype", type=click.Choice(DTYPES), default=None, help="transformer compute dtype"),
    _opt(_P, "--text-encoder-dtype", type=click.Choice(DTYPES), default=None),
    _opt(_P, "--vae-dtype", type=click.Choice(DTYPES), default=None, help="VAE compute dtype"),
    _opt(_P, "--weights-dtype", type=click.Choice(DTYPES), default=None, help="recast transformer/encoder weights"),
    _opt(_P, "--vae-weights-dtype", type=click.Choice(DTYPES), default=None),
    _opt(_P, "--scheduler-dtype", type=click.Choice(DTYPES), default=None),
    _opt(_C, "--cache", type=click.Choice(list(POLICIES)), default=None,
         help="step caching policy (default: the preset's, else none)"),
    _opt(_C, "--cache-thresh", type=float, default=None, help="MagCache accumulated-error bound (default: the curve's)"),
    _opt(_C, "--cache-k", type=int, default=None, help="MagCache max consecutive skips"),
    _opt(_C, "--cache-retention", type=float, default=None, help="MagCache fraction of first steps always computed"),
    _opt(_C, "--cache-model", default=None, help="calibration key (default: the preset's published curve)"),
    _opt(_C, "--cache-calibration", type=click.Path(), default=None,
         help="calibration JSON (tools/calibrate_magcache.py)"),
    _opt(_C, "--cfg-cache-interval", type=int, default=None, help="CFG cache: a full step every N steps"),
    _opt(_C, "--cfg-cache-start", type=int, default=None, help="CFG cache: first step that may reuse"),
    _opt(_C, "--teacache-thresh", type=float, default=None, help="TeaCache accumulated-change bound (0.2)"),
    _opt(_C, "--firstblock-thresh", type=float, default=None, help="FirstBlockCache relative-change bound (0.05)"),
    _opt(_C, "--kv-cache/--no-kv-cache", default=True, show_default=True,
         help="compute every block's cross-attention K/V once per generation"),
    _opt(_D, "--mesh", default=None, help="e.g. data=1,fsdp=2,context=4 (default: one device)"),
    _opt(_D, "--context-attention", type=click.Choice(["auto", "allgather", "ulysses", "ring"]), default="auto",
         show_default=True, help="self-attention across the sequence shards (fsdp x context): auto = ulysses "
                                 "when the heads split evenly, else ring"),
    _opt(_D, "--coordinator", envvar="WAN_JAX_COORDINATOR", default=None,
         help="multi-process run: host:port of process 0 (or 'auto': TPU pod / SLURM / MPI detection)"),
    _opt(_D, "--num-processes", envvar="WAN_JAX_NUM_PROCESSES", type=int, default=None),
    _opt(_D, "--process-id", envvar="WAN_JAX_PROCESS_ID", type=int, default=None),
    _opt(_D, "--local-device-ids", envvar="WAN_JAX_LOCAL_DEVICE_IDS", default=None,
         help="multi-process run: this process's devices on its host, e.g. 0,1 (several processes per GPU host)"),
    _opt(_P, "--quantize", type=click.Choice(["float8_e4m3fn", "int8"]), default=None,
         help="quantize the transformer blocks' weights at load (per-channel scales; a checkpoint converted with "
              "wan-convert --dtype float8_e4m3fn|int8 needs none)"),
    _opt(_P, "--fp8-matmul", is_flag=True, help="fp8 x fp8 block matmuls with per-token activation scales "
         "(float8_e4m3fn weights; GPUs of compute capability >= 8.9 only)"),
    _opt(_P, "--vae-precision", type=click.Choice(["default", "highest"]), default=None,
         help="float32 VAE convs: default (TF32 on GPUs) or highest (full float32); default: default on GPU, "
              "highest elsewhere"),
    _opt(_D, "--offload", type=click.Choice(["auto", "none", "encoders", "experts", "all"]), default="auto",
         show_default=True, help="weights kept in host memory between their uses: the text/image encoders after "
         "the conditioning, the inactive Wan 2.2 expert; auto = what the device's memory needs (none on CPU)"),
    _opt(_D, "--vae-chunk", type=click.IntRange(1, 64), default=1, show_default=True,
         help="latent frames per VAE decode scan step"),
    _opt(_D, "--compile-cache", default=None, help="persistent compilation cache folder, or 'off' "
         "(default ~/.cache/wan-jax/xla or $WAN_JAX_COMPILATION_CACHE)"),
    _opt(_D, "--executable-cache", is_flag=True, help="also keep serialized executables (skips tracing; "
         "experimental, see compile_cache.py)"),
    _opt(_O, "--output", "-o", default="out.mp4", show_default=True,
         help="out.mp4, or out.npy for float32 frames in [0, 1]"),
    _opt(_O, "--fps", type=int, default=None),
    _opt(_O, "--plan", is_flag=True, help="print the per-device memory of this generation (weights, K/V cache, "
         "each stage from XLA's memory analysis) and whether it fits; loads no weights, runs on CPU for any size"),
    _opt(_O, "--device-memory", default=None, help="--plan: the device memory to fit, e.g. 80GiB (default: this "
         "device's)"),
    _opt(_O, "--quiet", "-q", is_flag=True, help="no progress bar"),
    _opt(_O, "--debug", is_flag=True, help="show tracebacks"),
]


def _options(fn):
    for option in reversed(OPTIONS):
        fn = option(fn)
    return fn


@click.command(cls=_Command, prog="wan-run", context_settings={"help_option_names": ["-h", "--help"]})
@_options
@click.version_option(__version__, prog_name="wan-run")
def main(**flags):
    """Generate a video from a converted Wan checkpoint."""
    try:
        run(flags)
    except KeyboardInterrupt:
        click.echo("wan-run: interrupted", err=True)
        sys.exit(130)
    except Exception as e:  # noqa: BLE001 - user-facing errors are one line; --debug shows the traceback
        if flags["debug"] or not _is_user_error(e):
            raise
        errors.report("wan-run", e, flags["debug"])


def _is_user_error(e: BaseException) -> bool:
    from .checkpoint import CheckpointError
    from .distributed import DistributedError
    from .format import FormatError
    from .lora import LoraError
    from .presets import PresetError
    from .runconfig import InputError
    from .sharding import MeshError

    return isinstance(e, (UsageError, CheckpointError, FormatError, InputError, PresetError, MeshError, DistributedError,
                          LoraError, OSError))


def run(flags: dict) -> None:
    """Check everything that can be checked, then load, generate and write."""
    from . import distributed
    from .checkpoint import open_checkpoint
    from .pipeline import WanPipeline

    if flags["plan"]:
        return print_plan(flags)
    out = _output(flags["output"])
    if not (flags["prompt"] or "").strip():
        raise UsageError("--prompt: missing or empty")
    ckpt = open_checkpoint(flags["checkpoint"])
    image, init = _image(flags["image"]), _latents(flags["latents"])
    config = _config(ckpt, flags, image is not None)
    if init is not None:
        config.check_latents(ckpt, init.shape)
    _warn_truncation(ckpt, flags["prompt"], config)
    loras = _loras(ckpt, flags)
    for note in config.notes():
        click.echo(f"wan-run: note: {note}", err=True)
    distributed.initialize(flags["coordinator"], flags["num_processes"], flags["process_id"],
                           flags["local_device_ids"])  # before any other JAX call
    if flags["fp8_matmul"]:
        from .models.layers import fp8_matmul_support

        if fp8_matmul_support():
            raise UsageError(f"--fp8-matmul: {fp8_matmul_support()}")
    pipe = WanPipeline.from_converted(
        ckpt.root, mesh=config.mesh, dtype=_dtypes(flags), compilation_cache=flags["compile_cache"],
        executable_cache=flags["executable_cache"] or None, context_attention=flags["context_attention"],
        kv_cache=flags["kv_cache"], vae_chunk=flags["vae_chunk"], vae_precision=flags["vae_precision"],
        preset=config.preset, offload=flags["offload"], quantize=flags["quantize"], fp8_matmul=flags["fp8_matmul"])
    pipe.set_loras(*loras)
    bar = _progress_bar(config.steps, flags["quiet"])
    gen = pipe.generate(flags["prompt"], config, image=image, latents=init,
                        output_type="np" if out.suffix == ".npy" else "uint8",
                        progress=(lambda i: bar.update(1)) if bar is not None else None)
    if bar is not None:
        bar.close()
    for w in gen.warnings:
        click.echo(f"wan-run: warning: {w}", err=True)
    if gen.block_runs is not None:
        click.echo(f"cache {config.cache.name}: ran the blocks {int(gen.block_runs.sum())} of "
                   f"{config.steps * len(gen.block_runs)} times")
    if distributed.is_main():  # every process computed; process 0 writes
        _write(out, gen, flags, ckpt, pipe)


def print_plan(flags: dict) -> None:
    """``--plan``: the memory plan of the generation the other flags describe (plan.py)."""
    from . import distributed
    from .checkpoint import open_checkpoint
    from .pipeline import enable_compilation_cache
    from .plan import parse_bytes, plan

    try:
        limit = parse_bytes(flags["device_memory"]) if flags["device_memory"] else None
    except ValueError:
        raise UsageError(f"--device-memory: {flags['device_memory']!r} is not a size such as 80GiB") from None
    ckpt = open_checkpoint(flags["checkpoint"])
    config = _config(ckpt, flags, flags["image"] is not None)
    distributed.initialize(flags["coordinator"], flags["num_processes"], flags["process_id"],
                           flags["local_device_ids"])
    enable_compilation_cache(flags["compile_cache"])
    result = plan(ckpt, config, dtypes=_dtypes(flags), image=flags["image"] is not None, device_memory_bytes=limit,
                  context_attention=flags["context_attention"], kv_cache=flags["kv_cache"],
                  vae_chunk=flags["vae_chunk"], vae_precision=flags["vae_precision"], preset=config.preset,
                  offload=flags["offload"], quantize=flags["quantize"])
    click.echo(f"{ckpt.root.name}: {config.height}x{config.width}, {config.frames} frames, "
               f"mesh {config.mesh or '1 device'}")
    click.echo(result.render())


def _loras(ckpt, flags: dict) -> tuple[tuple, tuple]:
    """The --lora / --lora-2 files read and checked against the checkpoint's transformer shapes (before any
    weights load); skipped unknown keys are one warning line each file."""
    from . import lora as lora_lib
    from .families import get
    from .format import flatten

    experts = [c for c in get(ckpt.family).expert_names if c in ckpt.components]
    if flags["lora_2"] and len(experts) < 2:
        raise UsageError("--lora-2: this checkpoint has one transformer (--lora-2 is for Wan 2.2 A14B)")
    out = []
    for flag, component in (("--lora", experts[0]), ("--lora-2", experts[-1])):
        specs = flags[flag[2:].replace("-", "_")]
        read = [lora_lib.read(*lora_lib.parse_spec(s, flag), ignore_unknown=flags["lora_ignore_unknown"])
                for s in specs]
        lora_lib.check(read, flatten(ckpt.abstract_tree(component)), component)
        for lo in read:
            if lo.skipped:
                click.echo(f"wan-run: warning: {lo.file}: skipped {len(lo.skipped)} unknown keys: "
                           f"{', '.join(lo.skipped[:5])}{' ...' if len(lo.skipped) > 5 else ''}", err=True)
        out.append(tuple(read))
    return out[0], out[1]


def _output(output: str) -> pathlib.Path:
    out = pathlib.Path(output)
    if out.suffix not in (".mp4", ".npy"):
        raise UsageError(f"--output: {output} must end in .mp4 or .npy")
    out_dir = out.parent if str(out.parent) else pathlib.Path(".")
    if not out_dir.is_dir() or not os.access(out_dir, os.W_OK):
        raise UsageError(f"--output: folder {out_dir} does not exist or is not writable")
    for path in (out, out.with_suffix(".json")):
        if path.is_dir():
            raise UsageError(f"--output: {path} is a folder")
    return out


def _config(ckpt, flags: dict, image: bool):
    from .runconfig import DEFAULT_NEGATIVE, RunConfig
    from .sharding import parse_mesh

    settings = {k: flags.get(k) for k in SETTINGS}
    config = RunConfig.resolve(ckpt, flags["preset"] or "auto", image=image,
                               defaults={"negative_prompt": DEFAULT_NEGATIVE}, **settings)
    parse_mesh(config.mesh)  # the device count is checked once JAX is up, still before any weights load
    return config


def _dtypes(flags: dict):
    from .runconfig import Dtypes

    per = ("transformer", "text_encoder", "vae", "weights", "vae_weights", "scheduler")
    base = Dtypes.all(flags["dtype"]) if flags["dtype"] else Dtypes.of(None)  # --dtype: every dtype, weights too
    return Dtypes.of(base, **{k: flags[f"{k}_dtype"] for k in per})


def _image(path):
    if path is None:
        return None
    from .image import load_image

    try:
        return load_image(path)
    except ValueError as e:
        raise UsageError(f"--image: {e}") from None


def _latents(path):
    if path is None:
        return None
    import numpy as np

    try:
        return np.load(path)
    except (OSError, ValueError, EOFError) as e:
        raise UsageError(f"--latents: cannot read {path} ({errors.one_line(e)})") from None


def _warn_truncation(ckpt, prompt: str, config) -> None:
    """Long prompts are truncated, as diffusers does: say so now, not after the load and the generation."""
    from .text import Tokenizer, tokenize_prompts

    tok = Tokenizer.from_file(ckpt.root / "tokenizer" / "tokenizer.json")
    _, _, truncated = tokenize_prompts(tok, [prompt, config.negative_prompt], config.max_sequence_length)
    for flag, cut in zip(("--prompt", "--negative-prompt"), truncated):
        if cut:
            click.echo(f"wan-run: warning: {flag} is longer than {config.max_sequence_length} tokens; it is "
                       "truncated", err=True)


def _progress_bar(steps: int, quiet: bool):
    if quiet or not sys.stderr.isatty():
        return None
    from tqdm import tqdm

    return tqdm(total=steps, desc="denoise", unit="step", leave=False)


def _write(out: pathlib.Path, gen, flags: dict, ckpt, pipe) -> None:
    """The video (or .npy frames) and the sidecar JSON: prompt, model, every resolved setting, timings."""
    import dataclasses

    from .video import write_mp4, write_npy, write_sidecar

    t0 = time.perf_counter()
    if out.suffix == ".npy":
        write_npy(out, gen.frames)
    else:
        write_mp4(out, gen.frames, fps=gen.config.fps)
    write_seconds = time.perf_counter() - t0
    record = {
        "prompt": flags["prompt"], "negative_prompt": gen.config.negative_prompt, "seed": gen.config.seed,
        "model": {"checkpoint": str(ckpt.root.resolve()), "family": ckpt.family,
                  "source": ckpt.manifest.get("source", {}).get("id")},
        "preset": gen.config.preset,
        "settings": gen.config.record() | {
            "dtypes": dataclasses.asdict(pipe.dtypes), "offload": pipe.offload, "quantize": flags["quantize"],
            "weights": pipe.ckpt.manifest["dtype_policy"]["weights"], "fp8_matmul": pipe.fp8_matmul,
            "loras": {c: [lo.record() for lo in los] for c, los in pipe.loras.items() if los},
            "kv_cache": pipe.kv_cache, "vae_chunk": pipe.vae_chunk,
            "vae_precision": pipe.vae_precision,
            "block_runs": None if gen.block_runs is None else gen.block_runs.tolist(),
            "latents": flags["latents"], "image": flags["image"]},
        "devices": _devices(),
        "timings": gen.timings.as_dict() | {"write": round(write_seconds, 4)},
        "wan_run": __version__,
    }
    write_sidecar(out, record)
    d = record["devices"]
    click.echo(f"devices: {d['count']} x {d['kind']} ({d['backend']}, {d['processes']} process(es))")
    click.echo(gen.timings.summary())
    click.echo(f"wrote {out} ({gen.frames.shape[0]} frames, {gen.frames.shape[2]}x{gen.frames.shape[1]}) "
               f"and {out.with_suffix('.json')}")


def _devices() -> dict:
    """The backend, device kind and count the run used (recorded in the sidecar, printed at the end)."""
    import jax

    devices = jax.devices()
    return {"backend": jax.default_backend(), "kind": devices[0].device_kind, "count": len(devices),
            "processes": jax.process_count(), "jax": jax.__version__}


if __name__ == "__main__":
    main()
