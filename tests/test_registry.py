"""The registry through the CLI: ls, show, sql, rm, names and id prefixes, help, demo,
the on-disk contract, and concurrent writers."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from factory import make_pair

from maskhub import MaskNotFoundError, Registry
from maskhub.cli import main
from maskhub.schemas.names import parse_tensor_name


def cli(*args: str) -> CliRunner:
    res = CliRunner().invoke(main, list(args))
    assert res.exit_code == 0, res.output
    return res


@pytest.fixture
def pair(tmp_path: Path):
    return make_pair(tmp_path, density=0.2)


def test_ls_show_sql_rm_roundtrip(pair, maskhub_home: Path) -> None:
    base, target, planted = pair
    n_updated = sum(int(m.sum()) for m in planted.values())
    n_params = sum(m.size for m in planted.values())
    cli("diff", str(base), str(target), "--algorithm", "dpo", "--seed", "42",
        "--dataset", "tulu-pref", "--name", "tulu-dpo", "--tag", "a", "--tag", "b")
    cli("diff", str(base), str(target), "--algorithm", "grpo", "--seed", "1", "--name", "g1")
    rows = json.loads(cli("ls", "--json").output)
    assert {r["name"] for r in rows} == {"tulu-dpo", "g1"}
    dpo = next(r for r in rows if r["name"] == "tulu-dpo")
    assert (dpo["algorithm"], dpo["seed"], dpo["dataset"], dpo["tags"]) == (
        "dpo", 42, "tulu-pref", ["a", "b"])
    assert (dpo["n_params"], dpo["n_updated"]) == (n_params, n_updated)
    assert dpo["sparsity"] == pytest.approx(1 - n_updated / n_params, rel=1e-12)
    assert dpo["base_model"] == str(base.resolve())
    assert dpo["tol"] == 1e-5 and dpo["format_version"] == 1

    info = json.loads(cli("show", "tulu-dpo", "--json").output)
    layers = {r["layer"]: r for r in info["by_layer"]}
    assert sorted(layers) == [0, 1]
    exp_l0 = sum(int(m.sum()) for k, m in planted.items() if k.startswith("model.layers.0."))
    assert layers[0]["n_updated"] == exp_l0
    modules = {r["module"]: r for r in info["by_module"]}
    assert modules["self_attn.q_proj"]["tensors"] == 2
    assert modules["input_layernorm"]["n_updated"] == 0
    assert modules["input_layernorm"]["sparsity"] == 1.0
    text = cli("show", "tulu-dpo").output
    assert "per layer" in text and "per module" in text and "self_attn.q_proj" in text

    out = cli("sql", "select algorithm, avg(sparsity) as s from masks group by 1 order by 1",
              "--format", "json").output
    assert [r["algorithm"] for r in json.loads(out)] == ["dpo", "grpo"]
    csv_out = cli("sql", "select count(*) as n from tensors", "--format", "csv").output
    assert csv_out.splitlines() == ["n", str(2 * len(planted))]
    assert "algorithm" in cli("sql", "select algorithm from masks").output

    removed = json.loads(cli("rm", "g1", "--json").output)
    assert removed["name"] == "g1"
    assert not Registry().store_path(removed["removed"]).exists()
    assert [r["name"] for r in json.loads(cli("ls", "--json").output)] == ["tulu-dpo"]
    assert cli("sql", "select count(*) from tensors where mask_id = "
               f"'{removed['removed']}'", "--format", "csv").output.splitlines()[1] == "0"


def test_id_prefix_and_ambiguity(pair) -> None:
    base, target, _ = pair
    reg = Registry()
    masks = [reg.diff(base, target, name=f"m{i}") for i in range(20)]
    m = masks[0]
    assert reg.get(m.id[:8]).name == "m0"
    assert json.loads(cli("show", m.id[:10], "--json").output)["mask"]["name"] == "m0"
    firsts = [x.id[0] for x in masks]
    dup = next(c for c in firsts if firsts.count(c) > 1)  # 20 ids, 16 hex digits
    res = CliRunner().invoke(main, ["show", dup])
    assert res.exit_code == 1 and "matches" in res.output and "give more of the id" in res.output
    with pytest.raises(MaskNotFoundError):
        reg.get("zzz")


def test_sql_is_read_only_and_errors_are_one_line(pair) -> None:
    base, target, _ = pair
    cli("diff", str(base), str(target), "--name", "x")
    res = CliRunner().invoke(main, ["sql", "delete from masks"])
    assert res.exit_code == 1 and res.output.startswith("Error: SQL error")
    res = CliRunner().invoke(main, ["sql", "select nope from masks"])
    assert res.exit_code == 1 and len(res.output.strip().splitlines()) == 1
    assert len(Registry().ls()) == 1


def test_every_command_has_help_with_example() -> None:
    for name, command in main.commands.items():
        res = CliRunner().invoke(main, [name, "--help"])
        assert res.exit_code == 0, name
        assert "Example" in res.output, f"`maskhub {name} --help` lacks an example"
        assert command.help and len(command.help) > 20, name


def test_documented_commands_exist() -> None:
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    for name in main.commands:
        assert f"maskhub {name}" in readme, f"README does not document `maskhub {name}`"


def test_demo_runs_offline_and_registers(tmp_path: Path) -> None:
    res = cli("demo", "--dir", str(tmp_path / "demo"), "--json")
    info = json.loads(res.output)
    assert info["name"] == "demo"
    assert 0.3 < info["sparsity"] < 0.98
    assert info["losses"][-1] < info["losses"][0] + 0.5
    mask = Registry().get("demo")
    norms = [s for s in mask.tensor_stats() if "layernorm" in s.module]
    # One bf16 step at 1.0 is 2^-7: the norm scales barely move at this learning rate.
    assert sum(s.n_updated for s in norms) < 0.05 * sum(s.numel for s in norms)
    assert (tmp_path / "demo" / "base" / "model.safetensors.index.json").exists()


def test_store_readable_with_plain_zarr_and_numpy(tmp_path: Path) -> None:
    # 10% density: the matrices below the gap-code threshold (12%), the untouched norms packed
    base, target, planted = make_pair(tmp_path, density=0.1)
    mask = Registry().diff(base, target, name="plain")
    script = textwrap.dedent(f"""
        import sys, json, math
        import numpy as np, zarr
        assert not any(m.startswith("maskhub") for m in sys.modules)
        g = zarr.open_group({str(mask.path)!r}, mode="r")
        out, encodings = {{}}, set()
        for name in g.attrs["tensors"]:
            a = g[name]
            shape = a.attrs["shape"]
            if a.attrs.get("encoding") == "gaps-u8":  # a low-density tensor: gaps
                c = a[:].astype(np.int64)
                out[name] = (np.cumsum(c + (c < 255))[c < 255] - 1).tolist()
                encodings.add("gaps-u8")
                continue
            bits = np.unpackbits(a[:], count=math.prod(shape), bitorder=a.attrs["bitorder"])
            out[name] = np.flatnonzero(bits).tolist()
            encodings.add("packed")
        print(sorted(encodings), file=sys.stderr)
        assert g.attrs["format_version"] == 1 and g.attrs["kind"] == "maskhub.mask"
        assert not any(m.startswith("maskhub") for m in sys.modules)
        print(json.dumps(out))
    """)
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         check=True)
    got = json.loads(res.stdout)
    assert set(got) == set(planted)
    for name, m in planted.items():
        assert got[name] == np.flatnonzero(m.ravel()).tolist(), name
    assert res.stderr.strip() == "['gaps-u8', 'packed']"  # both layouts were read


WRITER = """
import sys
from maskhub import Registry
reg = Registry(sys.argv[1])
for i in range(int(sys.argv[4])):
    reg.diff(sys.argv[2], sys.argv[3], name=f"{sys.argv[5]}-{i}")
"""


def test_two_processes_writing_at_once(pair, maskhub_home: Path) -> None:
    base, target, _ = pair
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, str(maskhub_home), str(base),
                               str(target), "4", tag], stderr=subprocess.PIPE, text=True)
             for tag in ("p", "q")]
    for p in procs:
        _, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
    names = sorted(r["name"] for r in Registry().ls())
    assert names == [f"{t}-{i}" for t in "pq" for i in range(4)]
    cols, rows = Registry().sql("select count(*) from tensors")
    assert rows[0][0] == 8 * 21


@pytest.mark.parametrize("name, expected", [
    ("model.layers.12.self_attn.q_proj.weight", (12, "self_attn.q_proj")),
    ("model.layers.0.mlp.down_proj.weight", (0, "mlp.down_proj")),
    ("model.layers.3.input_layernorm.weight", (3, "input_layernorm")),
    ("model.embed_tokens.weight", (None, "embed_tokens")),
    ("model.norm.weight", (None, "norm")),
    ("lm_head.weight", (None, "lm_head")),
    ("transformer.h.5.attn.c_attn.bias", (5, "attn.c_attn")),
    ("bias", (None, "bias")),
])
def test_layer_and_module_parsing(name: str, expected: tuple) -> None:
    assert parse_tensor_name(name) == expected
