"""A GCS emulator on 127.0.0.1 for tests (gcp-storage-emulator, in memory), reached through
gcsfs exactly as a user's bucket would be (no client mocks)."""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Iterator


@contextlib.contextmanager
def gcs_emulator(bucket: str) -> Iterator[dict[str, str]]:
    """Serves an empty in-memory store holding ``bucket`` on a free port; yields the gcsfs
    options that reach it (``storage_options``; as environment variables, ``fsspec_env``)."""
    from gcp_storage_emulator.server import create_server

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = create_server("127.0.0.1", port, in_memory=True, default_bucket=bucket)
    server.start()
    try:
        yield {"endpoint_url": f"http://127.0.0.1:{port}", "token": "anon", "project": "test"}
    finally:
        server.stop()


def fsspec_env(options: dict[str, str]) -> dict[str, str]:
    """``options`` as fsspec's configuration variables, which reach every gcsfs instance a
    process makes (how a multi-host job configures its workers)."""
    return {f"FSSPEC_GCS_{name.upper()}": value for name, value in options.items()}
