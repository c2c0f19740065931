"""A real S3-protocol server on 127.0.0.1 for tests and benchmarks: moto's server mode
(``ThreadedMotoServer``), reached through s3fs exactly as a user's bucket would be (no client
mocks)."""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator

CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
               "AWS_DEFAULT_REGION": "us-east-1"}
_SERVE = ("import sys, time\n"
          "from moto.server import ThreadedMotoServer\n"
          "ThreadedMotoServer('127.0.0.1', int(sys.argv[1]), verbose=False).start()\n"
          "while True: time.sleep(3600)\n")


@contextlib.contextmanager
def moto_s3(*, own_process: bool = False) -> Iterator[str]:
    """Starts the server on a free port; yields its endpoint URL. The AWS credential
    variables are set (to moto's dummy values) while it runs, as a user's would be.

    own_process: serve from a child process, so the server's Python work does not compete
      for this process's GIL (a benchmark then measures the client, as against a real store).
    """
    previous = {name: os.environ.get(name) for name in CREDENTIALS}
    os.environ.update(CREDENTIALS)
    try:
        with (_child_server() if own_process else _threaded_server()) as endpoint:
            yield endpoint
    finally:
        for name, value in previous.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


@contextlib.contextmanager
def _threaded_server() -> Iterator[str]:
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one log line per request
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        yield f"http://{host}:{port}"
    finally:
        server.stop()


@contextlib.contextmanager
def _child_server() -> Iterator[str]:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    child = subprocess.Popen([sys.executable, "-c", _SERVE, str(port)],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(f"{endpoint}/moto-api/data.json", timeout=1).read()
                break
            except OSError:
                if child.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("the moto server did not start") from None
                time.sleep(0.1)
        yield endpoint
    finally:
        child.kill()
        child.wait()


def enforce_credentials(endpoint: str, enforce: bool) -> None:
    """Makes the server check access keys (unknown keys are refused) or accept any."""
    request = urllib.request.Request(f"{endpoint}/moto-api/reset-auth",
                                     data=b"0" if enforce else b"inf", method="POST",
                                     headers={"Content-Type": "text/plain"})
    urllib.request.urlopen(request).read()
