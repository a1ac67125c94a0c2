"""Fixtures for ``ccm serve``'s tests: the tiny pipeline with a ControlNet and servers on free loopback ports."""

from __future__ import annotations

import contextlib
import threading

import pytest

from ccm_sdk.app.server import GenerationService, make_server
from ccm_sdk.pipeline import CCMPipeline


@pytest.fixture(scope="module")
def pipe(lcm_dir, controlnet_dir):
    return CCMPipeline.from_pretrained(lcm_dir, controlnet=[controlnet_dir])


@contextlib.contextmanager
def _serving(service: GenerationService, **options):
    server = make_server(service, port=0, **options)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)


@pytest.fixture()
def serve():
    """``serve(service, **make_server_options)``: a context manager that runs a server in a thread and yields it."""
    return _serving
