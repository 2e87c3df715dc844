"""``wan-run``: generate a video from a converted checkpoint.

Every flag is checked before any weights load (``RunConfig``: defaults <- the checkpoint's own configs <-
the preset <- flags); bad input is one line naming the flag, exit code 2 (``--debug``: the traceback).
``--prompts FILE`` makes a video per line with one load: every line is checked first (a bad one is named as
FILE:LINE), then lines of one settings class (``RunConfig.batch_key``) run in batches of ``--max-batch``.
"""
from __future__ import annotations

import json
import os
import pathlib
import sys
import time
from typing import Any, NamedTuple

import click

from . import __version__, errors
from .caching import POLICIES
from .format import WEIGHT_DTYPES as DTYPES
#: flags that are settings of the run (RunConfig fields and step-caching settings)
SETTINGS = ("height", "width", "frames", "steps", "guidance", "guidance_2", "flow_shift", "scheduler", "seed",
            "fps", "mesh", "negative_prompt", "strength", "conditioning_scale", "cache", "cache_thresh", "cache_k",
            "cache_retention", "cache_model", "cache_calibration", "cfg_cache_interval", "cfg_cache_start",
            "teacache_thresh", "firstblock_thresh")
#: what a --prompts JSONL line may set besides "prompt" and "output" (a file name): the settings of one video;
#: the load's own (--mesh, --dtype, --lora, ...) are the command line's
LINE_FIELDS = tuple(k for k in SETTINGS if k != "mesh") + ("image", "video", "mask")


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
    _opt(_G, "--prompt", default=None, help="required unless --plan or --prompts"),
    _opt(_G, "--prompts", type=click.Path(), default=None, metavar="FILE",
         help="many videos, one load: a prompt per non-empty line, or JSONL: per line an object with \"prompt\", "
              "settings named as these flags with underscores (seed, steps, negative_prompt, ...) and \"output\" "
              "(a file name); --output is then a folder, written NNNN.mp4 + .json per line"),
    _opt(_G, "--max-batch", type=click.IntRange(1), default=4, show_default=True,
         help="--prompts: videos per batch (lines that differ only in prompt, negative prompt and seed run as "
              "one batch)"),
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
    _opt(_I, "--video", type=click.Path(), default=None,
         help="an input video (mp4, or .npy uint8 frames (F, H, W, 3)): on a text-to-video model, video-to-video "
              "(with --strength); on a VACE model, the control video. Its frame count and size are --frames, "
              "--height and --width unless given (a given size resizes it)"),
    _opt(_I, "--strength", type=float, default=None,
         help="video-to-video: the fraction of the schedule that runs from the noised --video (0 < S <= 1; "
              "default 0.8)"),
    _opt(_I, "--mask", type=click.Path(), default=None,
         help="VACE: a mask video as --video's frames (white: generate, black: keep); default all white"),
    _opt(_I, "--reference", multiple=True, type=click.Path(), metavar="IMAGE",
         help="VACE: a reference image (repeatable), fitted into the frame on white and put before the video"),
    _opt(_I, "--conditioning-scale", default=None, metavar="S[,S...]",
         help="VACE: the control's scale, one value or one per VACE layer (default 1)"),
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
    _opt(_O, "--output", "-o", default=None,
         help="out.mp4 (the default), or out.npy for float32 frames in [0, 1]; with --prompts: a folder (default "
              "out), created if missing"),
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
    """Check everything that can be checked (every line of --prompts), then load once, generate and write."""
    from . import distributed
    from .runconfig import group_batches

    if flags["plan"]:
        return print_plan(flags)
    ckpt, jobs = _file_jobs(flags) if flags["prompts"] is not None else _flag_job(flags)
    loras = _loras(ckpt, flags)
    for note in dict.fromkeys(n for job in jobs for n in job.config.notes()):
        click.echo(f"wan-run: note: {note}", err=True)
    distributed.initialize(flags["coordinator"], flags["num_processes"], flags["process_id"],
                           flags["local_device_ids"])  # before any other JAX call
    if flags["fp8_matmul"]:
        from .models.layers import fp8_matmul_support

        if fp8_matmul_support():
            raise UsageError(f"--fp8-matmul: {fp8_matmul_support()}")
    pipe = _load(ckpt, flags, jobs[0].config)
    pipe.set_loras(*loras)
    keys = [job.batch_key() for job in jobs]
    for batch in group_batches(keys, flags["max_batch"]):
        _generate(pipe, [jobs[i] for i in batch], flags, ckpt)


class Job(NamedTuple):
    """One video to make: its prompt and settings, inputs (and the paths the sidecar names), output file."""

    prompt: str
    config: Any
    out: pathlib.Path
    image: Any = None
    image_path: str | None = None
    video: Any = None  # runconfig.VideoInputs or None
    latents: Any = None
    latents_path: str | None = None
    where: str = ""  # "FILE:LINE: " for a --prompts line
    video_paths: tuple = ()  # (name, path) of the video inputs, for the sidecar

    def batch_key(self):
        """Jobs with equal keys run as one batch: ``RunConfig.batch_key`` of its settings and inputs, and one
        output type."""
        key = self.config.batch_key(self.image is not None, self.video)
        return None if key is None else (key, self.out.suffix)


def _flag_job(flags: dict) -> tuple[Any, list[Job]]:
    """The checkpoint and the one video of --prompt and the other flags."""
    from .checkpoint import open_checkpoint

    out = _output(flags["output"] or "out.mp4")
    if not (flags["prompt"] or "").strip():
        raise UsageError("--prompt: missing or empty")
    ckpt = open_checkpoint(flags["checkpoint"])
    return ckpt, [_job(ckpt, flags, flags["prompt"], out)]


def _job(ckpt, flags: dict, prompt: str, out: pathlib.Path, where: str = "", tokenizer=None) -> Job:
    """A job of ``prompt`` with ``flags``' settings (or a --prompts line's: ``where`` names it), checked:
    image, latents, settings; a long prompt's warning said now."""
    image, latents = _image(flags["image"]), _latents(flags["latents"])
    video = _video_inputs(flags)
    config = _config(ckpt, flags, image is not None, video)
    if latents is not None:
        config.check_latents(ckpt, latents.shape, len(video.references) if video is not None else 0)
    _warn_truncation(tokenizer or _tokenizer(ckpt), prompt, config, where)
    paths = tuple((k, flags.get(f)) for k, f in (("video", "video"), ("mask", "mask"), ("references", "reference"))
                  if flags.get(f))
    return Job(prompt, config, out, image, flags["image"], video, latents, flags["latents"], where,
               tuple((k, list(v) if k == "references" else v) for k, v in paths))


def _file_jobs(flags: dict) -> tuple[Any, list[Job]]:
    """--prompts: the checkpoint and a job per non-empty line, every line checked before any weights load (a
    bad one: one error naming FILE:LINE and the field); then the output folder is made."""
    from .checkpoint import open_checkpoint

    for flag in ("prompt", "latents"):
        if flags[flag] is not None:
            raise UsageError(f"--{flag}: not with --prompts (one --prompts line is one video)")
    lines, jsonl = _prompt_lines(flags["prompts"])
    folder = pathlib.Path(flags["output"] or "out")
    if folder.suffix in (".mp4", ".npy") or (folder.exists() and not folder.is_dir()):
        raise UsageError(f"--output: with --prompts, a folder for the videos, not {folder}")
    ckpt = open_checkpoint(flags["checkpoint"])
    tokenizer, jobs = _tokenizer(ckpt), []
    for index, (number, text) in enumerate(lines):
        where = f"{flags['prompts']}:{number}: "
        try:
            prompt, name, line_flags = _line_flags(flags, _parse_line(text) if jsonl else {"prompt": text})
            out = folder / _output_name(name, index, [job.out.name for job in jobs])
            jobs.append(_job(ckpt, line_flags, prompt, out, where, tokenizer))
        except Exception as e:  # noqa: BLE001 - bad input: one line naming the file and line
            if not _is_user_error(e):
                raise
            raise UsageError(f"--prompts: {where}{errors.one_line(e)}") from None
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UsageError(f"--output: cannot make folder {folder} ({errors.one_line(e)})") from None
    if not os.access(folder, os.W_OK):
        raise UsageError(f"--output: folder {folder} is not writable")
    return ckpt, jobs


def _prompt_lines(path: str) -> tuple[list[tuple[int, str]], bool]:
    """(line number, text) of each non-empty line of a --prompts file, and whether it is JSONL (its first
    non-empty line starts with "{")."""
    try:
        text = pathlib.Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"--prompts: cannot read {path} ({errors.one_line(e)})") from None
    lines = [(n, line.strip()) for n, line in enumerate(text.splitlines(), 1) if line.strip()]
    if not lines:
        raise UsageError(f"--prompts: {path} has no prompts")
    return lines, lines[0][1].startswith("{")


def _parse_line(text: str) -> dict:
    """A --prompts JSONL line: one JSON object."""
    try:
        line = json.loads(text)
    except ValueError as e:
        raise UsageError(f"not a JSON object ({errors.one_line(e)})") from None
    if not isinstance(line, dict):
        raise UsageError(f"not a JSON object with \"prompt\": {text[:60]}")
    return line


def _line_flags(flags: dict, line: dict) -> tuple[str, str | None, dict]:
    """A --prompts line's prompt, output name and flags: the command line's, with the line's settings."""
    unknown = sorted(set(line) - set(LINE_FIELDS) - {"prompt", "output"})
    if unknown:
        raise UsageError(f"{unknown[0]!r}: not a per-line setting (those are prompt, output, {', '.join(LINE_FIELDS)})")
    prompt = line.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise UsageError("prompt: missing or empty")
    settings = {k: _line_value(k, v) for k, v in line.items() if k in LINE_FIELDS and v is not None}
    return prompt.strip(), line.get("output"), {**flags, **settings}


def _line_value(name: str, value):
    """A --prompts line's value, checked as the flag's own type (range, choices) checks the command line's."""
    option = next(o for o in main.params if o.name == name)
    flag = option.opts[0]
    if isinstance(option.type, click.types.IntParamType):
        want, what = int, "an integer"
    elif isinstance(option.type, click.types.FloatParamType):
        want, what = (int, float), "a number"
    else:
        want, what = str, "a string"
    if isinstance(value, bool) or not isinstance(value, want):
        raise UsageError(f"{flag}: expected {what}, got {json.dumps(value)}")
    try:
        return option.type.convert(value, option, None)
    except click.BadParameter as e:
        raise UsageError(f"{flag}: {e.message}") from None


def _output_name(name, index: int, taken: list[str]) -> str:
    """A --prompts line's output file: its "output" (a file name ending .mp4 or .npy), else NNNN.mp4."""
    if name is None:
        name = f"{index:04d}.mp4"
    elif not isinstance(name, str) or pathlib.Path(name).name != name or pathlib.Path(name).suffix not in (
            ".mp4", ".npy"):
        raise UsageError(f"output: a file name ending in .mp4 or .npy, not {json.dumps(name)}")
    if name in taken:
        raise UsageError(f"output: {name} is an earlier line's output too")
    return name


def _load(ckpt, flags: dict, config):
    from .pipeline import WanPipeline

    return WanPipeline.from_converted(
        ckpt.root, mesh=config.mesh, dtype=_dtypes(flags), compilation_cache=flags["compile_cache"],
        executable_cache=flags["executable_cache"] or None, context_attention=flags["context_attention"],
        kv_cache=flags["kv_cache"], vae_chunk=flags["vae_chunk"], vae_precision=flags["vae_precision"],
        preset=config.preset, offload=flags["offload"], quantize=flags["quantize"], fp8_matmul=flags["fp8_matmul"])


def _generate(pipe, jobs: list[Job], flags: dict, ckpt) -> None:
    """One batch of jobs (one job: wan-run's single video) through the pipeline, then each one written."""
    from . import distributed

    config = jobs[0].config
    bar = _progress_bar(config.steps - config.first_step(), flags["quiet"])  # video-to-video: the steps that run
    gens = pipe.generate_batch([j.prompt for j in jobs], [j.config for j in jobs], images=[j.image for j in jobs],
                               latents=[j.latents for j in jobs], videos=[j.video for j in jobs],
                               output_type="np" if jobs[0].out.suffix == ".npy" else "uint8",
                               progress=(lambda i: bar.update(1)) if bar is not None else None)
    if bar is not None:
        bar.close()
    for job, gen in zip(jobs, gens):
        for w in gen.warnings:
            click.echo(f"wan-run: warning: {job.where}{w}", err=True)
        if gen.block_runs is not None:
            click.echo(f"cache {config.cache.name}: ran the blocks {int(gen.block_runs.sum())} of "
                       f"{config.steps * len(gen.block_runs)} times")
        if distributed.is_main():  # every process computed; process 0 writes
            _write(job, gen, flags, ckpt, pipe, summary=job is jobs[-1])


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
    config = _config(ckpt, flags, flags["image"] is not None, _video_inputs(flags))
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


def _config(ckpt, flags: dict, image: bool, video=None):
    from .runconfig import DEFAULT_NEGATIVE, RunConfig
    from .sharding import parse_mesh

    settings = {k: flags.get(k) for k in SETTINGS} | {"conditioning_scale": _scales(flags.get("conditioning_scale"))}
    config = RunConfig.resolve(ckpt, flags["preset"] or "auto", image=image, inputs=video,
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


def _scales(text):
    """--conditioning-scale: one number, or numbers separated by commas (one per VACE layer)."""
    if text is None or isinstance(text, (int, float)):
        return text
    try:
        values = tuple(float(x) for x in str(text).split(","))
    except ValueError:
        raise UsageError(f"--conditioning-scale: a number or numbers separated by commas, not {text!r}") from None
    return values[0] if len(values) == 1 else values


def _video_inputs(flags: dict):
    """--video, --mask and --reference loaded (a runconfig.VideoInputs), or None."""
    from .video import load_inputs

    return load_inputs(flags.get("video"), flags.get("mask"), flags.get("reference") or ())


def _latents(path):
    if path is None:
        return None
    import numpy as np

    try:
        return np.load(path)
    except (OSError, ValueError, EOFError) as e:
        raise UsageError(f"--latents: cannot read {path} ({errors.one_line(e)})") from None


def _tokenizer(ckpt):
    from .text import Tokenizer

    return Tokenizer.from_file(ckpt.root / "tokenizer" / "tokenizer.json")


def _warn_truncation(tokenizer, prompt: str, config, where: str = "") -> None:
    """Long prompts are truncated, as diffusers does: say so now, not after the load and the generation."""
    from .text import tokenize_prompts

    _, _, truncated = tokenize_prompts(tokenizer, [prompt, config.negative_prompt], config.max_sequence_length)
    for flag, cut in zip(("--prompt", "--negative-prompt"), truncated):
        if cut:
            click.echo(f"wan-run: warning: {where}{flag} is longer than {config.max_sequence_length} tokens; it is "
                       "truncated", err=True)


def _progress_bar(steps: int, quiet: bool):
    if quiet or not sys.stderr.isatty():
        return None
    from tqdm import tqdm

    return tqdm(total=steps, desc="denoise", unit="step", leave=False)


def _write(job: Job, gen, flags: dict, ckpt, pipe, summary: bool = True) -> None:
    """The video (or .npy frames) and the sidecar JSON: prompt, model, every resolved setting, timings (a
    batch's videos: the batch's, printed with its last video: ``summary``)."""
    from .video import write_mp4, write_npy, write_sidecar

    out, t0 = job.out, time.perf_counter()
    if out.suffix == ".npy":
        write_npy(out, gen.frames)
    else:
        write_mp4(out, gen.frames, fps=gen.config.fps)
    write_seconds = time.perf_counter() - t0
    record = pipe.record(gen, job.prompt, quantize=flags["quantize"], latents=job.latents_path,
                         image=job.image_path, **dict(job.video_paths))
    record["timings"]["write"] = round(write_seconds, 4)
    record["wan_run"] = __version__
    write_sidecar(out, record)
    d = record["devices"]
    if summary:
        click.echo(f"devices: {d['count']} x {d['kind']} ({d['backend']}, {d['processes']} process(es))")
        click.echo(gen.timings.summary())
    click.echo(f"wrote {out} ({gen.frames.shape[0]} frames, {gen.frames.shape[2]}x{gen.frames.shape[1]}) "
               f"and {out.with_suffix('.json')}")


if __name__ == "__main__":
    main()
