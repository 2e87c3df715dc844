"""``wan-serve``: one warm process behind the OpenAI-compatible videos API (see the package docstring).

Every flag is checked before the port opens (bad input: one line, exit code 2). The pipeline then loads
and warms up in the worker thread while the server already accepts jobs (``/health`` says 503 "loading"
until it is ready); jobs left by an earlier run of the same ``--data-dir`` are queued again first.
"""
from __future__ import annotations

import ipaddress
import logging
import pathlib
import socket
import sqlite3
import sys

import click

from .. import __version__, errors


class UsageError(ValueError):
    pass


@click.command(cls=errors.Command, prog="wan-serve", context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--checkpoint", required=True, type=click.Path(), help="a checkpoint written by wan-convert")
@click.option("--host", default=None, help="address to bind (default 127.0.0.1: this machine only)")
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True, help="0: any free port")
@click.option("--preset", default=None, help="configs/ preset for the defaults (default: matched to the checkpoint)")
@click.option("--lora", multiple=True, metavar="FILE[:STRENGTH]", help="a LoRA for the transformer, repeatable")
@click.option("--lora-2", multiple=True, metavar="FILE[:STRENGTH]", help="a LoRA for Wan 2.2's low-noise expert")
@click.option("--mesh", default=None, help="device mesh, e.g. fsdp=8 (default: one device)")
@click.option("--dtype", type=click.Choice(["float32", "bfloat16", "float16"]), default=None,
              help="every dtype at once (default: wan-run's)")
@click.option("--offload", type=click.Choice(["auto", "none", "encoders", "experts", "all"]), default="auto",
              show_default=True)
@click.option("--data-dir", default="wan-serve-data", show_default=True, type=click.Path(),
              help="the job database, uploaded images and finished videos")
@click.option("--max-queue", type=click.IntRange(1), default=100, show_default=True,
              help="jobs queued or running at most; more get 429")
@click.option("--max-batch", type=click.IntRange(1, 64), default=4, show_default=True,
              help="queued text-to-video jobs of equal settings run as one batch of up to this many")
@click.option("--max-body-mb", type=click.FloatRange(0.001), default=25.0, show_default=True,
              help="request bodies over this many MB get 413")
@click.option("--token-file", type=click.Path(), default=None,
              help="a file holding the bearer token every request must send")
@click.option("--model-name", default=None, help="the model id clients send and see (default: the checkpoint folder)")
@click.option("--compile-cache", default=None, help="persistent compilation cache folder, or 'off'")
@click.option("--no-warmup", is_flag=True, help="compile on the first job instead of at start")
@click.option("--quiet", "-q", is_flag=True, help="warnings and errors only")
@click.option("--debug", is_flag=True, help="show tracebacks")
@click.version_option(__version__, prog_name="wan-serve")
def main(**flags):
    """Serve a converted Wan checkpoint: the OpenAI videos API, a durable job queue, batching, a web page."""
    try:
        serve(flags)
    except KeyboardInterrupt:
        sys.exit(130)
    except Exception as e:  # noqa: BLE001 - user-facing errors are one line; --debug shows the traceback
        from ..cli import _is_user_error

        if flags["debug"] or not (_is_user_error(e) or isinstance(e, UsageError)):
            raise
        errors.report("wan-serve", e, flags["debug"])


def serve(flags: dict) -> None:
    import uvicorn

    from ..checkpoint import open_checkpoint
    from ..cli import _loras
    from ..text import Tokenizer
    from .app import Server, make_app
    from .jobs import JobStore
    from .worker import Options, Worker

    ckpt = open_checkpoint(flags["checkpoint"])
    token = _token(flags["token_file"])
    loras = _loras(ckpt, {**flags, "lora_ignore_unknown": False})
    data = pathlib.Path(flags["data_dir"])
    try:
        data.mkdir(parents=True, exist_ok=True)
        store = JobStore(data / "jobs.sqlite")
    except (OSError, sqlite3.Error) as e:
        raise UsageError(f"--data-dir: cannot use {data} ({errors.one_line(e)})") from None
    sock = _bind(flags["host"], flags["port"], token)
    logging.basicConfig(level=logging.WARNING if flags["quiet"] else logging.INFO, format="%(message)s")
    log = logging.getLogger("wan-serve")
    recovered = store.recover()
    if recovered:
        log.info("wan-serve: %d job(s) left running by the last run are queued again", recovered)
    opts = Options(ckpt.root, data, preset=flags["preset"], max_batch=flags["max_batch"], mesh=flags["mesh"],
                   dtype=flags["dtype"], offload=flags["offload"], loras=loras[0], loras_2=loras[1],
                   compile_cache=flags["compile_cache"], warmup=not flags["no_warmup"])
    worker = Worker(store, ckpt, opts)
    tokenizer = Tokenizer.from_file(ckpt.root / "tokenizer" / "tokenizer.json")
    server = Server(store, worker, ckpt, tokenizer, model=flags["model_name"] or ckpt.root.name, preset=flags["preset"],
                    max_queue=flags["max_queue"], max_body=int(flags["max_body_mb"] * 1e6), token=token)

    def shutdown() -> None:
        worker.stop()
        worker.join()
        store.close()

    worker.start()
    host, port = sock.getsockname()[:2]
    log.warning("wan-serve: %s on http://%s:%d (data in %s)", server.model, host, port, data)
    config = uvicorn.Config(make_app(server, shutdown), log_level="warning", timeout_graceful_shutdown=5)
    uvicorn.Server(config).run(sockets=[sock])


def _token(path: str | None) -> str | None:
    if path is None:
        return None
    try:
        token = pathlib.Path(path).read_text().strip()
    except OSError as e:
        raise UsageError(f"--token-file: cannot read {path} ({e.strerror or e})") from None
    if not token or any(c.isspace() for c in token):
        raise UsageError(f"--token-file: {path} must hold one token (no spaces), it is empty or has several")
    return token


def _bind(host: str | None, port: int, token: str | None) -> socket.socket:
    """The listening socket, opened here so a taken port is a one-line error. No --host: loopback only."""
    explicit = host is not None
    host = host or "127.0.0.1"
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = host == "localhost"
    if explicit and not loopback and token is None:
        click.echo(f"wan-serve: warning: --host {host} without --token-file: anyone who reaches this address can "
                   "use the server", err=True)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise UsageError(f"--port: cannot listen on {host}:{port} ({e.strerror or e})") from None
    sock.listen(128)
    sock.set_inheritable(True)
    return sock


if __name__ == "__main__":
    main()
