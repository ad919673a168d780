"""Compression jobs run by the controller: checked requests, a process pool, published artifacts.

The server process checks a request (``request``), records the job and hands it to
the ``runner``, which runs ``worker.run_job`` — the same ``compression/job.py`` code as
`homefleet compress` — in a separate process, so torch never loads in the server and
the event loop never waits on a trial. Progress travels through a file the worker
appends to (``progress``); the runner copies it into the database, where any replica
can read it, and wakes watch streams (``watchers``). ``handlers`` is the transport-free
face the gRPC servicer calls; ``wire`` converts to and from protobuf.
"""
