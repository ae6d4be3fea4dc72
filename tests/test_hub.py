"""maskhub push / pull / search against the test Hub server, with the real huggingface_hub
client (no mocks): round trips with identical bits, pinned revisions, search, every bad-input
case of issue 5, dropped connections, auth and offline mode."""

from __future__ import annotations

import hashlib
import json
from dataclasses import replace
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner, Result
from factory import llama_shapes, plant_updates, random_state, save
from hubserver import HubServer, parse_card
from huggingface_hub import HfApi, constants, hf_hub_download

from maskhub import Mask, Registry
from maskhub.cli import main

pytest_plugins = ["hub_fixture"]
# The client's LFS upload passes raw bytes the way httpx2 deprecates; not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:Use 'content=<...>'.*:DeprecationWarning")

REPO = "alice/tulu-dpo-mask"
TOKEN = "hf_maskhub_write_token_0123456789"


# -- helpers ---------------------------------------------------------------------------------


def cli(*args: str, ok: bool = True) -> Result:
    res = CliRunner().invoke(main, list(args))
    if ok:
        assert res.exit_code == 0, res.output
    return res


def error_line(res: Result) -> str:
    """The one ``Error:`` line of a command that failed cleanly (exit 1, no traceback)."""
    assert res.exit_code == 1, res.output
    assert isinstance(res.exception, SystemExit) and "Traceback" not in res.output
    lines = [ln for ln in res.stderr.splitlines() if ln.startswith("Error: ")]
    assert len(lines) == 1 and res.stdout == "", res.output
    return lines[0]


def fails(*args: str) -> str:
    """Run a command that must fail with one clean line on stderr; return that line."""
    return error_line(cli(*args, ok=False))


def new_home(monkeypatch: pytest.MonkeyPatch, path: Path) -> Registry:
    monkeypatch.setenv("MASKHUB_HOME", str(path))
    return Registry(path)


def diff_mask(tmp_path: Path, name: str, *, density: float = 0.2, seed: int = 0,
              algorithm: str = "dpo", base_model: str | None = "org/base-7b",
              drop: tuple[str, ...] = ()) -> Mask:
    """Diff a planted pair into the current home (``drop``: tensors left out)."""
    shapes = {k: v for k, v in llama_shapes().items() if k not in drop}
    base = random_state(shapes, seed=seed)
    target, _ = plant_updates(base, density, seed + 1)
    root = tmp_path / f"ck-{name}"
    b, t = save(base, root / "base"), save(target, root / "target")
    return Registry().diff(b, t, name=name, algorithm=algorithm, seed=seed,
                           base_model=base_model, sweep=(0, 1e-6))


def assert_same_mask(a: Mask, b: Mask) -> None:
    """Identical bits (every tensor's packed bytes), stats and metadata; ``b``, pulled, has
    its ``hub_repo`` attribute naming the repo it was published to."""
    assert a.tensor_names() == b.tensor_names()
    for t in a.tensor_names():
        assert a.packed(t).tobytes() == b.packed(t).tobytes(), t
    assert a.tensor_stats() == b.tensor_stats()
    assert b.metadata.hub_repo is not None
    assert b.metadata == replace(a.metadata, hub_repo=b.metadata.hub_repo)


def masks_in(home: Path) -> list[dict]:
    return Registry(home).ls()


def snapshot(hf_home: Path, repo: str, sha: str) -> Path:
    return hf_home / "hub" / f"models--{repo.replace('/', '--')}" / "snapshots" / sha


def crafted_repo(server: HubServer, src: str, dst: str, edit) -> str:
    """Copy ``src``'s maskhub files into a new repo ``dst`` after ``edit(files, manifest)``,
    with maskhub.json's checksums recomputed for the edited files. Returns the commit."""
    manifest = json.loads(server.file_bytes(src, "maskhub.json"))
    files = {p: server.file_bytes(src, p) for p in manifest["files"]}
    edit(files, manifest)
    for p, data in files.items():
        if p in manifest["files"]:
            manifest["files"][p] = {"sha256": hashlib.sha256(data).hexdigest(),
                                    "size": len(data)}
    files["maskhub.json"] = json.dumps(manifest, indent=2, sort_keys=True).encode()
    return server.commit_files(dst, files)


def edit_json(files: dict[str, bytes], path: str, fn) -> None:
    doc = json.loads(files[path])
    fn(doc)
    files[path] = json.dumps(doc).encode()


@pytest.fixture
def pushed(hub_server: HubServer, tmp_path: Path) -> Mask:
    """A mask pushed to REPO from the default home."""
    mask = diff_mask(tmp_path, "tulu-dpo")
    mask.push_to_hub(REPO)
    return mask


# -- round trips -----------------------------------------------------------------------------


def test_push_pull_roundtrip_identical_bits_stats_metadata(
        hub_server: HubServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        maskhub_home: Path) -> None:
    mask = diff_mask(tmp_path, "tulu-dpo")
    res = json.loads(cli("push", "tulu-dpo", REPO, "--license", "apache-2.0", "--json").stdout)
    head = hub_server.head(REPO)
    assert hub_server.commit_ids(REPO)[0] == head and len(hub_server.commit_ids(REPO)) == 2
    assert res["changed"] is True and res["commit"] == head
    assert (res["repo_id"], res["branch"], res["name"]) == (REPO, "main", "tulu-dpo")
    row = Registry().get("tulu-dpo").row
    assert (row["hub_repo"], row["hub_revision"]) == (REPO, head)

    # Layout: the store, maskhub.json with every other file's sha256, parquet, card.
    files = set(HfApi().list_repo_files(REPO))
    store = {f"mask.zarr/{p.relative_to(mask.path).as_posix()}"
             for p in mask.path.rglob("*") if p.is_file()}
    assert files == {".gitattributes", "README.md", "maskhub.json", "tensors.parquet", *store}
    assert res["files"] == len(files) - 1
    manifest = json.loads(hub_server.file_bytes(REPO, "maskhub.json"))
    assert manifest["schema_version"] == 1 and manifest["kind"] == "maskhub.hub-repo"
    assert manifest["mask"]["id"] == mask.id and manifest["mask"]["format_version"] == 1
    assert set(manifest["files"]) == files - {".gitattributes", "maskhub.json"}
    for p, entry in manifest["files"].items():
        data = hub_server.file_bytes(REPO, p)
        assert entry == {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}

    card_bytes = hub_server.file_bytes(REPO, "README.md")
    card = parse_card(card_bytes)
    assert card["library_name"] == "maskhub" and card["license"] == "apache-2.0"
    assert card["tags"] == ["maskhub", "update-mask", "dpo"]
    assert card["base_model"] == "org/base-7b"
    assert card["maskhub"]["n_updated"] == mask.n_updated
    body = card_bytes.decode()
    assert f'mask = Mask.from_hub("{REPO}")' in body and "from maskhub import Mask" in body
    assert "from maskhub.torch import apply_mask" in body and "apply_mask(model, mask)" in body
    q = [s for s in mask.tensor_stats() if s.module == "self_attn.q_proj"]
    q_upd = sum(s.n_updated for s in q)
    q_line = f"| self_attn.q_proj | 2 | {sum(s.numel for s in q):,} | {q_upd:,} |"
    assert q_line in body

    rows = pq.read_table(pa.BufferReader(hub_server.file_bytes(REPO, "tensors.parquet")))
    rows = rows.to_pylist()
    assert [(r["tensor"], tuple(r["shape"]), r["n_updated"]) for r in rows] == [
        (s.tensor, s.shape, s.n_updated) for s in mask.tensor_stats()]
    assert [s["tol"] for s in rows[0]["sweep"]] == [0.0, 1e-6]

    # Pushing the unchanged mask again uploads nothing and makes no commit.
    again = json.loads(cli("push", "tulu-dpo", REPO, "--json").stdout)
    assert again["changed"] is False and again["commit"] == head
    assert len(hub_server.commit_ids(REPO)) == 2
    assert "unchanged" in cli("push", "tulu-dpo", REPO).output

    # Pull into a fresh home: identical bits, stats (show includes the sweep), metadata.
    shown = cli("show", "tulu-dpo", "--json").stdout
    assert len(json.loads(shown)["sweep"]) == 2  # the sweep travels in tensors.parquet
    new_home(monkeypatch, tmp_path / "fresh")
    got = json.loads(cli("pull", REPO, "--json").stdout)
    assert got["status"] == "registered" and got["commit"] == head
    assert (got["name"], got["id"], got["n_updated"]) == ("tulu-dpo", mask.id, mask.n_updated)
    pulled = Registry().get("tulu-dpo")
    assert_same_mask(mask, pulled)
    assert (mask.metadata.hub_repo, pulled.metadata.hub_repo) == (None, REPO)
    assert json.loads(hub_server.file_bytes(REPO, "mask.zarr/zarr.json"))["attributes"] == \
        {**json.loads((mask.path / "zarr.json").read_text())["attributes"], "hub_repo": REPO}
    assert pulled.row == Registry(maskhub_home).get("tulu-dpo").row
    assert cli("show", "tulu-dpo", "--json").stdout == shown
    strata = "select tensor, stratum, numel, n_updated from tensor_strata order by 1, 2"
    here, there = Registry().sql(strata)[1], Registry(maskhub_home).sql(strata)[1]
    assert here == there and len(here) > len(mask.tensor_names())  # magnitude strata travel
    null = "select tensor, max_abs_update, n_null, n_null_updated, sparsity_movable from tensors"
    null_here, null_there = Registry().sql(null + " order by 1")[1], Registry(maskhub_home).sql(
        null + " order by 1")[1]
    assert null_here == null_there and all(r[2] is not None for r in null_here)  # and the null
    assert rows[0]["strata"] == [{"stratum": s, "numel": n, "n_updated": u}
                                 for t, s, n, u in there if t == rows[0]["tensor"]]

    # The same commit again: a no-op that downloads nothing.
    before = len(hub_server.requests)
    again = json.loads(cli("pull", f"{REPO}@{head}", "--json").stdout)
    assert again["status"] == "already registered" and again["id"] == mask.id
    assert not [r for r in hub_server.requests[before:] if r[0] == "GET"]
    assert len(masks_in(tmp_path / "fresh")) == 1
    text = cli("pull", REPO).output
    assert "already registered" in text and head[:12] in text


def test_rank_and_stats_travel_with_the_mask(hub_server: HubServer, tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """`diff --rank --stats` rows go into tensors.parquet on push and back into
    tensor_analysis on pull, identical."""
    base = random_state(llama_shapes(), seed=3)
    target, _ = plant_updates(base, 0.3, 4)
    b, t = save(base, tmp_path / "ck" / "base"), save(target, tmp_path / "ck" / "target")
    cli("diff", str(b), str(t), "--name", "ranked", "--rank", "--stats")
    cli("push", "ranked", "alice/ranked-mask")
    query = ("select tensor, rank, max_rank, rank_fraction, rank_rtol, sign_flips, "
             "mean_abs_delta, max_abs_delta, mean_rel_delta, max_rel_delta, n_sub_bf16_step "
             "from tensor_analysis order by tensor")
    before = cli("sql", query, "--json").stdout
    shown = json.loads(cli("show", "ranked", "--json").stdout)["analysis"]
    assert shown["n_rank_tensors"] > 0 and shown["sign_flips"] > 0
    rows = pq.read_table(pa.BufferReader(hub_server.file_bytes("alice/ranked-mask",
                                                               "tensors.parquet"))).to_pylist()
    assert all(r["analysis"]["sign_flips"] is not None for r in rows)
    new_home(monkeypatch, tmp_path / "fresh")
    cli("pull", "alice/ranked-mask")
    assert cli("sql", query, "--json").stdout == before
    assert json.loads(cli("show", "ranked", "--json").stdout)["analysis"] == shown


def test_training_resolves_a_hub_repo_id_by_pulling_it(pushed: Mask, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """``apply_mask(model, "org/name")`` and friends: the training side fetches the mask
    through the same verified pull, into the given home."""
    from maskhub.training.mask_sources import resolve_mask

    fresh = tmp_path / "fresh-training-home"
    mask = resolve_mask(REPO, home=fresh)
    assert_same_mask(pushed, mask)
    assert [r["name"] for r in Registry(fresh).ls()] == ["tulu-dpo"]
    assert resolve_mask("tulu-dpo", home=fresh).id == mask.id  # then by name, no network


def test_pin_older_revision_after_second_push(pushed: Mask, hub_server: HubServer,
                                              tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    first = hub_server.head(REPO)
    other = diff_mask(tmp_path, "grpo-run", density=0.05, seed=7, algorithm="grpo",
                      drop=("lm_head.weight",))
    res = other.push_to_hub(REPO, commit_message="second mask")
    assert res.changed and hub_server.commit_ids(REPO)[:2] == [res.commit, first]
    files = HfApi().list_repo_files(REPO)
    assert not [f for f in files if f.startswith("mask.zarr/lm_head.weight/")]  # stale: deleted

    new_home(monkeypatch, tmp_path / "fresh")
    old = Mask.from_hub(f"{REPO}@{first[:10]}")
    assert_same_mask(pushed, old)
    assert old.row["hub_revision"] == first
    new = Mask.from_hub(REPO)
    assert_same_mask(other, new)
    assert new.row["hub_revision"] == res.commit and new.name == "grpo-run"


def test_push_branch_and_dataset_repo(pushed: Mask, hub_server: HubServer, tmp_path: Path,
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    main_head = hub_server.head(REPO)
    res = cli("push", "tulu-dpo", REPO, "--revision", "exp", "--commit-message", "on a branch")
    assert f"tulu-dpo is unchanged on {REPO}@exp: no new commit" in res.stdout
    assert hub_server.head(REPO, "exp") == main_head  # same files: branch made, no commit
    other = diff_mask(tmp_path, "other", seed=5)
    res = json.loads(cli("push", "other", REPO, "--revision", "exp", "--json").stdout)
    assert res["changed"] and hub_server.head(REPO, "exp") == res["commit"]
    assert hub_server.head(REPO) == main_head  # main untouched
    assert other.row["hub_repo"] is None and Registry().get("other").row["hub_repo"] == REPO

    monkeypatch.setenv("HF_TOKEN", "hf_any_token")  # private repos need one to be read
    ds = pushed.push_to_hub("alice/masks", repo_type="dataset", private=True)
    assert ds.repo_type == "dataset" and ds.commit == hub_server.head("alice/masks",
                                                                      repo_type="dataset")
    card = hub_server.file_bytes("alice/masks", "README.md", repo_type="dataset").decode()
    assert 'Mask.from_hub("alice/masks", repo_type="dataset")' in card
    assert Registry().get("tulu-dpo").row["hub_repo"] == "datasets/alice/masks"

    new_home(monkeypatch, tmp_path / "fresh")
    got = Mask.from_hub("alice/masks", repo_type="dataset", name="from-ds")
    assert_same_mask(pushed, got)
    assert (got.name, got.row["hub_repo"]) == ("from-ds", "datasets/alice/masks")
    assert Registry().pull(REPO, "exp").mask.name == "other"  # the branch's mask
    same = Registry().pull(REPO)  # main holds the mask already pulled from the dataset repo
    assert same.status == "already registered" and same.mask.name == "from-ds"
    assert same.notes == (f"this mask (id {pushed.id[:12]}) is already registered as 'from-ds'",)
    assert sorted(r["name"] for r in Registry().ls()) == ["from-ds", "other"]


def test_a_card_publishes_hub_ids_and_given_names_never_local_paths(
        hub_server: HubServer, tmp_path: Path) -> None:
    local = diff_mask(tmp_path, "local-run", base_model=None)
    assert local.row["base_model"].startswith(str(tmp_path))  # recorded: the local path
    local.push_to_hub("bob/local-run")
    card = hub_server.file_bytes("bob/local-run", "README.md").decode()
    assert str(tmp_path) not in card and "ck-local-run" not in card
    meta = parse_card(card.encode())
    assert "base_model" not in meta and "base_model_relation" not in meta
    assert "datasets" not in meta
    assert {k: v for k, v in meta["maskhub"].items() if "model" in k or k == "dataset"} == {}
    assert "Which parameters the dpo fine-tuning changed: a boolean mask" in card

    shapes = llama_shapes()
    base = random_state(shapes)
    target, _ = plant_updates(base, 0.2, 1)
    b, t = save(base, tmp_path / "b"), save(target, tmp_path / "t")
    Registry().diff(b, t, name="named", base_model="org/base-7b", target_model="my-grpo-run",
                    dataset="org/math-prefs", algorithm="grpo").push_to_hub("bob/named")
    card = hub_server.file_bytes("bob/named", "README.md").decode()
    assert str(tmp_path) not in card
    meta = parse_card(card.encode())
    assert (meta["base_model"], meta["datasets"]) == ("org/base-7b", ["org/math-prefs"])
    assert "base_model_relation" not in meta  # a mask is not an adapter, merge, quantization
    # issue 26: the install line is true for this project (its package metadata has no
    # index name or URL), and the snippet is Python that loads the base, pulls and trains
    assert "pip install maskhub" not in card and "github.com/maskhub" not in card
    assert "# maskhub 0.1.0 is not published on a package index" in card
    assert "it is not itself a PEFT adapter, and reading it needs maskhub" in card
    # issue 26: the card's PEFT route is plain PEFT after one export (tests/test_peft_export)
    meta_id = meta["maskhub"]["mask_id"]
    assert f"maskhub pull bob/named\nmaskhub export {meta_id[:12]} named-shira --peft" in card
    peft_snippet = card.split("```python\n")[2].split("```", 1)[0]
    compile(peft_snippet, "card-peft-snippet", "exec")
    assert ('model = PeftModel.from_pretrained(model, "named-shira", is_trainable=True)'
            in peft_snippet)
    snippet = card.split("```python\n", 1)[1].split("```", 1)[0]
    compile(snippet, "card-snippet", "exec")
    assert ('model = AutoModelForCausalLM.from_pretrained("org/base-7b", '
            'torch_dtype=torch.bfloat16)') in snippet
    assert 'mask = Mask.from_hub("bob/named")\napply_mask(model, mask)' in snippet
    assert {k: meta["maskhub"][k] for k in ("base_model", "target_model", "dataset")} == {
        "base_model": "org/base-7b", "target_model": "my-grpo-run",
        "dataset": "org/math-prefs"}
    assert ("Which parameters the grpo fine-tuning of `my-grpo-run` changed, relative to "
            "`org/base-7b`: a boolean mask") in card
    assert "| fine-tuned model | `my-grpo-run` |" in card


def test_search_by_base_model_and_algorithm(pushed: Mask, hub_server: HubServer,
                                            tmp_path: Path) -> None:
    diff_mask(tmp_path, "grpo-local", algorithm="GRPO", base_model=None).push_to_hub(
        "bob/grpo-mask")
    hub_server.commit_files("carol/plain-model", {"README.md": b"---\ntags: [dpo]\n---\n# x"})

    hits = json.loads(cli("search", "--json").stdout)
    assert sorted(h["repo_id"] for h in hits) == ["alice/tulu-dpo-mask", "bob/grpo-mask"]
    dpo = next(h for h in hits if h["repo_id"] == REPO)
    assert (dpo["algorithm"], dpo["base_model"], dpo["n_params"]) == (
        "dpo", "org/base-7b", pushed.n_params)
    assert dpo["sparsity"] == round(pushed.sparsity, 6)
    grpo = next(h for h in hits if h["repo_id"] == "bob/grpo-mask")
    assert grpo["base_model"] is None  # a local base path is not a Hub id: no base_model
    assert "base_model" not in parse_card(hub_server.file_bytes("bob/grpo-mask", "README.md"))

    def ids(*args: str) -> list[str]:
        return [h["repo_id"] for h in json.loads(cli("search", *args, "--json").stdout)]

    assert ids("--algorithm", "grpo") == ["bob/grpo-mask"]
    assert ids("--algorithm", "dpo") == [REPO]
    assert ids("--base-model", "org/base-7b") == [REPO]
    assert ids("--base-model", "org/base-7b", "--algorithm", "grpo") == []
    assert ids("--limit", "1") in (["bob/grpo-mask"], [REPO])
    table = cli("search", "--algorithm", "dpo").output
    assert REPO in table and "org/base-7b" in table and "%" in table
    assert "no mask repos found" in cli("search", "--algorithm", "ppo").stderr


# -- bad input: each refused with one line, nothing registered -------------------------------


@pytest.mark.parametrize(("ref", "message"), [
    ("nobody/nothing", "Hub repo nobody/nothing not found"),
    (f"{REPO}@no-such-branch", "revision 'no-such-branch' not found in Hub repo " + REPO),
    (f"{REPO}@{'0' * 40}", f"revision '{'0' * 40}' not found"),
], ids=["repo", "branch", "commit"])
def test_pull_unknown_repo_or_revision(pushed: Mask, ref: str, message: str, tmp_path: Path,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    new_home(monkeypatch, tmp_path / "fresh")
    assert message in fails("pull", ref)
    assert masks_in(tmp_path / "fresh") == []


@pytest.mark.parametrize(("files", "message"), [
    ({"config.json": b"{}", "README.md": b"# a model\n"}, "it has no maskhub.json"),
    ({"maskhub.json": b"not json at all"}, "is not a maskhub repo manifest"),
    ({"maskhub.json": b'{"kind": "something-else"}'}, "is not a maskhub repo manifest"),
], ids=["no-manifest", "not-json", "other-kind"])
def test_pull_repo_that_is_not_a_mask(hub_server: HubServer, files: dict[str, bytes],
                                      message: str, maskhub_home: Path) -> None:
    hub_server.commit_files("bob/model", files)
    line = fails("pull", "bob/model")
    assert "bob/model" in line and "is not a maskhub mask" in line and message in line
    assert masks_in(maskhub_home) == []


def _first_chunk(mask: Mask) -> str:
    name = "model.layers.0.self_attn.q_proj.weight"
    assert mask.n_updated and (mask.path / name / "c" / "0").is_file()
    return f"mask.zarr/{name}/c/0"


def test_pull_refuses_strata_that_do_not_add_up(pushed: Mask, hub_server: HubServer,
                                                tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    def edit(files: dict[str, bytes], manifest: dict) -> None:
        rows = pq.read_table(pa.BufferReader(files["tensors.parquet"]))
        table = rows.to_pylist()
        table[1]["strata"][0]["n_updated"] += 1
        sink = pa.BufferOutputStream()
        pq.write_table(pa.Table.from_pylist(table, schema=rows.schema), sink)
        files["tensors.parquet"] = sink.getvalue().to_pybytes()

    crafted_repo(hub_server, REPO, "mallory/strata", edit)
    home = new_home(monkeypatch, tmp_path / "fresh").home
    line = fails("pull", "mallory/strata")
    name = pushed.tensor_names()[1]
    assert line.startswith("Error: Hub repo mallory/strata@")
    assert line.endswith(f"tensors.parquet has magnitude strata for {name!r} that do not add "
                         "up to its counts")
    assert masks_in(home) == []


@pytest.mark.parametrize("which", ["chunk", "array-metadata", "maskhub.json"])
def test_pull_tampered_file_is_refused_evicted_and_retry_succeeds(
        pushed: Mask, hub_server: HubServer, tmp_path: Path, which: str,
        monkeypatch: pytest.MonkeyPatch) -> None:
    path = {"chunk": _first_chunk(pushed),
            "array-metadata": "mask.zarr/model.norm.weight/zarr.json",
            "maskhub.json": "maskhub.json"}[which]
    good = hub_server.file_bytes(REPO, path)
    bad = bytearray(good)
    bad[len(bad) // 2] ^= 0x01  # same length: only a sha256 check can tell
    hub_server.tamper(REPO, path, bytes(bad))
    home = new_home(monkeypatch, tmp_path / "fresh").home

    line = fails("pull", REPO)
    if which == "maskhub.json":
        assert "the downloaded maskhub.json does not match the Hub's checksum" in line
    else:
        assert f"checksum mismatch for {path}" in line and "a retry downloads it again" in line
    assert masks_in(home) == [] and not list((home / "tmp").glob("*"))
    cached = snapshot(Path(constants.HF_HOME), REPO, hub_server.head(REPO)) / path
    assert not cached.exists() and not cached.is_symlink()  # no corrupt cache entry left
    assert fails("pull", REPO) == line  # still refused: the bad bytes are not trusted

    hub_server.tamper(REPO, path, good)  # the server is fixed
    assert json.loads(cli("pull", REPO, "--json").stdout)["status"] == "registered"
    assert_same_mask(pushed, Registry().get("tulu-dpo"))


def test_pull_missing_file(pushed: Mask, hub_server: HubServer, tmp_path: Path,
                           monkeypatch: pytest.MonkeyPatch) -> None:
    chunk = _first_chunk(pushed)
    hub_server.commit_files(REPO, {}, delete=[chunk])
    new_home(monkeypatch, tmp_path / "fresh")
    line = fails("pull", REPO)
    assert f"{chunk} is listed in maskhub.json but missing from the repo" in line
    assert masks_in(tmp_path / "fresh") == []


@pytest.mark.parametrize("what", ["count", "shape", "total"])
def test_pull_arrays_that_disagree_with_metadata(pushed: Mask, hub_server: HubServer,
                                                 what: str, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    name = "model.layers.0.self_attn.q_proj.weight"
    st = next(s for s in pushed.tensor_stats() if s.tensor == name)

    def edit(files: dict[str, bytes], manifest: dict) -> None:
        def change(doc: dict) -> None:
            attrs = doc["attributes"]
            if what == "count":
                attrs["n_updated"] += 1
            elif what == "shape":
                attrs["shape"], attrs["numel"] = [16, 17], 272
            else:
                attrs["n_params"] += 8
        target = f"mask.zarr/{name}/zarr.json" if what != "total" else "mask.zarr/zarr.json"
        edit_json(files, target, change)
        if what == "total":  # keep maskhub.json's copy of the metadata consistent
            manifest["mask"]["n_params"] += 8

    crafted_repo(hub_server, REPO, "mallory/bad", edit)
    home = new_home(monkeypatch, tmp_path / "fresh").home
    line = fails("pull", "mallory/bad")
    assert "Hub repo mallory/bad@" in line and "(mask.zarr)" in line
    if what == "count":
        assert (f"array {name!r} has {st.n_updated} set bits, its metadata says "
                f"{st.n_updated + 1}") in line
    elif what == "shape":
        assert f"array {name!r} has shape (32,), its metadata says 272 entries" in line
    else:
        assert f"the metadata says {pushed.n_params + 8}" in line
    assert masks_in(home) == [] and not list((home / "tmp").glob("*"))


@pytest.mark.parametrize(("field", "message"), [
    ("schema_version", "repo schema_version 99; this maskhub reads up to 1 (upgrade maskhub)"),
    ("format_version", "mask format_version 99; this maskhub reads up to 1 (upgrade maskhub)"),
], ids=["schema_version", "format_version"])
def test_pull_format_from_the_future(pushed: Mask, hub_server: HubServer, field: str,
                                     message: str, tmp_path: Path,
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    def edit(files: dict[str, bytes], manifest: dict) -> None:
        (manifest if field == "schema_version" else manifest["mask"])[field] = 99
        if field == "format_version":
            edit_json(files, "mask.zarr/zarr.json",
                      lambda d: d["attributes"].__setitem__("format_version", 99))

    crafted_repo(hub_server, REPO, "future/mask", edit)
    home = new_home(monkeypatch, tmp_path / "fresh").home
    assert message in fails("pull", "future/mask")
    assert masks_in(home) == []


@pytest.mark.parametrize(("field", "value", "message"), [
    ("n_params", "many", "bad mask metadata: n_params has the wrong type"),
    ("created_at", "last tuesday", "the mask metadata cannot be indexed: Conversion Error"),
], ids=["type", "unindexable"])
def test_pull_malformed_metadata(pushed: Mask, hub_server: HubServer, field: str, value: str,
                                 message: str, tmp_path: Path,
                                 monkeypatch: pytest.MonkeyPatch) -> None:
    def edit(files: dict[str, bytes], manifest: dict) -> None:
        manifest["mask"][field] = value  # the store's copy too, so only the value is wrong
        edit_json(files, "mask.zarr/zarr.json",
                  lambda d: d["attributes"].__setitem__(field, value))

    crafted_repo(hub_server, REPO, "mallory/odd", edit)
    home = new_home(monkeypatch, tmp_path / "fresh").home
    line = fails("pull", "mallory/odd")
    assert line.startswith("Error: Hub repo mallory/odd@") and message in line
    assert masks_in(home) == [] and not list((home / "tmp").glob("*"))
    assert not list((home / "masks").glob("*"))


@pytest.mark.parametrize(("how", "message"), [
    ("manifest-dotdot", "refusing maskhub.json file path '../../evil.txt'"),
    ("manifest-absolute", "refusing maskhub.json file path '/tmp/evil.txt'"),
    ("listing", "refusing repo file path 'mask.zarr/../../evil.txt'"),
    ("tensor-name", "refusing tensor path '../../evil'"),
    ("mask-id", "invalid mask id '../../evil'"),
], ids=["manifest-dotdot", "manifest-absolute", "listing", "tensor-name", "mask-id"])
def test_pull_paths_that_try_to_escape(pushed: Mask, hub_server: HubServer, tmp_path: Path,
                                       how: str, message: str,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    def edit(files: dict[str, bytes], manifest: dict) -> None:
        if how == "manifest-dotdot":
            manifest["files"]["../../evil.txt"] = {"sha256": "0" * 64, "size": 1}
        elif how == "manifest-absolute":
            manifest["files"]["/tmp/evil.txt"] = {"sha256": "0" * 64, "size": 1}
        elif how == "listing":
            files["mask.zarr/../../evil.txt"] = b"x"
        elif how == "tensor-name":
            manifest["mask"]["tensors"].append("../../evil")
        else:
            manifest["mask"]["id"] = "../../evil"

    crafted_repo(hub_server, REPO, "mallory/escape", edit)
    home = new_home(monkeypatch, tmp_path / "fresh").home
    line = fails("pull", "mallory/escape")
    assert line.startswith("Error: Hub repo mallory/escape@") and message in line
    assert ("it would escape the target directory" in line) == (how != "mask-id")
    assert masks_in(home) == []
    assert not list(tmp_path.rglob("evil*")) and not list(Path(constants.HF_HOME).rglob("evil*"))


# -- dropped connections, auth, offline ------------------------------------------------------


@pytest.mark.parametrize("fault", ["commit", "commit_response"])
def test_push_connection_dropped_then_retry(hub_server: HubServer, tmp_path: Path,
                                            fault: str) -> None:
    mask = diff_mask(tmp_path, "tulu-dpo")
    HfApi().create_repo(REPO)
    before = hub_server.commit_ids(REPO)
    hub_server.fail_next(fault)
    line = fails("push", "tulu-dpo", REPO)
    assert line.startswith(f"Error: {REPO}@main: network error talking to the Hub: ")
    assert line.endswith("(nothing was recorded; push again: it uploads only what the Hub "
                         "lacks and makes no commit if the mask is already there)")
    assert Registry().get("tulu-dpo").row["hub_repo"] is None  # not recorded as pushed
    made = hub_server.commit_ids(REPO)
    assert made == before if fault == "commit" else made[1:] == before

    res = json.loads(cli("push", "tulu-dpo", REPO, "--json").stdout)
    assert res["changed"] is (fault == "commit")
    assert hub_server.commit_ids(REPO) == [res["commit"], *before]  # exactly one commit
    row = Registry().get("tulu-dpo").row
    assert (row["hub_repo"], row["hub_revision"]) == (REPO, res["commit"])
    assert mask.id == row["id"]


@pytest.mark.parametrize("fault", ["download", "download_short"])
def test_pull_connection_dropped(pushed: Mask, hub_server: HubServer, tmp_path: Path,
                                 fault: str, monkeypatch: pytest.MonkeyPatch) -> None:
    hf_hub_download(REPO, "maskhub.json")  # cached: the fault hits a file of the store
    home = new_home(monkeypatch, tmp_path / "fresh").home
    hub_server.fail_next(fault)
    if fault == "download":  # the client resumes with a Range request: transparent
        got = json.loads(cli("pull", REPO, "--json").stdout)
    else:
        line = fails("pull", REPO)
        assert "network error talking to the Hub" in line and "Consistency check" in line
        assert masks_in(home) == [] and not list((home / "tmp").glob("*"))
        got = json.loads(cli("pull", REPO, "--json").stdout)
    assert got["status"] == "registered"
    assert_same_mask(pushed, Registry().get("tulu-dpo"))
    gets = [p for m, p in hub_server.requests if m == "GET" and "/resolve/" in p]
    again = {p for p in gets if gets.count(p) > 1}
    assert len(again) == 1 and "/mask.zarr/" in again.pop()  # the fault hit a store file


@pytest.mark.parametrize("hub_server", [{"require_token": TOKEN}], indirect=True)
@pytest.mark.parametrize("token", [None, "hf_wrong_secret_value_42"])
def test_push_without_valid_token(hub_server: HubServer, tmp_path: Path, token: str | None,
                                  monkeypatch: pytest.MonkeyPatch) -> None:
    diff_mask(tmp_path, "tulu-dpo")
    if token is None:
        monkeypatch.delenv("HF_TOKEN")
    else:
        monkeypatch.setenv("HF_TOKEN", token)
    res = cli("push", "tulu-dpo", REPO, ok=False)
    line = error_line(res)
    assert line == (f"Error: the Hub refused to write to {REPO} (HTTP 401): set HF_TOKEN to a "
                    "token with write access to it, or log in with `hf auth login`")
    assert TOKEN not in res.output and (token is None or token not in res.output)
    assert Registry().get("tulu-dpo").row["hub_repo"] is None

    monkeypatch.setenv("HF_TOKEN", TOKEN)
    ok = cli("push", "tulu-dpo", REPO, "--private")
    assert TOKEN not in ok.output and "pushed tulu-dpo" in ok.output


def test_offline_pull_of_cached_revision_and_offline_push(
        pushed: Mask, hub_server: HubServer, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    head = hub_server.head(REPO)
    new_home(monkeypatch, tmp_path / "online")
    cli("pull", REPO)  # fills the Hugging Face cache

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    served = len(hub_server.requests)
    for i, ref in enumerate([f"{REPO}@{head}", REPO]):
        home = new_home(monkeypatch, tmp_path / f"offline{i}").home
        got = json.loads(cli("pull", ref, "--json").stdout)
        assert (got["status"], got["commit"]) == ("registered", head)
        assert_same_mask(pushed, Registry().get("tulu-dpo"))
        assert [r["hub_revision"] for r in masks_in(home)] == [head]
    assert len(hub_server.requests) == served  # nothing went to the network

    line = fails("push", "tulu-dpo", "alice/other")
    assert "cannot push to alice/other: HF_HUB_OFFLINE is set" in line
    assert "HF_HUB_OFFLINE is set" in fails("pull", "alice/never-pulled")
    assert "HF_HUB_OFFLINE is set" in fails("search")
    assert len(hub_server.requests) == served


def test_pull_name_clash_and_name_option(pushed: Mask, hub_server: HubServer, tmp_path: Path,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    new_home(monkeypatch, tmp_path / "fresh")
    diff_mask(tmp_path, "tulu-dpo", seed=3)  # a different local mask with the same name
    res = cli("pull", REPO)
    assert "a mask named 'tulu-dpo' already exists: registered this one as 'tulu-dpo-2'" in (
        " ".join(res.stderr.split()))
    assert "registered tulu-dpo-2" in res.output
    assert_same_mask(pushed, Registry().get("tulu-dpo-2"))

    new_home(monkeypatch, tmp_path / "third")
    diff_mask(tmp_path, "mine", seed=4)
    assert "a mask named 'mine' already exists" in fails("pull", REPO, "--name", "mine")
    assert "invalid mask name 'a/b'" in fails("pull", REPO, "--name", "a/b")
    assert len(masks_in(tmp_path / "third")) == 1
    assert json.loads(cli("pull", REPO, "--name", "theirs", "--json").stdout)["name"] == "theirs"


def test_bad_repo_arguments(maskhub_home: Path, tmp_path: Path) -> None:
    diff_mask(tmp_path, "m")
    assert "invalid Hub repo id 'no-namespace'" in fails("push", "m", "no-namespace")
    assert "invalid Hub repo id 'a/b/c'" in fails("pull", "a/b/c")
    assert "no mask named 'nope'" in fails("push", "nope", "alice/x")
    res = cli("pull", "alice/x", "--repo-type", "space", ok=False)
    assert res.exit_code == 1 and "'space' is not one of" in res.output


def test_help_has_examples() -> None:
    for cmd in ("push", "pull", "search"):
        out = cli(cmd, "--help").output
        assert "Example:" in out and f"maskhub {cmd}" in out
    assert "--repo-type" in cli("push", "--help").output


def test_a_pulled_edited_mask_keeps_its_edit_history_and_fsck_agrees(
        hub_server: HubServer, tmp_path: Path) -> None:
    """issue 26: a pushed store carries its edits (``extra.edits``); the pulled row records
    the same lines in ``masks.edits``, so fsck's store-vs-index edit check is clean."""
    import numpy as np

    src = Registry(tmp_path / "src")
    src.add({"a.weight": np.eye(4, dtype=bool)}, name="ed", base_model="org/base")
    lines = list(src.edit("ed", algorithm="dpo").row["edits"])
    src.get("ed").push_to_hub("bob/edited")
    dst = Registry(tmp_path / "dst")
    pulled = dst.pull("bob/edited").mask
    assert list(pulled.row["edits"]) == lines and len(lines) == 1
    assert pulled.store.metadata.extra["edits"] == lines
    assert dst.fsck().findings == []


# -- the worker threads of push and pull ------------------------------------------------------


def _registry_lock_free(reg: Registry) -> bool:
    import fcntl
    import os

    fd = os.open(reg.index.lock_path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    finally:
        os.close(fd)


def test_pull_validates_before_it_takes_the_registry_lock(hub_server, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch
                                                         ) -> None:
    """A large store's bits are counted with the registry free for other processes."""
    from maskhub.storage.store import MaskStore

    diff_mask(tmp_path, "m").push_to_hub(REPO)
    reg = new_home(monkeypatch, tmp_path / "other")
    seen: list[bool] = []
    validate = MaskStore.validate

    def watched(self, *args, **kwargs):
        import time

        time.sleep(0.3)  # a connection opened beside the check would be open by now
        seen.append(_registry_lock_free(reg))
        return validate(self, *args, **kwargs)

    monkeypatch.setattr(MaskStore, "validate", watched)
    reg.pull(REPO)
    assert seen == [True]


def test_ctrl_c_during_a_push_stops_its_validation(hub_server, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """A Ctrl-C while huggingface_hub loads does not wait for the whole store's check on
    the worker (one array at most), and nothing staged stays behind."""
    import time

    from maskhub.hub import push as push_mod
    from maskhub.storage.store import MaskStore

    mask = diff_mask(tmp_path, "m")
    arrays = len(mask.tensor_names())
    assert arrays >= 4
    count = MaskStore.count

    def slow(self, *args, **kwargs):
        time.sleep(0.5)
        return count(self, *args, **kwargs)

    def ctrl_c(token=None):
        time.sleep(0.2)  # the worker is inside the validation by now
        raise KeyboardInterrupt

    monkeypatch.setattr(MaskStore, "count", slow)
    monkeypatch.setattr(push_mod, "hf_api", ctrl_c)
    t0 = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        Registry().push("m", REPO)
    assert time.monotonic() - t0 < 0.5 * arrays - 0.5
    tmp = Registry().tmp_dir
    assert not tmp.exists() or not list(tmp.iterdir())


def test_pull_whose_write_connection_fails_leaves_nothing(hub_server, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch
                                                          ) -> None:
    import duckdb

    from maskhub.storage.index import Index

    diff_mask(tmp_path, "m").push_to_hub(REPO)
    reg = new_home(monkeypatch, tmp_path / "other")
    reg.ls()
    connect = Index._connect_db

    def broken(self, write, *args, **kwargs):
        if write:
            raise duckdb.IOException("IO Error: injected")
        return connect(self, write, *args, **kwargs)

    monkeypatch.setattr(Index, "_connect_db", broken)
    assert fails("pull", REPO).startswith("Error: ")
    assert not reg.tmp_dir.exists() or not list(reg.tmp_dir.iterdir())
