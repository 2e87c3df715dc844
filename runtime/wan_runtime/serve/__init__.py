"""wan-serve: the lean runtime behind a warm, durable, OpenAI-compatible videos API.

- ``cli.py``: ``wan-serve`` (flags checked, port bound, then serve);
- ``app.py``: the HTTP routes (Starlette): ``/v1/videos`` create / list / retrieve / delete / content,
  ``/health``, ``/metrics``, the page at ``/``;
- ``validate.py``: a request -> a validated job, by wan-run's rules, refusals naming the field;
- ``jobs.py``: the durable queue (SQLite, WAL): nothing accepted is lost, each job completes once;
- ``worker.py``: the one generation thread: load, warm up, run batches, write outputs atomically;
- ``page.html``: the web page (plain HTML and a little JS).
"""
