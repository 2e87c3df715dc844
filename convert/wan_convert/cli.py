"""``wan-convert SOURCE OUTPUT`` and ``wan-convert verify OUTPUT [--source SOURCE]``."""
from __future__ import annotations

import signal
import sys

import click

from wan_runtime import errors
from wan_runtime.format import QUANT_BASE, STORAGE_DTYPES, FormatError
from wan_runtime.lora import LoraError
from wan_runtime.sharding import MeshError

from .convert import OutputError, convert, default_threads, read_loras
from .source import SourceError, SourceOptions
from .verify import VerifyError, verify

USER_ERRORS = (SourceError, OutputError, VerifyError, FormatError, LoraError, MeshError, ValueError, OSError)


class _DefaultToConvert(errors.Group):
    """``wan-convert SOURCE OUTPUT`` is short for ``wan-convert convert SOURCE OUTPUT``."""

    def parse_args(self, ctx, args):
        if args and args[0] not in self.commands and args[0] not in ("--help", "-h", "--version"):
            args = ["convert", *args]
        return super().parse_args(ctx, args)


def _fail(debug: bool, e: BaseException) -> None:
    errors.report("wan-convert", e, debug)


def _interrupt(signum, frame):
    raise KeyboardInterrupt  # SIGTERM cleans up like Ctrl-C (SIGKILL cannot: the next run does)


@click.group(cls=_DefaultToConvert, prog="wan-convert", context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="wan-jax", prog_name="wan-convert")
def main():
    """Convert a diffusers-format Wan repository (folder or Hugging Face repo id), a single-file
    transformer (ComfyUI) or an original Wan-AI folder once, into a bf16, layer-stacked, pre-sharded
    checkpoint that wan-run restores in seconds."""


# ---- LoRA flags (merge at conversion; verify replays the merge from the same files)
def _lora_options(merging: bool):
    """``--lora`` / ``--lora-2`` (repeatable, in order), and ``--lora-ignore-unknown`` when ``merging``."""
    if merging:
        helps = ("merge into the transformer (repeatable, applied in order; strength 1 by default)",
                 "merge into transformer_2, the low-noise expert of Wan 2.2 A14B (repeatable)")
    else:
        helps = ("a LoRA file merged into the transformer at conversion, in the same order (checked by "
                 "sha256; with --source the merge is replayed)", "the same for transformer_2")
    options = [click.option("--lora", "lora", multiple=True, metavar="FILE[:STRENGTH]", help=helps[0]),
               click.option("--lora-2", "lora_2", multiple=True, metavar="FILE[:STRENGTH]", help=helps[1])]
    if merging:
        options.append(click.option("--lora-ignore-unknown", is_flag=True,
                                    help="skip LoRA keys that are not Wan transformer weights (listed on stderr)"))

    def decorate(f):
        for option in reversed(options):
            f = option(f)
        return f
    return decorate


def _read_loras(lora, lora_2, ignore_unknown: bool) -> dict:
    """The LoRAs of ``--lora`` / ``--lora-2``, read; keys skipped by ``--lora-ignore-unknown`` listed on stderr."""
    loras = read_loras({"transformer": lora, "transformer_2": lora_2}, ignore_unknown)
    for lo in (lo for los in loras.values() for lo in los if lo.skipped):
        click.echo(f"wan-convert: warning: {lo.file}: skipped {len(lo.skipped)} unknown key(s): "
                   f"{', '.join(lo.skipped)}", err=True)
    return loras


# ---- source flags: where a single-file transformer or an original Wan-AI folder takes what it lacks
_SOURCE_FLAGS = (
    ("--transformer-2", "FILE", "the low-noise expert, for a Wan 2.2 A14B single-file SOURCE"),
    ("--vae", "FILE", "the VAE: Wan2.1_VAE.pth, Wan2.2_VAE.pth, or safetensors (Wan's or diffusers' names)"),
    ("--text-encoder", "FILE", "the UMT5 text encoder: models_t5_umt5-xxl-enc-bf16.pth, or safetensors"),
    ("--image-encoder", "FILE", "Wan 2.1 I2V's CLIP: models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth, "
                                "or safetensors"),
    ("--tokenizer", "DIR", "the tokenizer folder (google/umt5-xxl, with tokenizer.json)"),
    ("--components", "REPO", "a diffusers Wan repository (folder or hub id) lending the components, tokenizer "
                             "and configs SOURCE lacks"),
)


def _source_options(f):
    """The source flags (for a SOURCE that is a file or an original Wan-AI folder; see wan_convert.original)."""
    for flag, metavar, text in reversed(_SOURCE_FLAGS):
        f = click.option(flag, metavar=metavar, default=None, help=text)(f)
    return f


@main.command("convert")
@click.argument("source")
@click.argument("output", type=click.Path(file_okay=False))
@click.option("--dtype", "weights_dtype", default="bfloat16", show_default=True,
              type=click.Choice(STORAGE_DTYPES), help="weights dtype (norms stay float32); float8_e4m3fn / int8 "
              "quantize the transformer blocks' 2-D weights (per-output-channel float32 scales), the rest "
              f"{QUANT_BASE}")
@click.option("--text-encoder-dtype", type=click.Choice(STORAGE_DTYPES), default=None,
              help=f"the text encoder's weights dtype (default: {QUANT_BASE} with a quantized --dtype, else "
              "--dtype); float8_e4m3fn / int8 quantize its blocks' 2-D weights as --dtype does the transformer's")
@click.option("--mesh", default="1", show_default=True, help="target mesh for the chunk layout, e.g. fsdp=8")
@click.option("--force", is_flag=True, help="replace an existing checkpoint at OUTPUT")
@click.option("--threads", type=click.IntRange(1, 64), default=None, help=f"default {default_threads()}")
@click.option("--revision", default=None, help="hub revision (branch, tag or commit) for a repo id")
@click.option("--verify", "then_verify", is_flag=True, help="re-read everything and compare with SOURCE")
@click.option("--no-hash", is_flag=True, help="skip sha256 of the source files in the manifest")
@click.option("--only", default=None, help="comma-separated components to convert (e.g. transformer)")
@click.option("--fsync", is_flag=True, help="flush every file to disk before the final rename (power-loss safe)")
@click.option("--quiet", "-q", is_flag=True, help="no progress bar")
@click.option("--debug", is_flag=True, help="show tracebacks")
@_lora_options(merging=True)
@_source_options
def convert_cmd(source, output, weights_dtype, text_encoder_dtype, mesh, force, threads, revision, then_verify, no_hash,
                only, fsync, quiet, debug, lora, lora_2, lora_ignore_unknown, **flags):
    """Convert SOURCE (a diffusers repository, a single-file transformer, or an original Wan-AI folder)
    into a checkpoint at OUTPUT."""
    previous = signal.signal(signal.SIGTERM, _interrupt)
    s, sources = None, SourceOptions(**flags)
    try:
        loras = _read_loras(lora, lora_2, lora_ignore_unknown)
        s = convert(source, output, weights_dtype=weights_dtype, mesh=mesh, force=force, threads=threads,
                    progress=not quiet and sys.stderr.isatty(), revision=revision, hash_source=not no_hash,
                    only=[c.strip() for c in only.split(",")] if only else None, fsync=fsync, loras=loras,
                    sources=sources, text_encoder_dtype=text_encoder_dtype)
        click.echo(s.line())
        if then_verify:
            n = verify(s.output, source, threads=threads or default_threads(), loras=loras, sources=sources)
            click.echo(f"verified {n} arrays bit for bit against {source}")
    except USER_ERRORS as e:
        _fail(debug, e)
    except KeyboardInterrupt:
        what = "nothing was written at OUTPUT" if s is None else "OUTPUT is complete but was not verified"
        click.echo(f"wan-convert: interrupted; {what}", err=True)
        sys.exit(130)
    finally:
        signal.signal(signal.SIGTERM, previous)


@main.command("verify")
@click.argument("output", type=click.Path(file_okay=False))
@click.option("--source", default=None, help="compare every array bit for bit with this source")
@click.option("--threads", type=click.IntRange(1, 64), default=None)
@click.option("--debug", is_flag=True, help="show tracebacks")
@_lora_options(merging=False)
@_source_options
def verify_cmd(output, source, threads, debug, lora, lora_2, **flags):
    """Check OUTPUT's tree against the runtime's, and (with --source) every value against the source
    (a checkpoint with LoRAs merged: give the same --lora / --lora-2 files; a single-file or original
    Wan-AI source: the same source flags)."""
    try:
        n = verify(output, source, threads=threads or default_threads(),
                   loras={"transformer": lora, "transformer_2": lora_2}, sources=SourceOptions(**flags))
    except USER_ERRORS as e:
        _fail(debug, e)
    if source:
        click.echo(f"ok: {output} matches the runtime's trees and {source} bit for bit ({n} arrays)")
    else:
        click.echo(f"ok: {output} matches the runtime's trees; every chunk read back (present, complete, crc32c)")


if __name__ == "__main__":
    main()
