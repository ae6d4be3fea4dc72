"""huggingface_hub's own messages routed through maskhub (issue 15): a pull over a dropped
connection prints one short line per retry and the one error line, nothing but the error
with --quiet; a push to an endpoint without Xet names HF_HUB_DISABLE_XET=1. Run as real
processes, so that the library's own stderr handler would show if it were not replaced."""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from hubserver import HubServer
from huggingface_hub import constants, hf_hub_download
from test_hub import REPO, diff_mask, fails

pytest_plugins = ["hub_fixture"]
pytestmark = pytest.mark.filterwarnings("ignore:Use 'content=<...>'.*:DeprecationWarning")

BAR = re.compile(r"^Fetching \d+ files: ")
RUN = "import sys; sys.argv[0] = 'maskhub'; from maskhub.entry import run; run()"


def pull(home: Path, *args: str) -> tuple[int, list[str]]:
    """``maskhub pull REPO ARGS`` in a fresh process; its exit code and stderr lines, the
    progress bars (huggingface_hub's tqdm, redrawn with carriage returns) left out."""
    proc = subprocess.run([sys.executable, "-c", RUN, "pull", REPO, *args],
                          env={**os.environ, "MASKHUB_HOME": str(home)},
                          capture_output=True, text=True, timeout=300)
    lines = [seg.strip() for seg in re.split(r"[\r\n]", proc.stderr)]
    return proc.returncode, [ln for ln in lines if ln and not BAR.match(ln)]


@pytest.fixture
def pushed_repo(hub_server: HubServer, tmp_path: Path) -> None:
    diff_mask(tmp_path, "tulu-dpo").push_to_hub(REPO)
    hf_hub_download(REPO, "maskhub.json")  # cached: the faults hit the store's files


def test_one_dropped_connection_is_one_line(pushed_repo: None, hub_server: HubServer,
                                            tmp_path: Path) -> None:
    hub_server.fail_next("download")
    code, lines = pull(tmp_path / "once")
    assert code == 0
    assert lines == ["retrying 1/5 after a dropped connection"]


def test_connection_that_always_drops(pushed_repo: None, hub_server: HubServer,
                                      tmp_path: Path) -> None:
    hub_server.fail_next("download", 10_000)
    code, lines = pull(tmp_path / "quiet", "--quiet")
    assert code == 1 and len(lines) == 1
    assert lines[0].startswith(f"Error: {REPO}@") and \
        "network error talking to the Hub: peer closed connection" in lines[0]
    code, lines = pull(tmp_path / "loud")
    assert code == 1
    assert lines[:-1] == [f"retrying {n}/5 after a dropped connection" for n in range(1, 6)]
    assert lines[-1].startswith(f"Error: {REPO}@")
    assert not any("Trying to resume" in ln or "Error while downloading" in ln for ln in lines)


def test_push_prints_no_data_file_warning(hub_server: HubServer, tmp_path: Path) -> None:
    diff_mask(tmp_path, "tulu-dpo")
    proc = subprocess.run([sys.executable, "-c", RUN, "push", "tulu-dpo", REPO],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "data file" not in proc.stderr and "Warning" not in proc.stderr


def test_push_to_an_endpoint_without_xet(hub_server: HubServer, tmp_path: Path,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("hf_xet")
    diff_mask(tmp_path, "tulu-dpo")
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", False)
    line = fails("push", "tulu-dpo", REPO)
    assert line == (f"Error: the Hub endpoint at {constants.ENDPOINT} does not speak Xet (its "
                    "xet-write-token request answered HTTP 404): set HF_HUB_DISABLE_XET=1 to "
                    "upload through plain LFS")


def test_a_push_into_a_pipe_that_closes_still_finishes(hub_server: HubServer,
                                                       tmp_path: Path) -> None:
    # `maskhub push ... 2>&1 | head -1`: the reader goes after one line; the upload must
    # neither hang on huggingface_hub's progress bars nor stop half-way.
    from maskhub import Registry

    mask = diff_mask(tmp_path, "piped")
    command = (f"{shlex.quote(sys.executable)} -c {shlex.quote(RUN)} push piped {REPO} 2>&1 "
               "| head -1")
    proc = subprocess.Popen(["sh", "-c", command], stdout=subprocess.PIPE, text=True,
                            env=os.environ.copy(), start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the hung push too, not only the shell
        proc.communicate()
        raise
    assert proc.returncode == 0
    head = hub_server.head(REPO)
    data = hub_server.file_bytes(REPO, "maskhub.json")
    listed = json.loads(data)["files"]
    n_bytes = sum(f["size"] for f in listed.values()) + len(data)
    assert out == (f"pushed piped to {REPO}@main: commit {head[:12]} "
                           f"({len(listed) + 1} files, {n_bytes:,} bytes)\n")
    assert Registry().get("piped").row["hub_revision"] == head
    assert json.loads(data)["mask"]["id"] == mask.id
