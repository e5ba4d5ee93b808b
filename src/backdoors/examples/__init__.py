"""Recoverable example servers, each with its client, to read and to run.

    python -m backdoors.examples.file_server --port 8080 --root /srv/files
    python -m backdoors.examples.http_server --port 8080 --root /srv/www
    python -m backdoors.examples.line_server --port 7000

Each server is a plain threaded server made recoverable with a few lines marked `# CB`
(see docs/continuations.md). They are installed with the package because the demo and
the benchmarks run them (the HTTP server, as a module, from any working directory).
They use only the public `backdoors.continuations` API; nothing in backdoors imports them.
"""
