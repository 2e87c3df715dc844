"""How wan-convert and wan-run report bad input: one line naming the file, tensor or flag, exit code 2,
no traceback unless ``--debug``. Both command-line tools use this module (click ``cls=`` below, and
:func:`report` for the errors the tools raise themselves)."""
from __future__ import annotations

import sys
from typing import NoReturn

import click

EXIT_USAGE = 2


def one_line(e: BaseException, limit: int | None = None) -> str:
    """The message of ``e`` on one line: its first line without TensorStore's spec dump, at most ``limit``
    characters (the exception's name if it has no message)."""
    text = str(e).split(" [tensorstore_spec=")[0].strip()
    return (text.splitlines()[0] if text else type(e).__name__)[:limit]


def report(prog: str, e: BaseException, debug: bool) -> NoReturn:
    """Print ``PROG: error: message`` and exit 2; with ``debug`` re-raise instead (the traceback)."""
    if debug:
        raise e
    click.echo(f"{prog}: error: {one_line(e)}", err=True)
    sys.exit(EXIT_USAGE)


class _OneLineUsageError(click.ClickException):
    exit_code = EXIT_USAGE

    def __init__(self, prog: str, message: str):
        super().__init__(message)
        self.prog = prog

    def show(self, file=None) -> None:
        click.echo(f"{self.prog}: error: {self.message}", err=True)


class _OneLineUsage:
    """Mixin: click's own usage errors (unknown option, missing or ill-typed value) as one line too,
    instead of click's usage + hint + error block."""

    def __init__(self, *args, prog: str | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.prog = prog

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        try:
            return super().parse_args(ctx, args)
        except click.UsageError as e:
            root = ctx.find_root()
            prog = getattr(root.command, "prog", None) or root.info_name or "error"
            raise _OneLineUsageError(prog, f"{e.format_message()} (see --help)") from None


class Command(_OneLineUsage, click.Command):
    pass


class Group(_OneLineUsage, click.Group):
    command_class = Command
