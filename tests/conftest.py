"""Shared fixtures: every test gets its own maskhub home and an offline Hub setup."""

from __future__ import annotations

import os
import signal
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

os.environ.setdefault("HF_HUB_DISABLE_XET", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

# A shell starts a background job (`.ci/run &`, nohup) with SIGINT ignored, and Python then
# keeps it ignored: the Ctrl-C tests (in process, and in the commands they start, which
# inherit it) would see no interrupt. The tests run as from a terminal.
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.fixture(autouse=True)
def maskhub_home(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
                 ) -> Path:
    """Point ``MASKHUB_HOME`` at a fresh temporary directory for each test."""
    home = tmp_path_factory.mktemp("maskhub-home")
    monkeypatch.setenv("MASKHUB_HOME", str(home))
    return home


# -- scale-out (Ray, S3): optional libraries, skipped cleanly when absent ------------------


@pytest.fixture(scope="session")
def s3_server() -> Iterator[str]:
    """A local S3-protocol server (moto in server mode) on 127.0.0.1 for the whole session;
    the standard ``AWS_*`` variables point s3fs at it. Yields the endpoint URL."""
    pytest.importorskip("s3fs")
    moto_server = pytest.importorskip("moto.server")
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {"AWS_ENDPOINT_URL": f"http://{host}:{port}", "AWS_ACCESS_KEY_ID": "testing",
           "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield env["AWS_ENDPOINT_URL"]
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        server.stop()


@pytest.fixture
def s3_bucket(s3_server: str) -> str:
    """A fresh, empty bucket on the session's S3 server; yields ``s3://<bucket>``."""
    import s3fs

    name = f"maskhub-{uuid.uuid4().hex[:12]}"
    s3fs.S3FileSystem(skip_instance_cache=True).mkdir(name)
    return f"s3://{name}"


@pytest.fixture(scope="session")
def ray_local(request: pytest.FixtureRequest) -> Iterator[object]:
    """Ray in local mode with 2 CPUs, started once per session (maskhub reuses it). The S3
    server starts first when its libraries are there, so that the workers inherit its
    ``AWS_*`` environment."""
    ray = pytest.importorskip("ray")
    try:
        request.getfixturevalue("s3_server")
    except pytest.skip.Exception:
        pass
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        yield ray
    finally:
        ray.shutdown()
