"""Issue 21, item 3 for pulled repos: counts, names and declared shapes of a hostile mask repo
on the (local) Hub are checked by the one validator before anything is registered, and the
memory of a pull follows the bytes present, never a declared shape."""

from __future__ import annotations

from pathlib import Path

import pytest
from hubserver import HubServer
from test_hub import REPO, crafted_repo, diff_mask, edit_json, fails, masks_in, new_home
from test_untrusted_input import RSS_SLACK_MB, run_maskhub

from maskhub import Mask

pytest_plugins = ["hub_fixture"]
pytestmark = pytest.mark.filterwarnings("ignore:Use 'content=<...>'.*:DeprecationWarning")
T = "lm_head.weight"


@pytest.fixture
def pushed(hub_server: HubServer, tmp_path: Path) -> Mask:
    """A mask pushed to REPO from the default home (as in test_hub.py)."""
    mask = diff_mask(tmp_path, "tulu-dpo")
    mask.push_to_hub(REPO)
    return mask


def set_both(files: dict[str, bytes], manifest: dict, key: str, value: object) -> None:
    """Set a mask metadata field in maskhub.json and in the store's own copy."""
    manifest["mask"][key] = value
    edit_json(files, "mask.zarr/zarr.json", lambda d: d["attributes"].__setitem__(key, value))


def test_negative_count_in_manifest_is_refused(pushed: Mask, hub_server: HubServer,
                                               tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    crafted_repo(hub_server, REPO, "mallory/neg",
                 lambda files, m: set_both(files, m, "n_updated", -5))
    home = new_home(monkeypatch, tmp_path / "fresh").home
    line = fails("pull", "mallory/neg")
    assert line.startswith("Error: Hub repo mallory/neg@")
    assert line.endswith(": bad mask metadata: n_updated is -5, not a non-negative integer")
    assert masks_in(home) == []


def test_100k_character_name_is_refused_in_one_short_line(
        pushed: Mask, hub_server: HubServer, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    crafted_repo(hub_server, REPO, "mallory/long",
                 lambda files, m: set_both(files, m, "name", "a" * 100_000))
    home = new_home(monkeypatch, tmp_path / "fresh").home
    line = fails("pull", "mallory/long")
    assert line.endswith(": bad mask metadata: name '" + "a" * 59 + "... (100000 characters) "
                         "breaks the mask-name rules (letters, digits, '.', '_' and '-', "
                         "starting with a letter or digit, at most 200 characters)")
    assert len(line) < 400 and masks_in(home) == []


def _declare(exponent: int):
    """An edit giving ``T`` a declared size of 2^exponent packed bytes and no chunk file,
    with every count and checksum kept consistent."""
    def edit(files: dict[str, bytes], manifest: dict) -> None:
        for p in [p for p in files if p.startswith(f"mask.zarr/{T}/c/")]:
            del files[p]
            del manifest["files"][p]
        numel = 8 << exponent
        old: dict = {}

        def big(d: dict) -> None:
            old.update(d["attributes"])
            d["shape"] = [1 << exponent]
            d["attributes"].pop("encoding", None)  # packed bits, whatever layout was pushed
            d["attributes"].update({"shape": [numel], "numel": numel, "n_updated": 0})
            if "parameter_shape" in d["attributes"]:  # kept equal to shape, as the validator wants
                d["attributes"]["parameter_shape"] = [numel]
        edit_json(files, f"mask.zarr/{T}/zarr.json", big)
        for key, delta in (("n_params", numel - old["numel"]), ("n_updated", -old["n_updated"])):
            set_both(files, manifest, key, manifest["mask"][key] + delta)
    return edit


def test_declared_2_30_bytes_without_chunks_pull_in_bounded_memory(
        pushed: Mask, hub_server: HubServer, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The store checks out (a 2^33-entry tensor with no set bit needs no chunk), its
    tensors.parquet does not: refused, and the process never grew by the declared GiB."""
    crafted_repo(hub_server, REPO, "mallory/big", _declare(30))
    home = new_home(monkeypatch, tmp_path / "fresh").home
    code, err, rss = run_maskhub(["pull", "mallory/big"], home, timeout=300)
    assert code == 1 and err.startswith("Error: Hub repo mallory/big@"), err
    assert err.endswith(f": tensors.parquet disagrees with the store on tensor {T!r}"), err
    assert masks_in(home) == []
    code, err, baseline = run_maskhub(["pull", REPO], home, timeout=300)  # the honest repo
    assert code == 0, err
    assert rss < baseline + RSS_SLACK_MB, (rss, baseline)  # the declared GiB is 1024 MB


def test_declared_2_40_bytes_is_refused(pushed: Mask, hub_server: HubServer, tmp_path: Path,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    crafted_repo(hub_server, REPO, "mallory/huge", _declare(40))
    home = new_home(monkeypatch, tmp_path / "fresh").home
    line = fails("pull", "mallory/huge")
    assert line.startswith("Error: Hub repo mallory/huge@")
    assert line.endswith(f"(mask.zarr): array {T!r} has a bad zarr.json: its shape "
                         "[1099511627776] has 1099511627776 entries (at most 68719476736)"), line
    assert masks_in(home) == []
