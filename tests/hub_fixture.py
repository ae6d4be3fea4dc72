"""Pytest fixtures that point the real `huggingface_hub` client at a local `HubServer`.

Use them from a test module with ``pytest_plugins = ["hub_fixture"]`` (tests/ is on
``sys.path`` under pytest's default "prepend" import mode), or from ``tests/conftest.py``.

Fixtures:

- ``hub_server``: a fresh `HubServer` per test, no token required. Options through indirect
  parametrization, e.g.
  ``@pytest.mark.parametrize("hub_server", [{"require_token": "tok"}], indirect=True)``
  (any `HubServer` keyword argument); with ``require_token``, ``HF_TOKEN`` is set to it.
- ``hub_server_with_token``: same with ``require_token=TEST_TOKEN`` and ``HF_TOKEN=TEST_TOKEN``.

Both fail the test at teardown if the server met a request it could not handle (an exception
other than a protocol error; see ``HubServer.errors``; clear that list if a test provokes it).

Why patch constants and not only set environment variables: `huggingface_hub.constants` reads
``HF_ENDPOINT``, ``HF_HOME``, ``HF_HUB_DISABLE_XET`` ... once, at import time, and a few modules
copy values further at their own import: the module-level ``huggingface_hub.hf_api.api``
(behind ``huggingface_hub.create_repo``, ``upload_folder``, ``model_info``, ``list_models``...)
stores its ``endpoint`` when created, so does ``huggingface_hub.hf_file_system.hffs``, and
``utils._cache_manager`` / ``utils._cache_assets`` import ``HF_HUB_CACHE`` / ``HF_ASSETS_CACHE``
by value. `point_client_at` therefore, through ``monkeypatch`` (undone after each test):

- sets the env vars ``HF_ENDPOINT``, ``HF_HOME`` (a temp dir), ``HF_HUB_CACHE``,
  ``HF_ASSETS_CACHE``, ``HF_XET_CACHE``, ``HF_TOKEN_PATH`` (all under it),
  ``HF_HUB_DISABLE_XET=1``, ``HF_HUB_DISABLE_TELEMETRY=1``, ``HF_HUB_OFFLINE=0`` and
  ``HF_TOKEN`` (or removes it, with ``HUGGING_FACE_HUB_TOKEN`` and ``HF_OIDC_RESOURCE``), for
  subprocesses and later imports;
- patches the matching constants: ``ENDPOINT``, ``HUGGINGFACE_CO_URL_TEMPLATE`` (download
  URLs), ``HF_URL_HOSTS``, ``HF_HOME``, ``HF_HUB_CACHE``/``HUGGINGFACE_HUB_CACHE`` (a fresh
  cache), ``HF_ASSETS_CACHE``, ``HF_XET_CACHE``, ``HF_TOKEN_PATH``/``HF_STORED_TOKENS_PATH`` (no
  stored login leaks in), ``HF_HUB_OFFLINE=False``, ``HF_HUB_DISABLE_XET=True`` (plain LFS
  protocol, which the server speaks), ``HF_HUB_DISABLE_TELEMETRY=True`` (also stops the
  user-agent "agent detection" call to ``/api/agent-harnesses``), and the paths of the
  update-check and agent-registry files;
- sets the ``endpoint`` attribute of the two module-level client instances above (their
  configuration, not their behaviour);
- closes the shared HTTP client (`huggingface_hub.close_session`) before and after, so no
  pooled connection to another test's server is reused.

No request, upload or download function is patched: every byte goes through the real client
and a real socket.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import huggingface_hub
import pytest
from hubserver import HubServer
from huggingface_hub import constants
from huggingface_hub.utils import _cache_assets, _cache_manager

TEST_TOKEN = "hf_test_token_0123456789"
_CLEARED_ENV = ("HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE", "HF_OIDC_ID_TOKEN")


def point_client_at(
    server: HubServer,
    monkeypatch: pytest.MonkeyPatch,
    hf_home: Path,
    *,
    token: str | None = None,
) -> None:
    """Make the real `huggingface_hub` client talk to ``server`` with a fresh cache in ``hf_home``.

    ``token`` becomes ``HF_TOKEN`` (None: no token at all). See the module docstring.
    """
    hf_home.mkdir(parents=True, exist_ok=True)
    hub_cache = str(hf_home / "hub")
    _set_env(monkeypatch, server.url, hf_home, token)
    values: dict[str, Any] = {
        "ENDPOINT": server.url,
        "HUGGINGFACE_CO_URL_TEMPLATE": server.url + "/{repo_id}/resolve/{revision}/{filename}",
        "HF_URL_HOSTS": constants.HF_URL_HOSTS | {"127.0.0.1"},
        "HF_HOME": str(hf_home),
        "HF_HUB_CACHE": hub_cache,
        "HUGGINGFACE_HUB_CACHE": hub_cache,
        "HF_ASSETS_CACHE": str(hf_home / "assets"),
        "HUGGINGFACE_ASSETS_CACHE": str(hf_home / "assets"),
        "HF_XET_CACHE": str(hf_home / "xet"),
        "HF_TOKEN_PATH": str(hf_home / "token"),
        "HF_STORED_TOKENS_PATH": str(hf_home / "stored_tokens"),
        "HF_HUB_OFFLINE": False,
        "HF_HUB_DISABLE_XET": True,
        "HF_HUB_DISABLE_TELEMETRY": True,
        "CHECK_FOR_UPDATE_DONE_PATH": str(hf_home / ".check_for_update_done"),
        "AGENT_HARNESSES_PATH": str(hf_home / ".agent_harnesses.json"),
    }
    for name, value in values.items():
        monkeypatch.setattr(constants, name, value)
    monkeypatch.setattr(_cache_manager, "HF_HUB_CACHE", hub_cache)
    monkeypatch.setattr(_cache_assets, "HF_ASSETS_CACHE", str(hf_home / "assets"))
    _point_default_instances(monkeypatch, server.url)
    huggingface_hub.close_session()


def _set_env(monkeypatch: pytest.MonkeyPatch, url: str, hf_home: Path, token: str | None) -> None:
    for name in _CLEARED_ENV:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_ENDPOINT", url)
    monkeypatch.setenv("HF_HOME", str(hf_home))
    monkeypatch.setenv("HF_HUB_CACHE", str(hf_home / "hub"))
    monkeypatch.setenv("HF_ASSETS_CACHE", str(hf_home / "assets"))
    monkeypatch.setenv("HF_XET_CACHE", str(hf_home / "xet"))
    monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("HF_TOKEN_PATH", str(hf_home / "token"))
    if token is None:
        monkeypatch.delenv("HF_TOKEN", raising=False)
    else:
        monkeypatch.setenv("HF_TOKEN", token)


def _point_default_instances(monkeypatch: pytest.MonkeyPatch, url: str) -> None:
    """Re-point the client objects created at import time (see the module docstring)."""
    from huggingface_hub import hf_api, hf_file_system

    monkeypatch.setattr(hf_api.api, "endpoint", url)
    monkeypatch.setattr(hf_file_system.hffs, "endpoint", url)
    monkeypatch.setattr(hf_file_system.hffs._api, "endpoint", url)
    hf_file_system.HfFileSystem.clear_instance_cache()


def _serve(
    options: dict[str, Any], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> Iterator[HubServer]:
    server = HubServer(**options).start()
    try:
        point_client_at(server, monkeypatch, tmp_path / "hf_home", token=server.require_token)
        yield server
    finally:
        huggingface_hub.close_session()
        server.stop()
    if server.errors:  # the client sent something the fake Hub does not understand
        pytest.fail("HubServer failed on requests:\n" + "\n".join(server.errors), pytrace=False)


@pytest.fixture
def hub_server(
    request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> Iterator[HubServer]:
    """A fresh fake Hub for this test, with the real client pointed at it (see module doc)."""
    options = dict(getattr(request, "param", None) or {})
    yield from _serve(options, monkeypatch, tmp_path)


@pytest.fixture
def hub_server_with_token(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[HubServer]:
    """Like ``hub_server`` but writes need ``TEST_TOKEN``, which ``HF_TOKEN`` holds."""
    yield from _serve({"require_token": TEST_TOKEN}, monkeypatch, tmp_path)


__all__ = ["TEST_TOKEN", "hub_server", "hub_server_with_token", "point_client_at"]
