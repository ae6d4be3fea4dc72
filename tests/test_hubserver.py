"""Drive the real `huggingface_hub` client against the local fake Hub (tests/hubserver.py).

Nothing in huggingface_hub is mocked: the fixtures only point its endpoint, cache and token
settings at a `HubServer` on 127.0.0.1 (see tests/hub_fixture.py).
"""

from __future__ import annotations

import hashlib
import os
import random
from pathlib import Path

import httpx2
import pytest
from hubserver import HubServer
from huggingface_hub import (
    HfApi,
    constants,
    create_repo,
    hf_hub_download,
    list_datasets,
    list_models,
    list_repo_files,
    list_repo_tree,
    model_info,
    snapshot_download,
    upload_folder,
)
from huggingface_hub.errors import (
    EntryNotFoundError,
    HfHubHTTPError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.hf_api import RepoFile, RepoFolder

pytest_plugins = ["hub_fixture"]

REPO = "alice/dpo-mask"
CARD = (
    "---\nlibrary_name: maskhub\ntags:\n- maskhub\n- update-mask\n- dpo\n"
    "base_model: org/base-7b\n---\n# A mask\n"
)
BIG = random.Random(0).randbytes(1_500_000)  # > lfs_threshold and binary: the LFS path


def _read(path: str | Path) -> bytes:
    return Path(path).read_bytes()


def _card(*tags: str, base_model: str = "org/base-7b") -> bytes:
    lines = "".join(f"- {tag}\n" for tag in tags)
    return f"---\nlibrary_name: maskhub\ntags:\n{lines}base_model: {base_model}\n---\n".encode()


def _count(server: HubServer, method: str, fragment: str) -> int:
    return sum(1 for m, path in server.requests if m == method and fragment in path)


@pytest.fixture
def model_folder(tmp_path: Path) -> Path:
    """A folder with a model card, a small text file in a subfolder and a 1.5 MB binary."""
    folder = tmp_path / "upload"
    (folder / "config").mkdir(parents=True)
    (folder / "README.md").write_text(CARD)
    (folder / "config" / "small.txt").write_text("hello mask\n")
    (folder / "weights.bin").write_bytes(BIG)
    return folder


# -- repos ----------------------------------------------------------------------------------------


def test_create_repo_conflict_exist_ok_and_private(hub_server: HubServer) -> None:
    url = create_repo(REPO)
    assert url.repo_id == REPO and url.startswith(hub_server.url)
    with pytest.raises(HfHubHTTPError) as excinfo:
        create_repo(REPO)
    assert excinfo.value.response.status_code == 409
    assert create_repo(REPO, exist_ok=True) == url
    assert create_repo("bare").repo_id == f"{hub_server.user}/bare"

    dataset = create_repo("alice/data", repo_type="dataset", private=True)
    assert dataset.repo_type == "dataset"
    with pytest.raises(RepositoryNotFoundError):  # private, and no token is set
        HfApi().dataset_info("alice/data")
    assert HfApi(token="any-token").dataset_info("alice/data").private is True


# -- upload and download --------------------------------------------------------------------------


def test_upload_folder_roundtrip_regular_and_lfs(hub_server: HubServer, model_folder: Path) -> None:
    create_repo(REPO)
    history_before = hub_server.commit_ids(REPO)

    info = upload_folder(repo_id=REPO, folder_path=model_folder, commit_message="add mask")

    assert hub_server.commit_ids(REPO) == [info.oid, *history_before]  # exactly one commit
    assert _count(hub_server, "PUT", "/lfs-upload/") == 1  # only the binary went through LFS
    expected = {
        ".gitattributes": None,
        "README.md": CARD.encode(),
        "config/small.txt": b"hello mask\n",
        "weights.bin": BIG,
    }
    assert sorted(list_repo_files(REPO)) == sorted(expected)
    tree = {entry.path: entry for entry in list_repo_tree(REPO, recursive=True, expand=True)}
    assert isinstance(tree["config"], RepoFolder)
    weights, small = tree["weights.bin"], tree["config/small.txt"]
    assert isinstance(weights, RepoFile) and isinstance(small, RepoFile)
    assert weights.lfs is not None and weights.lfs.sha256 == hashlib.sha256(BIG).hexdigest()
    assert small.lfs is None and weights.last_commit is not None
    assert weights.last_commit.oid == info.oid

    for path, content in expected.items():
        if content is not None:
            assert _read(hf_hub_download(REPO, path)) == content
    snapshot = Path(snapshot_download(REPO))
    assert _read(snapshot / "weights.bin") == BIG
    assert _read(snapshot / "config" / "small.txt") == b"hello mask\n"

    card_info = model_info(REPO)
    assert card_info.sha == info.oid
    assert card_info.card_data is not None and card_info.card_data.base_model == "org/base-7b"
    assert {"maskhub", "dpo", "base_model:org/base-7b"} <= set(card_info.tags or [])


def test_unchanged_upload_makes_no_new_commit(hub_server: HubServer, model_folder: Path) -> None:
    create_repo(REPO)
    first = upload_folder(repo_id=REPO, folder_path=model_folder)
    commits = hub_server.commit_ids(REPO)

    second = upload_folder(repo_id=REPO, folder_path=model_folder)

    assert second.oid == first.oid and hub_server.commit_ids(REPO) == commits
    assert _count(hub_server, "POST", "/commit/") == 1
    assert _count(hub_server, "PUT", "/lfs-upload/") == 1


def test_older_revisions_stay_pinned(hub_server: HubServer) -> None:
    api = HfApi()
    api.create_repo(REPO)
    old, new = BIG[:20_000], BIG[20_000:40_000]
    first = api.upload_file(path_or_fileobj=old, path_in_repo="mask.bin", repo_id=REPO)
    second = api.upload_file(path_or_fileobj=new, path_in_repo="mask.bin", repo_id=REPO)
    api.create_branch(REPO, branch="before-fix", revision=first.oid)
    api.create_tag(REPO, tag="v1", revision=first.oid)

    assert _read(hf_hub_download(REPO, "mask.bin")) == new
    for revision in (first.oid, "before-fix", "v1"):
        assert _read(hf_hub_download(REPO, "mask.bin", revision=revision)) == old
    assert _read(Path(snapshot_download(REPO, revision=first.oid)) / "mask.bin") == old
    assert model_info(REPO, revision="v1").sha == first.oid
    commits = [c.commit_id for c in api.list_repo_commits(REPO)]
    assert commits[:2] == [second.oid, first.oid] and commits == hub_server.commit_ids(REPO)
    refs = api.list_repo_refs(REPO)
    assert {b.name for b in refs.branches} == {"main", "before-fix"}
    assert [(t.name, t.target_commit) for t in refs.tags] == [("v1", first.oid)]


def test_delete_and_pull_request(hub_server: HubServer, model_folder: Path) -> None:
    api = HfApi()
    api.create_repo(REPO)
    kept = upload_folder(repo_id=REPO, folder_path=model_folder)
    api.delete_folder("config", repo_id=REPO)
    api.delete_file("weights.bin", repo_id=REPO)
    assert sorted(list_repo_files(REPO)) == [".gitattributes", "README.md"]
    assert "weights.bin" in list_repo_files(REPO, revision=kept.oid)

    pr = api.upload_file(
        path_or_fileobj=b"proposal", path_in_repo="p.txt", repo_id=REPO, create_pr=True
    )
    assert pr.pr_revision == "refs/pr/1"
    assert _read(hf_hub_download(REPO, "p.txt", revision="refs/pr/1")) == b"proposal"
    assert "p.txt" not in list_repo_files(REPO)


def test_dataset_repo_roundtrip(hub_server: HubServer) -> None:
    api = HfApi()
    api.create_repo("alice/stats", repo_type="dataset")
    api.upload_file(
        path_or_fileobj=BIG[:50_000],
        path_in_repo="tensors.parquet",
        repo_id="alice/stats",
        repo_type="dataset",
    )
    downloaded = hf_hub_download("alice/stats", "tensors.parquet", repo_type="dataset")
    assert _read(downloaded) == BIG[:50_000]
    assert "tensors.parquet" in list_repo_files("alice/stats", repo_type="dataset")
    snapshot = Path(snapshot_download("alice/stats", repo_type="dataset"))
    assert _read(snapshot / "tensors.parquet") == BIG[:50_000]


def test_parent_commit_mismatch_is_rejected(hub_server: HubServer) -> None:
    api = HfApi()
    api.create_repo(REPO)
    stale = hub_server.head(REPO)
    api.upload_file(path_or_fileobj=b"a", path_in_repo="a.txt", repo_id=REPO)
    with pytest.raises(HfHubHTTPError) as excinfo:
        api.upload_file(
            path_or_fileobj=b"b", path_in_repo="b.txt", repo_id=REPO, parent_commit=stale
        )
    assert excinfo.value.response.status_code == 412


# -- search ---------------------------------------------------------------------------------------


def test_search_by_tag_author_and_name(hub_server: HubServer) -> None:
    hub_server.commit_files("alice/dpo-mask", {"README.md": _card("maskhub", "dpo")})
    hub_server.commit_files(
        "bob/ppo-mask", {"README.md": _card("maskhub", "ppo", base_model="org/other")}
    )
    hub_server.commit_files("bob/unrelated", {"README.md": b"no front matter\n"})
    hub_server.commit_files("bob/mask-stats", {"README.md": _card("maskhub")}, repo_type="dataset")

    def ids(**kwargs: object) -> set[str]:
        return {m.id for m in list_models(**kwargs)}  # type: ignore[arg-type]

    assert ids(filter="maskhub") == {"alice/dpo-mask", "bob/ppo-mask"}
    assert ids(filter=["maskhub", "dpo"]) == {"alice/dpo-mask"}
    assert ids(filter="base_model:org/other") == {"bob/ppo-mask"}
    assert ids(author="bob") == {"bob/ppo-mask", "bob/unrelated"}
    assert ids(search="ppo") == {"bob/ppo-mask"}
    assert {d.id for d in list_datasets(filter="maskhub")} == {"bob/mask-stats"}
    (found,) = list_models(filter="dpo", cardData=True)
    assert found.card_data is not None and found.card_data.library_name == "maskhub"


# -- errors and auth ------------------------------------------------------------------------------


def test_not_found_errors_are_the_clients(hub_server: HubServer) -> None:
    hub_server.commit_files(REPO, {"a.txt": b"a"})
    with pytest.raises(RepositoryNotFoundError):
        model_info("nobody/nothing")
    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download("nobody/nothing", "a.txt")
    with pytest.raises(RevisionNotFoundError):
        model_info(REPO, revision="no-such-branch")
    with pytest.raises(RevisionNotFoundError):
        hf_hub_download(REPO, "a.txt", revision="no-such-branch")
    with pytest.raises(EntryNotFoundError):
        hf_hub_download(REPO, "missing.txt")
    with pytest.raises(EntryNotFoundError):
        list(list_repo_tree(REPO, path_in_repo="missing-dir"))


def test_token_required_for_writes_and_private_reads(hub_server_with_token: HubServer) -> None:
    server, anonymous = hub_server_with_token, HfApi(token=False)
    with pytest.raises(HfHubHTTPError) as excinfo:
        anonymous.create_repo(REPO)
    assert excinfo.value.response.status_code == 401
    assert not isinstance(excinfo.value, RepositoryNotFoundError)

    create_repo(REPO)  # HF_TOKEN holds the right token
    commits = server.commit_ids(REPO)
    with pytest.raises(HfHubHTTPError) as excinfo:
        anonymous.upload_file(path_or_fileobj=b"x", path_in_repo="x.txt", repo_id=REPO)
    assert excinfo.value.response.status_code == 401 and server.commit_ids(REPO) == commits
    HfApi().upload_file(path_or_fileobj=b"x", path_in_repo="x.txt", repo_id=REPO)
    assert _read(hf_hub_download(REPO, "x.txt", token=False)) == b"x"  # public: no token needed

    create_repo("alice/private", private=True)
    for api in (anonymous, HfApi(token="wrong")):
        with pytest.raises(RepositoryNotFoundError):
            api.model_info("alice/private")
    assert model_info("alice/private").private is True
    assert HfApi().whoami()["name"] == server.user


@pytest.mark.parametrize("hub_server", [{"require_token": "secret", "user": "bob"}], indirect=True)
def test_fixture_options_by_indirect_parametrization(hub_server: HubServer) -> None:
    assert hub_server.require_token == "secret" and os.environ["HF_TOKEN"] == "secret"
    assert os.environ["HF_ENDPOINT"] == hub_server.url == constants.ENDPOINT
    assert create_repo("x").repo_id == "bob/x"


def test_unexpected_request_is_a_fast_400_and_recorded(hub_server: HubServer) -> None:
    response = httpx2.post(f"{hub_server.url}/api/repos/create", json={"type": "model"})
    assert response.status_code == 400 and "could not handle" in response.json()["error"]
    assert len(hub_server.errors) == 1 and "KeyError" in hub_server.errors[0]
    hub_server.errors.clear()  # else the fixture fails the test at teardown


# -- faults ---------------------------------------------------------------------------------------


def test_resolve_serves_metadata_headers_and_ranges(hub_server: HubServer) -> None:
    oid = hub_server.commit_files(REPO, {"weights.bin": BIG})
    url = f"{hub_server.url}/{REPO}/resolve/main/weights.bin"

    head = httpx2.head(url)
    assert head.headers["X-Repo-Commit"] == oid
    assert head.headers["X-Linked-Etag"] == f'"{hashlib.sha256(BIG).hexdigest()}"'
    assert head.headers["X-Linked-Size"] == head.headers["Content-Length"] == str(len(BIG))
    part = httpx2.get(url, headers={"Range": "bytes=10-19"})
    assert part.status_code == 206 and part.content == BIG[10:20]
    assert part.headers["Content-Range"] == f"bytes 10-19/{len(BIG)}"
    assert httpx2.get(url, headers={"Range": f"bytes={len(BIG)}-"}).status_code == 416


def test_dropped_download_is_resumed_with_a_range(hub_server: HubServer) -> None:
    # The client writes 10 MB chunks: the drop must come after the first one to resume from it.
    chunk = constants.DOWNLOAD_CHUNK_SIZE
    content = random.Random(1).randbytes(2 * chunk + 2)
    hub_server.commit_files(REPO, {"weights.bin": content})
    hub_server.fail_next("download")

    assert _read(hf_hub_download(REPO, "weights.bin")) == content

    gets = [r for r in hub_server.request_log if r.method == "GET" and "/resolve/" in r.path]
    assert [r.status for r in gets] == [None, 206]  # dropped, then resumed with a Range
    assert gets[1].headers["range"] == f"bytes={chunk}-"


def test_truncated_download_raises_and_leaves_no_cache_entry(hub_server: HubServer) -> None:
    hub_server.commit_files(REPO, {"weights.bin": BIG})
    hub_server.fail_next("download_short")

    with pytest.raises(OSError, match="Consistency check failed"):
        hf_hub_download(REPO, "weights.bin")
    storage = Path(constants.HF_HUB_CACHE) / "models--alice--dpo-mask"
    assert not any(path.is_file() for path in (storage / "blobs").glob("*"))
    assert not (storage / "snapshots").exists() or not any((storage / "snapshots").rglob("*.bin"))

    assert _read(hf_hub_download(REPO, "weights.bin")) == BIG


def test_dropped_commit_raises_and_retry_succeeds(
    hub_server: HubServer, model_folder: Path
) -> None:
    create_repo(REPO)
    commits = hub_server.commit_ids(REPO)
    hub_server.fail_next("commit")

    with pytest.raises(httpx2.TransportError):
        upload_folder(repo_id=REPO, folder_path=model_folder)
    assert hub_server.commit_ids(REPO) == commits

    info = upload_folder(repo_id=REPO, folder_path=model_folder)
    assert hub_server.commit_ids(REPO) == [info.oid, *commits]
    assert _count(hub_server, "PUT", "/lfs-upload/") == 1  # the LFS object was kept
    assert _read(hf_hub_download(REPO, "weights.bin")) == BIG


def test_lost_commit_response_then_retry_is_a_no_op(
    hub_server: HubServer, model_folder: Path
) -> None:
    create_repo(REPO)
    hub_server.fail_next("commit_response")
    with pytest.raises(httpx2.TransportError):
        upload_folder(repo_id=REPO, folder_path=model_folder)
    commits = hub_server.commit_ids(REPO)

    info = upload_folder(repo_id=REPO, folder_path=model_folder)

    assert info.oid == commits[0] and hub_server.commit_ids(REPO) == commits


def test_dropped_lfs_upload_is_retried_by_the_client(
    hub_server: HubServer, model_folder: Path
) -> None:
    create_repo(REPO)
    hub_server.fail_next("upload")

    upload_folder(repo_id=REPO, folder_path=model_folder)

    puts = [r.status for r in hub_server.request_log if r.method == "PUT"]
    assert puts == [None, 200]
    assert hub_server.file_bytes(REPO, "weights.bin") == BIG


def test_tamper_serves_other_bytes_under_the_same_metadata(hub_server: HubServer) -> None:
    oid = hub_server.commit_files(REPO, {"weights.bin": BIG})
    corrupted = bytes([BIG[0] ^ 0xFF]) + BIG[1:]

    hub_server.tamper(REPO, "weights.bin", corrupted)

    (sibling,) = [s for s in model_info(REPO).siblings or [] if s.rfilename == "weights.bin"]
    assert sibling.lfs is not None and sibling.lfs.sha256 == hashlib.sha256(BIG).hexdigest()
    downloaded = _read(hf_hub_download(REPO, "weights.bin"))
    assert downloaded == corrupted  # the client checks sizes, not hashes
    assert hashlib.sha256(downloaded).hexdigest() != sibling.lfs.sha256
    assert hub_server.head(REPO) == oid  # no commit was made
