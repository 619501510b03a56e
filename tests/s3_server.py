"""A real S3 API on loopback for the remote-root tests: moto's threaded server, one bucket per test.

Import the fixtures into a test module (`from tests.s3_server import s3_endpoint, s3_root  # noqa: F401`).
Endpoint and credentials reach the library only through the standard AWS environment variables.
"""

from __future__ import annotations

import logging
import uuid
from pathlib import Path

import pytest

CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


@pytest.fixture(scope="session")
def s3_endpoint():
    """`http://127.0.0.1:<port>` of a moto S3 server that lives for the test session."""
    pytest.importorskip("s3fs")
    server_module = pytest.importorskip("moto.server")
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = server_module.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture
def s3_root(s3_endpoint, monkeypatch, tmp_path):
    """`s3://<fresh bucket>/team`, with this machine's local copy under tmp_path/copy-a."""
    import s3fs

    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_endpoint)
    for name, value in CREDENTIALS.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("HF_CACHEHOOKS_LOCAL_COPY", str(tmp_path / "copy-a"))
    bucket = f"hfch-{uuid.uuid4().hex[:12]}"
    s3fs.S3FileSystem(endpoint_url=s3_endpoint, key="testing", secret="testing").mkdir(bucket)
    return f"s3://{bucket}/team"


def bucket_fs():
    """The s3fs filesystem the library uses (same options), for tests that look at or damage the bucket."""
    from hf_cachehooks._core.remote import filesystem

    return filesystem("s3://any")[0]


def other_machine(monkeypatch, tmp_path: Path, name: str = "copy-b") -> Path:
    """Switch to another machine's local copy (an empty one): what a second node or a laptop sees."""
    folder = tmp_path / name
    monkeypatch.setenv("HF_CACHEHOOKS_LOCAL_COPY", str(folder))
    return folder
