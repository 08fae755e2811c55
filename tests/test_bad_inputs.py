"""Bad input, class by class: one line on stderr, the conventional exit code, no traceback, and
every input file byte for byte as it was. Each class is proven once through a real subprocess;
the other cases of the class run in-process through the same `main(argv)` the subprocess runs."""

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import mlx_mla.convert

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "TRANSFORMERS_VERBOSITY": "error", "PYTHONUNBUFFERED": "1"}


def snapshot(root: Path) -> dict[str, str]:
    """Every folder, file (sha256) and link (target) under root."""
    seen = {}
    for path in sorted(root.rglob("*")):
        name = str(path.relative_to(root))
        if path.is_symlink():
            seen[name] = f"-> {os.readlink(path)}"
        elif path.is_dir():
            seen[name] = "dir"
        else:
            seen[name] = hashlib.sha256(path.read_bytes()).hexdigest()
    return seen


def run_tool(module: str, *args, stdin=None, timeout=120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", f"mlx_mla.{module}", *args],
        input=stdin,
        capture_output=True,
        timeout=timeout,
        env=ENV,
        cwd=ROOT,
    )


def assert_one_line_error(returncode: int, stderr: str | bytes, code: int = 2):
    stderr = stderr.decode(errors="replace") if isinstance(stderr, bytes) else stderr
    assert "Traceback" not in stderr, stderr
    assert returncode == code, stderr
    assert len(stderr.strip().splitlines()) == 1, stderr


def run_main(main, argv, capsys) -> tuple[int, str]:
    """(exit code, stderr) of a tool's main(argv) run in this process."""
    with pytest.raises(SystemExit) as exit:
        main([str(a) for a in argv])
    return exit.value.code, capsys.readouterr().err


@pytest.fixture
def source(checkpoints, tmp_path) -> Path:
    """A private copy of a tiny checkpoint, at tmp_path/models/src."""
    src, _ = checkpoints["plain_rope", "transformers5"]
    return shutil.copytree(src, tmp_path / "models" / "src")


# --- Data loss: convert never writes into, over or around its source. ---

OVERLAPS = {
    "same": lambda src: src,
    "parent": lambda src: src.parent,
    "grandparent": lambda src: src.parent.parent,
    "inside": lambda src: src / "mlx",
    "inside_new_folders": lambda src: src / "a" / "b" / "mlx",
    "symlink_to_source": lambda src: link(src.parent / "alias", src),
    "through_symlinked_parent": lambda src: link(src.parent.parent / "up", src.parent) / "src",
    "source_reached_by_symlink": lambda src: src,  # --hf-path is a link to src, see below
}


def link(path: Path, target: Path) -> Path:
    path.symlink_to(target, target_is_directory=True)
    return path


@pytest.mark.parametrize("force", [False, True], ids=["", "force"])
@pytest.mark.parametrize("case", OVERLAPS)
def test_convert_refuses_an_output_overlapping_its_source(source, tmp_path, capsys, case, force):
    out = OVERLAPS[case](source)
    hf_path = source
    if case == "source_reached_by_symlink":
        hf_path = link(tmp_path / "elsewhere", source)
    before = snapshot(tmp_path)
    argv = ["--hf-path", hf_path, "--mlx-path", out, *(["--force"] if force else [])]
    code, err = run_main(mlx_mla.convert.main, argv, capsys)
    assert_one_line_error(code, err)
    assert "source checkpoint" in err
    assert snapshot(tmp_path) == before


def test_convert_cli_with_force_into_the_source_parent_deletes_nothing(source, tmp_path):
    before = snapshot(tmp_path)
    out = subprocess.run(
        [sys.executable, "convert.py", "--hf-path", source, "--mlx-path", source.parent, "--force"],
        capture_output=True,
        text=True,
        timeout=120,
        env=ENV,
        cwd=ROOT,
    )
    assert_one_line_error(out.returncode, out.stderr)
    assert "holds the source checkpoint" in out.stderr
    assert snapshot(tmp_path) == before


def test_convert_refuses_an_output_in_the_folder_the_source_files_link_to(tmp_path, source, capsys):
    # A hub cache: snapshots/<rev>/ holds links into blobs/, where the bytes are.
    blobs = shutil.move(source, tmp_path / "blobs")
    snapshot_dir = tmp_path / "snapshots" / "rev"
    snapshot_dir.mkdir(parents=True)
    for file in Path(blobs).iterdir():
        (snapshot_dir / file.name).symlink_to(file)
    before = snapshot(tmp_path)
    argv = ["--hf-path", snapshot_dir, "--mlx-path", blobs, "--force"]
    code, err = run_main(mlx_mla.convert.main, argv, capsys)
    assert_one_line_error(code, err)
    assert snapshot(tmp_path) == before


def test_interrupted_convert_removes_the_parent_folders_it_created(source, tmp_path, monkeypatch):
    save = mlx_mla.convert.save_shard

    def save_then_interrupt(path, tensors):
        save(path, tensors)
        raise KeyboardInterrupt

    monkeypatch.setattr(mlx_mla.convert, "save_shard", save_then_interrupt)
    (tmp_path / "out" / "kept").mkdir(parents=True)
    before = snapshot(tmp_path)
    with pytest.raises(KeyboardInterrupt):
        mlx_mla.convert.convert(source, tmp_path / "out" / "kept" / "new" / "deeper" / "mlx")
    assert snapshot(tmp_path) == before
