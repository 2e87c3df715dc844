"""``wan-convert SOURCE OUTPUT`` and ``wan-convert verify OUTPUT [--source SOURCE]``."""
from __future__ import annotations

import signal
import sys

import click

from wan_runtime import errors
from wan_runtime.format import WEIGHT_DTYPES, FormatError
from wan_runtime.sharding import MeshError

from .convert import OutputError, convert, default_threads
from .source import SourceError
from .verify import VerifyError, verify

USER_ERRORS = (SourceError, OutputError, VerifyError, FormatError, MeshError, ValueError, OSError)


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
    """Convert a diffusers-format Wan repository (folder or Hugging Face repo id) once, into a
    bf16, layer-stacked, pre-sharded checkpoint that wan-run restores in seconds."""


@main.command("convert")
@click.argument("source")
@click.argument("output", type=click.Path(file_okay=False))
@click.option("--dtype", "weights_dtype", default="bfloat16", show_default=True,
              type=click.Choice(WEIGHT_DTYPES), help="weights dtype (norms stay float32)")
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
def convert_cmd(source, output, weights_dtype, mesh, force, threads, revision, then_verify, no_hash, only, fsync, quiet, debug):
    """Convert SOURCE into a checkpoint at OUTPUT."""
    previous = signal.signal(signal.SIGTERM, _interrupt)
    s = None
    try:
        s = convert(source, output, weights_dtype=weights_dtype, mesh=mesh, force=force, threads=threads,
                    progress=not quiet and sys.stderr.isatty(), revision=revision, hash_source=not no_hash,
                    only=[c.strip() for c in only.split(",")] if only else None, fsync=fsync)
        click.echo(s.line())
        if then_verify:
            n = verify(s.output, source, threads=threads or default_threads())
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
def verify_cmd(output, source, threads, debug):
    """Check OUTPUT's tree against the runtime's, and (with --source) every value against the source."""
    try:
        n = verify(output, source, threads=threads or default_threads())
    except USER_ERRORS as e:
        _fail(debug, e)
    if source:
        click.echo(f"ok: {output} matches the runtime's trees and {source} bit for bit ({n} arrays)")
    else:
        click.echo(f"ok: {output} matches the runtime's trees; every chunk read back (present, complete, crc32c)")


if __name__ == "__main__":
    main()
