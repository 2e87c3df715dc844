"""``wan-run``: generate a video from a converted checkpoint."""
from __future__ import annotations

import os
import pathlib
import sys
import time

import click

from . import __version__, errors


DTYPES = ["bfloat16", "float32", "float16"]


class UsageError(ValueError):
    pass


def _fail(debug: bool, e: BaseException):
    errors.report("wan-run", e, debug)


@click.command(cls=errors.Command, prog="wan-run", context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--checkpoint", required=True, type=click.Path(), help="a checkpoint written by wan-convert")
@click.option("--preset", default=None, help="configs/ preset name or .toml path (default: matched to the checkpoint)")
@click.option("--prompt", required=True)
@click.option("--negative-prompt", default=None, help="default: the preset's, else Wan's standard negative prompt")
@click.option("--height", type=int, default=None)
@click.option("--width", type=int, default=None)
@click.option("--frames", type=int, default=None, help="number of frames, 4k+1")
@click.option("--steps", type=int, default=None)
@click.option("--guidance", type=float, default=None, help="guidance scale (1.0 or less: no unconditional pass)")
@click.option("--guidance-2", type=float, default=None, help="guidance of the low-noise expert (Wan 2.2 A14B)")
@click.option("--flow-shift", type=float, default=None)
@click.option("--scheduler", type=click.Choice(["unipc", "euler"]), default=None)
@click.option("--seed", type=click.IntRange(0, 2**32 - 1), default=0, show_default=True,
              help="0 .. 2**32-1 (the PRNG key takes 32 bits: larger seeds would repeat smaller ones)")
@click.option("--dtype", type=click.Choice(DTYPES), default=None,
              help="every dtype at once, weights included (the scheduler stays float32); default: bfloat16 "
                   "transformer and text encoder, float32 VAE, weights as converted")
@click.option("--transformer-dtype", type=click.Choice(DTYPES), default=None, help="transformer compute dtype")
@click.option("--text-encoder-dtype", type=click.Choice(DTYPES), default=None)
@click.option("--vae-dtype", type=click.Choice(DTYPES), default=None, help="VAE compute dtype")
@click.option("--weights-dtype", type=click.Choice(DTYPES), default=None, help="recast transformer/encoder weights")
@click.option("--vae-weights-dtype", type=click.Choice(DTYPES), default=None)
@click.option("--scheduler-dtype", type=click.Choice(DTYPES), default=None)
@click.option("--vae-chunk", type=click.IntRange(1, 64), default=1, show_default=True,
              help="latent frames per VAE decode scan step")
@click.option("--kv-cache/--no-kv-cache", default=True, show_default=True,
              help="compute every block's cross-attention K/V once per generation")
@click.option("--executable-cache", is_flag=True, help="also keep serialized executables (skips tracing; "
              "experimental, see compile_cache.py)")
@click.option("--compile-cache", default=None, help="persistent compilation cache folder, or 'off' "
              "(default ~/.cache/wan-jax/xla or $WAN_JAX_COMPILATION_CACHE)")
@click.option("--mesh", default=None, help="e.g. data=1,fsdp=2,context=4 (default: one device)")
@click.option("--context-attention", type=click.Choice(["auto", "allgather", "ulysses", "ring"]), default="auto",
              show_default=True, help="self-attention across the sequence shards (fsdp x context): auto = "
              "ulysses when the heads split evenly, else ring")
@click.option("--coordinator", envvar="WAN_JAX_COORDINATOR", default=None,
              help="multi-process run: host:port of process 0 (or 'auto': TPU pod / SLURM / MPI detection)")
@click.option("--num-processes", envvar="WAN_JAX_NUM_PROCESSES", type=int, default=None)
@click.option("--process-id", envvar="WAN_JAX_PROCESS_ID", type=int, default=None)
@click.option("--fps", type=int, default=None)
@click.option("--cache", "cache_policy", type=click.Choice(["none", "magcache", "cfg", "teacache", "firstblock"]),
              default=None, help="step caching policy (default: the preset's, else none)")
@click.option("--teacache-thresh", type=float, default=None, help="TeaCache accumulated-change bound (0.2)")
@click.option("--firstblock-thresh", type=float, default=None, help="FirstBlockCache relative-change bound (0.05)")
@click.option("--cache-thresh", type=float, default=None, help="MagCache accumulated-error bound (default: the curve's)")
@click.option("--cache-k", type=int, default=None, help="MagCache max consecutive skips")
@click.option("--cache-retention", type=float, default=None, help="MagCache fraction of first steps always computed")
@click.option("--cache-model", default=None, help="MagCache curve key (default: the preset's published curve)")
@click.option("--cache-calibration", type=click.Path(), default=None, help="calibration JSON (tools/calibrate_magcache.py)")
@click.option("--cfg-cache-interval", type=int, default=None, help="CFG cache: a full step every N steps")
@click.option("--cfg-cache-start", type=int, default=None, help="CFG cache: first step that may reuse")
@click.option("--image", type=click.Path(), default=None, help="first frame for image-to-video (I2V, TI2V)")
@click.option("--latents", type=click.Path(), default=None, help="initial latents .npy, (C, F', H', W') or (1, C, F', H', W')")
@click.option("--output", "-o", default="out.mp4", show_default=True, help="out.mp4, or out.npy for float32 frames in [0, 1]")
@click.option("--quiet", "-q", is_flag=True, help="no progress bar")
@click.option("--debug", is_flag=True, help="show tracebacks")
@click.version_option(__version__, prog_name="wan-run")
def main(checkpoint, preset, prompt, negative_prompt, height, width, frames, steps, guidance, guidance_2, flow_shift,
         scheduler, seed, dtype, transformer_dtype, text_encoder_dtype, vae_dtype, weights_dtype,
         vae_weights_dtype, scheduler_dtype, vae_chunk, kv_cache, executable_cache, compile_cache, mesh,
         context_attention, coordinator, num_processes, process_id, fps, cache_policy,
         teacache_thresh, firstblock_thresh, cache_thresh, cache_k, cache_retention, cache_model, cache_calibration, cfg_cache_interval, cfg_cache_start, image, latents, output, quiet, debug):
    """Generate a video from a converted Wan checkpoint."""
    try:
        run(**locals())
    except KeyboardInterrupt:
        click.echo("wan-run: interrupted", err=True)
        sys.exit(130)
    except Exception as e:  # noqa: BLE001 - user-facing errors are one line; --debug shows the traceback
        if debug or not _is_user_error(e):
            raise
        _fail(debug, e)


def _is_user_error(e: BaseException) -> bool:
    from .checkpoint import CheckpointError
    from .format import FormatError
    from .distributed import DistributedError
    from .pipeline import InputError
    from .presets import PresetError
    from .sharding import MeshError

    return isinstance(e, (UsageError, CheckpointError, FormatError, InputError, PresetError, MeshError, DistributedError,
                          OSError))


def run(checkpoint, preset, prompt, negative_prompt, height, width, frames, steps, guidance, guidance_2, flow_shift,
        scheduler, seed, dtype, transformer_dtype, text_encoder_dtype, vae_dtype, weights_dtype, vae_weights_dtype,
        scheduler_dtype, vae_chunk, kv_cache, executable_cache, compile_cache, mesh, context_attention, coordinator,
        num_processes, process_id, fps, cache_policy, teacache_thresh, firstblock_thresh,
        cache_thresh, cache_k,
        cache_retention, cache_model, cache_calibration, cfg_cache_interval, cfg_cache_start, image, latents, output,
        quiet, debug):
    import numpy as np

    from . import presets as presets_lib
    from .checkpoint import open_checkpoint
    from .pipeline import DEFAULT_NEGATIVE, check_image_input, image_input_kind, validate_request

    # ---- everything that can be checked before loading weights
    out = pathlib.Path(output)
    if out.suffix not in (".mp4", ".npy"):
        raise UsageError(f"--output: {output} must end in .mp4 or .npy")
    out_dir = out.parent if str(out.parent) else pathlib.Path(".")
    if not out_dir.is_dir() or not os.access(out_dir, os.W_OK):
        raise UsageError(f"--output: folder {out_dir} does not exist or is not writable")
    for path in (out, out.with_suffix(".json")):
        if path.is_dir():
            raise UsageError(f"--output: {path} is a folder")
    if not prompt.strip():
        raise UsageError("--prompt: empty prompt")
    ckpt = open_checkpoint(checkpoint)
    p = presets_lib.load(preset) if preset else presets_lib.for_checkpoint(ckpt.family, ckpt.config("transformer"))
    presets_lib.check_family(p, ckpt.family)
    over = dict(height=height, width=width, frames=frames, steps=steps, guidance=guidance, guidance_2=guidance_2,
                flow_shift=flow_shift, scheduler=scheduler, fps=fps, mesh=mesh)
    s = {**{"scheduler": "unipc", "fps": 16, "guidance": 5.0, "max_sequence_length": 512}, **p,
         **{k: v for k, v in over.items() if v is not None}}
    for key in ("height", "width", "frames", "steps"):
        if key not in s:
            raise UsageError(f"--{key}: not set and preset {p['name']} has no default")
    if negative_prompt is None:
        negative_prompt = s.get("negative_prompt", DEFAULT_NEGATIVE)
    if s["fps"] < 1:
        raise UsageError(f"--fps: must be >= 1, got {s['fps']}")
    from .sharding import parse_mesh

    parse_mesh(s.get("mesh"))  # the device count is checked once JAX is up, still before any weights load
    if s["max_sequence_length"] < 1:
        raise UsageError(f"--preset: max_sequence_length must be >= 1, got {s['max_sequence_length']}")
    init = None
    if latents is not None:
        try:
            init = np.load(latents)
        except (OSError, ValueError, EOFError) as e:
            raise UsageError(f"--latents: cannot read {latents} ({errors.one_line(e)})") from None
    validate_request(ckpt, s["height"], s["width"], s["frames"], s["steps"], s["guidance"], s.get("guidance_2"),
                     s.get("flow_shift"), None if init is None else init.shape)
    check_image_input(image_input_kind(ckpt), ckpt.family, image is not None)
    from . import caching

    cache_settings = {"cache": cache_policy or s.get("cache"), "cache_thresh": cache_thresh, "cache_k": cache_k,
                      "cache_retention": cache_retention, "cfg_cache_interval": cfg_cache_interval,
                      "cfg_cache_start": cfg_cache_start, "cache_calibration": cache_calibration,
                      "teacache_thresh": teacache_thresh, "firstblock_thresh": firstblock_thresh,
                      "cache_model": cache_model}
    policy = cache_settings["cache"] or "none"
    if cache_model is None and policy == "magcache":
        cache_settings["cache_model"] = caching.model_key_for_preset(p["name"], image is not None)
    elif cache_model is None and policy == "teacache":
        cache_settings["cache_model"] = caching.TEACACHE_MODELS.get(p["name"])
    if policy in ("magcache", "teacache"):
        try:
            caching.load_calibration(cache_settings["cache_calibration"])
        except (OSError, ValueError) as e:
            raise UsageError(f"--cache-calibration: {errors.one_line(e)}") from None
    try:
        cache_cfg = caching.CacheConfig.from_preset(cache_settings)
        if cache_cfg.policy in ("magcache", "teacache") and cache_cfg.model is None:
            raise ValueError(f"--cache-model: preset {p['name']} has no published {cache_cfg.policy} calibration; "
                             "pass --cache-model (and --cache-calibration, see tools/calibrate_magcache.py)")
        if cache_cfg.policy == "magcache":
            caching.model_entry(caching.load_calibration(cache_cfg.calibration), cache_cfg.model)
        if cache_cfg.policy == "teacache":
            caching.teacache_coefficients(caching.load_calibration(cache_cfg.calibration), cache_cfg.model)
    except (ValueError, OSError) as e:
        raise UsageError(str(e)) from None
    img = None
    if image is not None:
        from .image import load_image

        try:
            img = load_image(image)
        except ValueError as e:
            raise UsageError(f"--image: {e}") from None
    # long prompts are truncated, as diffusers does: say so now, not after the load and the generation
    from .text import Tokenizer, tokenize_prompts

    tok = Tokenizer.from_file(ckpt.root / "tokenizer" / "tokenizer.json")
    _, _, truncated = tokenize_prompts(tok, [prompt, negative_prompt], s["max_sequence_length"])
    for flag, cut in zip(("--prompt", "--negative-prompt"), truncated):
        if cut:
            click.echo(f"wan-run: warning: {flag} is longer than {s['max_sequence_length']} tokens; it is truncated",
                       err=True)

    # ---- load, generate
    import dataclasses

    from .pipeline import Dtypes, WanPipeline
    from .video import write_mp4, write_npy, write_sidecar

    dtypes = Dtypes.all(dtype) if dtype else Dtypes()
    per = dict(transformer=transformer_dtype, text_encoder=text_encoder_dtype, vae=vae_dtype, weights=weights_dtype,
               vae_weights=vae_weights_dtype, scheduler=scheduler_dtype)
    dtypes = dataclasses.replace(dtypes, **{k: v for k, v in per.items() if v})
    from . import distributed

    distributed.initialize(coordinator, num_processes, process_id)  # before any other JAX call
    pipe = WanPipeline.from_converted(checkpoint, mesh=s.get("mesh"), dtype=dtypes, compilation_cache=compile_cache,
                                      executable_cache=executable_cache or None, context_attention=context_attention)
    pipe.kv_cache = kv_cache
    pipe.vae_chunk = vae_chunk
    if "boundary" in s:
        pipe.boundary_ratio = s["boundary"]
    bar = None
    if not quiet and sys.stderr.isatty():
        from tqdm import tqdm

        bar = tqdm(total=s["steps"], desc="denoise", unit="step", leave=False)
    progress = (lambda i: bar.update(1)) if bar is not None else None
    frames_out = pipe(prompt, negative_prompt, height=s["height"], width=s["width"], num_frames=s["frames"],
                      num_inference_steps=s["steps"], guidance_scale=s["guidance"], guidance_scale_2=s.get("guidance_2"),
                      seed=seed, latents=init, flow_shift=s.get("flow_shift"), scheduler=s["scheduler"],
                      max_sequence_length=s["max_sequence_length"],
                      output_type="np" if out.suffix == ".npy" else "uint8", image=img, cache=cache_cfg,
                      progress=progress)
    if bar is not None:
        bar.close()
    for w in pipe.last_warnings:
        click.echo(f"wan-run: warning: {w}", err=True)
    if pipe.last_block_runs is not None:
        n = s["steps"] * len(pipe.last_block_runs)
        click.echo(f"cache {cache_cfg.policy}: ran the blocks {int(pipe.last_block_runs.sum())} of {n} times")
    if not distributed.is_main():  # every process computed; process 0 writes
        return
    t0 = time.perf_counter()
    if out.suffix == ".npy":
        write_npy(out, frames_out)
    else:
        write_mp4(out, frames_out, fps=s["fps"])
    write_seconds = time.perf_counter() - t0
    record = {
        "prompt": prompt, "negative_prompt": negative_prompt, "seed": seed,
        "model": {"checkpoint": str(pathlib.Path(checkpoint).resolve()), "family": ckpt.family,
                  "source": ckpt.manifest.get("source", {}).get("id")},
        "preset": p["name"],
        "settings": {k: s[k] for k in ("height", "width", "frames", "steps", "guidance", "guidance_2", "flow_shift",
                                       "scheduler", "fps", "max_sequence_length", "boundary", "mesh") if k in s}
        | {"dtypes": dataclasses.asdict(dtypes), "kv_cache": kv_cache, "cache": dataclasses.asdict(cache_cfg),
           "block_runs": None if pipe.last_block_runs is None else pipe.last_block_runs.tolist(), "latents": latents, "image": image},
        "timings": pipe.timings.as_dict() | {"write": round(write_seconds, 4)},
        "wan_run": __version__,
    }
    write_sidecar(out, record)
    click.echo(pipe.timings.summary())
    click.echo(f"wrote {out} ({frames_out.shape[0]} frames, {frames_out.shape[2]}x{frames_out.shape[1]}) "
               f"and {out.with_suffix('.json')}")


if __name__ == "__main__":
    main()
