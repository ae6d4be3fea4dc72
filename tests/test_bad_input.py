"""Bad input: each case gives one clear line, exit code 1, and registers nothing."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from factory import llama_shapes, make_pair, random_state, save

from maskhub import CheckpointError, CheckpointMismatchError, Registry
from maskhub.cli import main


def run_cli(*args: str) -> tuple[int, str]:
    res = CliRunner().invoke(main, list(args))
    return res.exit_code, res.output


def assert_user_error(code: int, output: str, *needles: str) -> None:
    assert code == 1, output
    assert "Traceback" not in output
    lines = [ln for ln in output.splitlines() if ln.strip()]
    assert len(lines) == 1, output
    assert lines[0].startswith("Error: ")
    for n in needles:
        assert n in lines[0], lines[0]


def assert_nothing_registered(home: Path) -> None:
    assert Registry(home).ls() == []
    masks = home / "masks"
    assert not masks.exists() or list(masks.iterdir()) == []
    tmp = home / "tmp"
    assert not tmp.exists() or list(tmp.iterdir()) == []


def test_missing_path(tmp_path: Path, maskhub_home: Path) -> None:
    base, _, _ = make_pair(tmp_path)
    code, out = run_cli("diff", str(base), str(tmp_path / "nope"))
    assert_user_error(code, out, "nope", "no such file or directory")
    assert_nothing_registered(maskhub_home)


def test_truncated_safetensors(tmp_path: Path, maskhub_home: Path) -> None:
    base, target, _ = make_pair(tmp_path)
    f = target / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) - 100])
    code, out = run_cli("diff", str(base), str(target))
    assert_user_error(code, out, "truncated")
    assert_nothing_registered(maskhub_home)


def test_corrupt_header(tmp_path: Path, maskhub_home: Path) -> None:
    base, target, _ = make_pair(tmp_path)
    f = target / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[8:20] = b"\x00garbage!!\xff\xfe"
    f.write_bytes(bytes(data))
    code, out = run_cli("diff", str(base), str(target))
    assert_user_error(code, out, "not a readable safetensors file")
    assert_nothing_registered(maskhub_home)


def test_pickle_checkpoint_refused_never_loaded(tmp_path: Path, maskhub_home: Path) -> None:
    base, _, _ = make_pair(tmp_path)
    evil = tmp_path / "evil"
    evil.mkdir()
    marker = tmp_path / "pwned"

    class Boom:
        def __reduce__(self):  # runs on unpickling only
            return (os.system, (f"touch {marker}",))

    torch.save({"x": Boom()}, evil / "pytorch_model.bin")
    code, out = run_cli("diff", str(base), str(evil))
    assert_user_error(code, out, "pickle", "safetensors")
    code, out = run_cli("diff", str(base), str(evil / "pytorch_model.bin"))
    assert_user_error(code, out, "pickle")
    assert not marker.exists()
    assert_nothing_registered(maskhub_home)


def test_tensor_on_one_side_only(tmp_path: Path, maskhub_home: Path) -> None:
    state = random_state(llama_shapes())
    base = save(state, tmp_path / "b")
    extra = dict(state)
    extra["model.extra_head.weight"] = torch.zeros(3, 3, dtype=torch.bfloat16)
    target = save(extra, tmp_path / "t")
    code, out = run_cli("diff", str(base), str(target))
    assert_user_error(code, out, "'model.extra_head.weight'", "only in the target",
                      "--allow-missing")
    assert_nothing_registered(maskhub_home)
    res = CliRunner().invoke(main, ["diff", str(base), str(target), "--allow-missing",
                                    "--name", "ok", "--json"])
    assert res.exit_code == 0, res.output
    assert "skipping 1 tensor(s)" in res.stderr
    assert "model.extra_head.weight" in res.stderr
    info = json.loads(res.stdout)
    assert info["n_updated"] == 0
    assert info["n_params"] == sum(t.numel() for t in state.values())


def test_shape_mismatch_names_tensor_and_shapes(tmp_path: Path, maskhub_home: Path) -> None:
    state = random_state(llama_shapes())
    base = save(state, tmp_path / "b")
    other = dict(state)
    other["lm_head.weight"] = torch.zeros(33, 16, dtype=torch.bfloat16)
    target = save(other, tmp_path / "t")
    with pytest.raises(CheckpointMismatchError) as err:
        Registry().diff(base, target)
    assert err.value.tensor == "lm_head.weight"
    code, out = run_cli("diff", str(base), str(target))
    assert_user_error(code, out, "'lm_head.weight'", "[32, 16]", "[33, 16]")
    assert_nothing_registered(maskhub_home)


def test_missing_shard(tmp_path: Path, maskhub_home: Path) -> None:
    base, target, _ = make_pair(tmp_path, shards=2)
    (target / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match="shard model-00002-of-00002.safetensors"):
        Registry().diff(base, target)


def test_name_already_taken(tmp_path: Path, maskhub_home: Path) -> None:
    base, target, _ = make_pair(tmp_path)
    assert run_cli("diff", str(base), str(target), "--name", "run1")[0] == 0
    code, out = run_cli("diff", str(base), str(target), "--name", "run1")
    assert_user_error(code, out, "'run1' already exists")
    assert len(Registry().ls()) == 1
    # Without --name the same diff is the mask already registered (issue 26): nothing new
    assert run_cli("diff", str(base), str(target))[0] == 0
    assert len(Registry().ls()) == 1
    # ... unless forced: then the default name gets a suffix instead of failing.
    assert run_cli("diff", str(base), str(target), "--force")[0] == 0
    assert run_cli("diff", str(base), str(target), "--force")[0] == 0
    assert sorted(r["name"] for r in Registry().ls()) == ["run1", "target", "target-2"]


def test_interrupt_in_api_leaves_nothing(tmp_path: Path, maskhub_home: Path) -> None:
    base, target, _ = make_pair(tmp_path)

    def progress(done: int, total: int, *_: object) -> None:
        if done == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        Registry().diff(base, target, name="cut", progress=progress)
    assert_nothing_registered(maskhub_home)


def _sigint_self() -> None:
    os.kill(os.getpid(), signal.SIGINT)
    time.sleep(0.05)  # let the handler run


def test_ctrl_c_after_the_last_tensor_registers_nothing(tmp_path: Path,
                                                        maskhub_home: Path) -> None:
    """A Ctrl-C that arrives while the last tensor finishes (a real SIGINT, not an exception
    from the callback) stops the diff before it registers anything."""
    base, target, _ = make_pair(tmp_path)

    def progress(done: int, total: int, *_: object) -> None:
        if done == total:
            _sigint_self()

    with pytest.raises(KeyboardInterrupt):
        Registry().diff(base, target, name="late", progress=progress)
    assert_nothing_registered(maskhub_home)


def test_ctrl_c_during_the_commit_completes_it(tmp_path: Path, maskhub_home: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """A Ctrl-C between the store's rename and the index commit used to split them (a row
    without its store); now the registration finishes and stays whole."""
    import maskhub.core.home as api

    base, target, planted = make_pair(tmp_path)
    real_publish = api.publish

    def publish_then_sigint(tmp: Path, final: Path) -> None:
        real_publish(tmp, final)
        _sigint_self()

    monkeypatch.setattr(api, "publish", publish_then_sigint)
    mask = Registry().diff(base, target, name="whole")
    assert [r["name"] for r in Registry().ls()] == ["whole"]
    assert mask.path.is_dir()
    for name, bits in planted.items():
        assert (mask[name] == bits).all(), name
    # the handler is restored afterwards: Ctrl-C is an ordinary KeyboardInterrupt again
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def _big_pair(tmp_path: Path) -> tuple[Path, Path]:
    """A pair with many small tensors: a CLI diff takes seconds (per-tensor work) on little
    disk."""
    shapes = {f"model.layers.{i}.mlp.up_proj.weight": (128, 128) for i in range(1500)}
    state = random_state(shapes, torch.float32)
    base = save(state, tmp_path / "big-b", shards=4)
    target = save({k: v + 1 for k, v in state.items()}, tmp_path / "big-t", shards=4)
    return base, target


def _start_diff(base: Path, target: Path, home: Path) -> subprocess.Popen:
    env = {**os.environ, "MASKHUB_HOME": str(home)}
    return subprocess.Popen(
        [sys.executable, "-c", "from maskhub.cli import main; main()", "diff", str(base),
         str(target), "--name", "big", "--device", "cpu"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for_partial(home: Path, proc: subprocess.Popen, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        tmp = home / "tmp"
        if tmp.exists() and any(p.name.endswith(".partial") and any(p.iterdir())
                                for p in tmp.iterdir()):
            return
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.02)
    raise AssertionError("diff never started writing")


def test_ctrl_c_during_cli_diff(tmp_path: Path, maskhub_home: Path) -> None:
    base, target = _big_pair(tmp_path)
    proc = _start_diff(base, target, maskhub_home)
    _wait_for_partial(maskhub_home, proc)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err  # 128 + SIGINT, as shells report Ctrl-C
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith("Interrupted: nothing was registered")
    assert_nothing_registered(maskhub_home)


def test_crash_during_diff_leaves_no_visible_mask(tmp_path: Path, maskhub_home: Path) -> None:
    base, target = _big_pair(tmp_path)
    proc = _start_diff(base, target, maskhub_home)
    _wait_for_partial(maskhub_home, proc)
    proc.kill()
    proc.wait()
    # The dead process's staging dir is invisible to users and removed on the next open.
    assert run_cli("ls", "--json") == (0, "[]\n")
    assert_nothing_registered(maskhub_home)
