"""``check_inside``: a path under a store stays inside it after symlinks are resolved. The fast
path (no symlink below the root: a few ``lstat``) and the full ``realpath`` comparison agree."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from maskhub.checkpoints.validate import _plainly_inside, check_inside
from maskhub.errors import MaskStoreError


def _inside(root: Path, path: Path) -> bool:
    try:
        check_inside(root, path, "x")
    except MaskStoreError:
        return False
    return True


def test_check_inside(tmp_path: Path) -> None:
    root = tmp_path / "store"
    (root / "a" / "c").mkdir(parents=True)
    (root / "a" / "c" / "0").write_bytes(b"x")
    outside = tmp_path / "secret"
    outside.write_bytes(b"s")
    (root / "a" / "out").symlink_to(outside)
    (root / "a" / "in").symlink_to(root / "a" / "c" / "0")
    (root / "dir-out").symlink_to(tmp_path)
    linked_root = tmp_path / "link-to-store"
    linked_root.symlink_to(root)
    cases = [  # (root, path, inside, plainly inside)
        (root, root / "a" / "c" / "0", True, True),
        (root, root, True, True),
        (root, root / "a" / "missing" / "zarr.json", True, True),
        (linked_root, linked_root / "a" / "c" / "0", True, True),  # the root itself a link
        (root, root / "a" / "in", True, False),  # a link that stays inside: realpath says so
        (root, root / "a" / "out", False, False),
        (root, root / "dir-out" / "secret", False, False),
        (root, root / "a" / ".." / ".." / "secret", False, False),
        (root, outside, False, False),
        (root, Path(os.path.relpath(root / "a" / "c" / "0")), True, False),
    ]
    for r, p, inside, plain in cases:
        assert _inside(r, p) == inside, p
        assert _plainly_inside(r, p) == plain, p
        assert (os.path.realpath(p) + os.sep).startswith(os.path.realpath(r) + os.sep) \
            == inside, p


def test_check_inside_names_the_link(tmp_path: Path) -> None:
    root = tmp_path / "store"
    root.mkdir()
    (root / "c").symlink_to(tmp_path)
    with pytest.raises(MaskStoreError, match="c is a symlink that leaves the store"):
        check_inside(root, root / "c", "store/c")
