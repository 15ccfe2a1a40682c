"""Fault injection for the ``gdws`` command: nothing lost, nothing wrong in silence.

Every case checks what a user sees (the exit code, one line on standard error, never a
traceback) and what is left on disk: every file that existed before is byte-for-byte and
mode-for-mode as it was unless the command was asked to replace it, and no temporary
(``*.gdws-tmp*``) is left behind. The network is the tiny digits CNN on scikit-learn's
digits, so each run takes a fraction of a second.
"""

from __future__ import annotations

import contextlib
import errno
import importlib
import io
import json
import os
import random
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch
from hypothesis import event, given, settings
from hypothesis import strategies as st

import gdws_approx.files as files
import gdws_torch.cli.eval as eval_command
from gdws_torch import load_channel_weights, load_converted
from gdws_torch.cli import main
from gdws_torch.models import DigitsCNN, PreActResNet18
from gdws_torch.robustness.resume import MANIFEST, ResultStore

DIGITS = ["--model", "digits_cnn", "--dataset", "digits"]
QUICK = ["--attack", "none", "--n-samples", "20", "--no-progress"]
TRAIN = ["--epochs", "1", "--attack", "none", "--batch-size", "256", "--no-progress"]
PGD1 = ["--attack-iters", "1", "--n-samples", "20", "--no-progress"]
SCRIPT = Path(sys.executable).with_name("gdws")
# The module, not the function gdws_torch exports under the same name.
evaluation = importlib.import_module("gdws_torch.robustness.evaluate")
ENOSPC = "No space left on device"


# -- helpers ------------------------------------------------------------------------------


def gdws(*args) -> int:
    return main([str(a) for a in args])


def snapshot(folder) -> dict[str, tuple[bytes | None, int]]:
    """``{relative path: (content, mode)}`` of everything under ``folder``: a file's
    bytes, a symlink's target, ``None`` for a folder; symlinks are not followed."""
    folder = Path(folder)
    found = {}
    for root, dirs, names in os.walk(folder):
        for name in dirs + names:
            path = Path(root, name)
            mode = path.lstat().st_mode
            if stat.S_ISLNK(mode):
                content = os.readlink(path).encode()
            elif stat.S_ISDIR(mode):
                content = None
            else:
                content = path.read_bytes()
            found[str(path.relative_to(folder))] = (content, mode)
    return found


def temporaries(folder) -> list[str]:
    """The temporaries of atomic writes left anywhere under ``folder``."""
    return [
        os.path.join(root, name)
        for root, dirs, names in os.walk(folder)
        for name in dirs + names
        if ".gdws-tmp" in name
    ]


def assert_kept(before: dict, after: dict, allowed=()) -> None:
    """Every entry of ``before`` is in ``after`` unchanged, but those in ``allowed``."""
    for name, (content, mode) in before.items():
        if name in allowed:
            continue
        assert name in after, f"{name} was removed"
        assert after[name][0] == content, f"{name} changed"
        assert after[name][1] == mode, f"{name}'s mode changed"


def one_line(err: str) -> str:
    """The one line of standard error (no traceback, no second line)."""
    assert "Traceback" not in err, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    return lines[0]


def assert_refused(rc, code, capsys, folder, before, *fragments) -> str:
    """Exit ``code``, one line holding ``fragments``, ``folder`` exactly as it was."""
    err = capsys.readouterr().err
    assert rc == code, err
    line = one_line(err)
    for fragment in fragments:
        assert fragment in line, line
    after = snapshot(folder)
    assert_kept(before, after)
    assert after == before, sorted(set(after) - set(before))  # nothing new either
    assert not temporaries(folder)
    return line


def copy_checkpoint(weights: Path, folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(weights, folder / "model_best.pth")
    return folder / "model_best.pth"


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    """An untrained digits CNN, saved as a checkpoint (the CLI cares about the files)."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("weights") / "model_best.pth"
    torch.save({"state_dict": DigitsCNN().state_dict()}, path)
    return path


@pytest.fixture(scope="module")
def onnx_model(tmp_path_factory) -> Path:
    gdws_onnx = pytest.importorskip("gdws_onnx")
    pytest.importorskip("onnx")
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("onnx") / "digits.onnx"
    gdws_onnx.export(DigitsCNN().eval(), path, (1, 16, 16), check=False)
    return path


# -- 1. resume folders that are not gdws's own -------------------------------------------


@pytest.mark.parametrize("fresh", [False, True], ids=["resume", "fresh"])
@pytest.mark.parametrize("where", ["precious", "run", "parent"])
def test_a_foreign_resume_folder_is_refused_and_nothing_is_removed(
    tmp_path, weights, capsys, monkeypatch, where, fresh
):
    run = tmp_path / "run"
    copy_checkpoint(weights, run)
    (tmp_path / "keep").mkdir()
    (tmp_path / "keep" / "precious.txt").write_text("years of work\n")
    (tmp_path / "sub").mkdir()
    monkeypatch.chdir(tmp_path / "sub")  # so ".." is the test folder
    resume = {"precious": tmp_path / "keep", "run": run, "parent": ".."}[where]
    before = snapshot(tmp_path)
    args = ["eval", *DIGITS, "--fname", run, *PGD1, "--save-every", "0"]
    args += ["--json", tmp_path / "out" / "eval.json", "--resume-dir", resume]
    rc = gdws(*args, *(["--fresh"] if fresh else []))
    assert_refused(rc, 2, capsys, tmp_path, before, "--resume-dir", "did not write")


def test_a_resume_folder_holding_only_a_stray_part_is_refused(tmp_path, weights, capsys):
    checkpoint = copy_checkpoint(weights, tmp_path)
    (tmp_path / "res").mkdir()
    (tmp_path / "res" / "part-abc-0.pt").write_bytes(b"not gdws's")
    before = snapshot(tmp_path)
    for fresh in ([], ["--fresh"]):
        args = ["eval", *DIGITS, "--checkpoint", checkpoint, *PGD1, "--resume-dir"]
        rc = gdws(*args, tmp_path / "res", "--json", tmp_path / "e.json", *fresh)
        assert_refused(rc, 2, capsys, tmp_path, before, MANIFEST)


# -- 2. what a finished run leaves -------------------------------------------------------


def test_a_finished_eval_leaves_no_resume_folder_and_keeps_an_empty_one(tmp_path, weights, capsys):
    checkpoint = copy_checkpoint(weights, tmp_path / "run")
    args = ["eval", *DIGITS, "--checkpoint", checkpoint, *PGD1, "--save-every", "0"]
    out = tmp_path / "out" / "eval.json"
    assert gdws(*args, "--json", out) == 0, capsys.readouterr().err
    assert json.loads(out.read_text())["n_samples"] == 20
    assert not out.with_suffix(".partial").exists()
    assert sorted(os.listdir(out.parent)) == [".gdws-outputs.json", "eval.json"]

    mine = tmp_path / "mine"
    mine.mkdir()
    before = snapshot(tmp_path)
    other = tmp_path / "other.json"
    assert gdws(*args, "--json", other, "--resume-dir", mine) == 0, capsys.readouterr().err
    assert mine.is_dir() and os.listdir(mine) == []
    assert_kept(before, snapshot(tmp_path))
    assert set(snapshot(tmp_path)) - set(before) == {"other.json"}
    assert not temporaries(tmp_path)


def test_an_output_inside_the_resume_folder_is_refused_before_the_work(tmp_path, weights, capsys):
    checkpoint = copy_checkpoint(weights, tmp_path)
    before = snapshot(tmp_path)
    res = tmp_path / "res"
    args = ["eval", *DIGITS, "--checkpoint", checkpoint, *QUICK, "--resume-dir", res]
    rc = gdws(*args, "--json", res / "eval.json")
    # Either refused up front (nothing done), or run to the end with the folder cleared.
    err = capsys.readouterr().err
    if rc == 2:
        assert one_line(err) and snapshot(tmp_path) == before, err
    else:
        assert rc == 0, err
        assert sorted(os.listdir(res)) == [".gdws-outputs.json", "eval.json"]


# -- 3. a report never takes the output's own name ----------------------------------------


def test_convert_and_alphas_to_a_json_name_keep_the_report_apart(tmp_path, weights, capsys):
    checkpoint = copy_checkpoint(weights, tmp_path)
    model = tmp_path / "model.json"
    rc = gdws("convert", *DIGITS, "--checkpoint", checkpoint, "--no-progress", "--out", model)
    assert rc == 0, capsys.readouterr().err
    _, info = load_converted(model, DigitsCNN())
    assert info["architecture"] == "DigitsCNN"
    report = json.loads((tmp_path / "model.report.json").read_text())
    assert report["command"] == "convert" and report["macs"] == info["report"]["macs"]

    alphas = tmp_path / "a.json"
    args = ["alphas", *DIGITS, "--checkpoint", checkpoint, "--attack", "none", "--no-progress"]
    assert gdws(*args, "--sample-size", "8", "--out", alphas) == 0, capsys.readouterr().err
    gains = load_channel_weights(alphas)
    summary = json.loads((tmp_path / "a.report.json").read_text())
    assert summary["command"] == "alphas"
    assert {row["layer"] for row in summary["layers"]} == set(gains)
    assert not temporaries(tmp_path)


# -- 4. existing outputs are replaced only with --overwrite ------------------------------


def _loads(kind: str, path: Path) -> None:
    """``path`` holds what ``kind`` writes, complete."""
    if kind == "eval":
        assert json.loads(path.read_text())["command"] == "eval"
    elif kind == "convert":
        load_converted(path, DigitsCNN())
    elif kind == "train":
        state = torch.load(path, weights_only=True)["state_dict"]
        DigitsCNN().load_state_dict(state)
    else:
        import onnx

        onnx.checker.check_model(onnx.load(str(path)))


@pytest.mark.parametrize("kind", ["eval", "convert", "onnx-convert", "train"])
def test_an_existing_output_is_replaced_only_with_overwrite(
    tmp_path, weights, request, capsys, kind
):
    checkpoint = copy_checkpoint(weights, tmp_path / "run")
    existing = tmp_path / ("mine.onnx" if kind == "onnx-convert" else "mine.pth")
    existing.write_bytes(b"made by a person\n")
    existing.chmod(0o600)
    commands = {
        "eval": ["eval", *DIGITS, "--checkpoint", checkpoint, *QUICK, "--json", existing],
        "convert": ["convert", *DIGITS, "--checkpoint", checkpoint, "--out", existing],
        "train": ["train", *DIGITS, *TRAIN, "--out", existing],
    }
    if kind == "onnx-convert":
        source = request.getfixturevalue("onnx_model")
        commands[kind] = ["onnx-convert", source, existing, "--beta", "0", "--no-check"]
    before = snapshot(tmp_path)
    rc = gdws(*commands[kind])
    assert_refused(rc, 2, capsys, tmp_path, before, str(existing), "exists", "--overwrite")
    rc = gdws(*commands[kind], "--overwrite")
    assert rc == 0, capsys.readouterr().err
    assert existing.read_bytes() != b"made by a person\n"
    _loads(kind, existing)
    assert_kept(before, snapshot(tmp_path), allowed={existing.name})
    assert not temporaries(tmp_path)


@pytest.mark.parametrize("exists", [False, True])
def test_eval_json_and_log_in_one_file_are_refused(tmp_path, weights, capsys, exists):
    checkpoint = copy_checkpoint(weights, tmp_path)
    both = tmp_path / "results.txt"
    if exists:
        both.write_text("epsilon\ttestacc\n0.00000000\t50.000\n")
    (tmp_path / "sub").mkdir()
    before = snapshot(tmp_path)
    args = ["eval", *DIGITS, "--checkpoint", checkpoint, *QUICK, "--overwrite"]
    rc = gdws(*args, "--json", both, "--logfilename", f"{tmp_path}/sub/../results.txt")
    assert_refused(rc, 2, capsys, tmp_path, before, "same path")


# -- 5. gdws's own folders ------------------------------------------------------------------


def test_a_rerun_replaces_its_own_unchanged_file_but_not_an_edited_one(tmp_path, weights, capsys):
    checkpoint = copy_checkpoint(weights, tmp_path)
    out = tmp_path / "results" / "eval.json"
    args = ["eval", *DIGITS, "--checkpoint", checkpoint, *QUICK, "--json", out]
    assert gdws(*args) == 0, capsys.readouterr().err
    assert (out.parent / ".gdws-outputs.json").is_file()
    capsys.readouterr()
    assert gdws(*args) == 0  # its own, unchanged: replaced without --overwrite
    assert f"replaced {out}" in capsys.readouterr().out
    out.write_text(out.read_text().replace('"eval"', '"eval, checked by hand"'))
    before = snapshot(tmp_path)
    assert_refused(gdws(*args), 2, capsys, tmp_path, before, "exists", "--overwrite")
    # A file a person put into gdws's folder is not gdws's either.
    notes = out.parent / "notes.json"
    notes.write_text("{}\n")
    before = snapshot(tmp_path)
    rc = gdws(*args[:-1], notes)
    assert_refused(rc, 2, capsys, tmp_path, before, "exists", "--overwrite")


# -- 6. permissions -------------------------------------------------------------------------


@pytest.mark.parametrize(("umask", "mode"), [(0o027, 0o640), (0o022, 0o644)])
def test_written_files_follow_the_umask(tmp_path, weights, capsys, umask, mode):
    checkpoint = copy_checkpoint(weights, tmp_path)
    out = tmp_path / "results" / "eval.json"
    log = tmp_path / "results" / "acc.txt"
    model = tmp_path / "converted" / "gdws.pth"
    previous = os.umask(umask)
    try:
        args = ["eval", *DIGITS, "--checkpoint", checkpoint, *QUICK, "--json", out]
        assert gdws(*args, "--logfilename", log) == 0, capsys.readouterr().err
        args = ["convert", *DIGITS, "--checkpoint", checkpoint, "--out", model]
        assert gdws(*args) == 0, capsys.readouterr().err
    finally:
        os.umask(previous)
    written = [out, log, out.parent / ".gdws-outputs.json", model, model.with_suffix(".json")]
    for path in written:
        assert stat.S_IMODE(path.stat().st_mode) == mode, path
    for folder in (out.parent, model.parent):
        assert stat.S_IMODE(folder.stat().st_mode) == 0o777 & ~umask, folder


# -- 7. failures while writing ------------------------------------------------------------


def _fail_writing(monkeypatch, how: str, name: str) -> None:
    """Make the final write of the file ``name`` fail with ENOSPC, the way ``how`` does."""
    real_link, real_replace, real_fsync = os.link, os.replace, os.fsync

    def full(src, dst):
        return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(src), None, str(dst))

    def link(src, dst, *args, **kwargs):
        if Path(dst).name == name:
            raise full(src, dst)
        return real_link(src, dst, *args, **kwargs)

    def replace(src, dst, *args, **kwargs):
        if Path(dst).name == name:
            raise full(src, dst)
        return real_replace(src, dst, *args, **kwargs)

    def fsync(fd):
        if os.readlink(f"/proc/self/fd/{fd}").split("/")[-1].startswith(f".{name}."):
            raise OSError(errno.ENOSPC, ENOSPC)
        return real_fsync(fd)

    fake = {"link": link, "replace": replace, "fsync": fsync}[how]
    monkeypatch.setattr(files.os, how, fake)


@pytest.mark.parametrize("how", ["link", "replace", "fsync"])
def test_a_full_disk_fails_in_one_line_and_keeps_the_previous_file(
    tmp_path, weights, capsys, monkeypatch, how
):
    checkpoint = copy_checkpoint(weights, tmp_path)
    out = tmp_path / "results" / "eval.json"
    args = ["eval", *DIGITS, "--checkpoint", checkpoint, *PGD1, "--save-every", "0"]
    assert gdws(*args, "--json", out) == 0, capsys.readouterr().err  # gdws's own file
    target = out.parent / "new.json" if how == "link" else out  # link: a new file
    before = snapshot(tmp_path)
    with monkeypatch.context() as patch:
        _fail_writing(patch, how, target.name)
        rc = gdws(*args, "--json", target)
    err = capsys.readouterr().err
    assert rc == 1, err
    line = one_line(err)
    assert line.startswith("gdws: error:") and ENOSPC in line, line
    assert "the same command resumes" in line, line
    assert_kept(before, snapshot(tmp_path))
    assert not target.exists() or target == out
    assert not temporaries(tmp_path)
    # The kept per-sample results serve the same command, which then writes the file.
    assert gdws(*args, "--json", target) == 0, capsys.readouterr().err
    assert "resumed: 20 samples" in capsys.readouterr().out
    assert json.loads(target.read_text())["resumed_samples"] == 20
    assert not target.with_suffix(".partial").exists()


@pytest.mark.parametrize("how", ["link", "replace", "fsync"])
def test_a_failed_write_names_the_output_file(tmp_path, weights, capsys, monkeypatch, how):
    checkpoint = copy_checkpoint(weights, tmp_path)
    out = tmp_path / "results" / "eval.json"
    args = ["eval", *DIGITS, "--checkpoint", checkpoint, *QUICK]
    assert gdws(*args, "--json", out) == 0, capsys.readouterr().err
    target = out.parent / "new.json" if how == "link" else out
    _fail_writing(monkeypatch, how, target.name)
    assert gdws(*args, "--json", target) == 1
    line = one_line(capsys.readouterr().err)
    assert str(target) in line and ".gdws-tmp" not in line, line


@pytest.mark.parametrize("kind", ["eval", "convert", "train", "resume-dir"])
def test_an_output_under_a_file_is_refused_before_the_work(
    tmp_path, weights, capsys, monkeypatch, kind
):
    checkpoint = copy_checkpoint(weights, tmp_path)
    (tmp_path / "somefile").write_text("a file, not a folder\n")
    under = tmp_path / "somefile" / "x.pth"
    monkeypatch.setattr(eval_command, "evaluate_dataset", _no_work)
    eval_args = ["eval", *DIGITS, "--checkpoint", checkpoint, *QUICK, "--json", under]
    commands = {
        "eval": eval_args,
        "resume-dir": [*eval_args[:-1], tmp_path / "e.json", "--resume-dir", under],
        "convert": ["convert", *DIGITS, "--checkpoint", checkpoint, "--out", under],
        "train": ["train", *DIGITS, "--epochs", "1", "--no-progress", "--out", under],
    }
    before = snapshot(tmp_path)
    rc = gdws(*commands[kind])
    assert_refused(rc, 2, capsys, tmp_path, before, "somefile", "is a file")


def _no_work(*args, **kwargs):
    raise AssertionError("the work started although an output was refused")


def test_a_folder_that_cannot_be_written_is_refused_before_the_work(
    tmp_path, weights, capsys, monkeypatch
):
    checkpoint = copy_checkpoint(weights, tmp_path)
    locked = tmp_path / "locked"
    locked.mkdir()
    (locked / "old.json").write_text("{}\n")
    real_access = os.access

    def access(path, mode, *args, **kwargs):  # root passes os.access: say "read-only"
        if Path(path) == locked and mode & os.W_OK:
            return False
        return real_access(path, mode, *args, **kwargs)

    monkeypatch.setattr(os, "access", access)
    monkeypatch.setattr(eval_command, "evaluate_dataset", _no_work)
    before = snapshot(tmp_path)
    args = ["eval", *DIGITS, "--checkpoint", checkpoint, *QUICK]
    rc = gdws(*args, "--json", locked / "new.json")
    assert_refused(rc, 2, capsys, tmp_path, before, "cannot write in", "locked")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_read_only_folder_is_refused_before_the_work(tmp_path, weights, capsys):
    checkpoint = copy_checkpoint(weights, tmp_path)
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        before = snapshot(tmp_path)
        args = ["eval", *DIGITS, "--checkpoint", checkpoint, *QUICK]
        rc = gdws(*args, "--json", locked / "new.json")
        assert_refused(rc, 2, capsys, tmp_path, before, "cannot write in")
    finally:
        locked.chmod(0o755)


def test_a_folder_turning_read_only_during_the_work_fails_in_one_line(
    tmp_path, weights, capsys, monkeypatch
):
    checkpoint = copy_checkpoint(weights, tmp_path)
    out = tmp_path / "results" / "eval.json"
    args = ["eval", *DIGITS, "--checkpoint", checkpoint, *QUICK]
    assert gdws(*args, "--json", out) == 0, capsys.readouterr().err
    before = snapshot(tmp_path)
    real_open = os.open

    def read_only(path, flags, *rest, **kwargs):
        if Path(path).parent == out.parent and flags & os.O_CREAT:
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
        return real_open(path, flags, *rest, **kwargs)

    monkeypatch.setattr(files.os, "open", read_only)
    rc = gdws(*args, "--json", out)
    err = capsys.readouterr().err
    assert rc == 1, err
    assert os.strerror(errno.EROFS) in one_line(err)
    assert_kept(before, snapshot(tmp_path))
    assert not temporaries(tmp_path)


# -- 8. SIGKILL in the middle of a write -------------------------------------------------

BLOB = 20 * 2**20
# Runs files.py alone (standard library only), so the child starts in milliseconds.
WRITER = r"""
import importlib.util, sys
spec = importlib.util.spec_from_file_location("gdws_files", sys.argv[1])
files = importlib.util.module_from_spec(spec)
spec.loader.exec_module(files)
path, size = sys.argv[2], int(sys.argv[3])
print("ready", flush=True)
i = 0
while True:
    i += 1
    chunk = bytes([i % 250 + 1]) * 2**20
    with files.atomic_output(path) as temporary:
        with open(temporary, "wb") as f:
            for _ in range(size // 2**20):
                f.write(chunk)
"""


def _child(code: str, *args) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", code, str(Path(files.__file__)), *map(str, args)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


@pytest.mark.parametrize("seed", range(4))
def test_sigkill_during_a_write_leaves_the_old_or_the_new_file_whole(tmp_path, seed):
    path = tmp_path / "blob.bin"
    child = _child(WRITER, path, BLOB)
    try:
        assert child.stdout.readline().strip() == "ready"
        time.sleep(random.Random(seed).uniform(0.0, 0.8))
    finally:
        child.kill()
        child.communicate(timeout=30)
    assert child.returncode == -signal.SIGKILL
    if path.exists():
        data = path.read_bytes()
        assert len(data) == BLOB, "a half-written file"
        assert data == data[:1] * BLOB, "a file mixing two writes"
    left = temporaries(tmp_path)
    assert len(left) <= 1, left
    assert all(files.is_temporary(Path(p).name) for p in left)
    kept = snapshot(tmp_path).get("blob.bin")
    files.write_bytes_atomic(tmp_path / "other.bin", b"next write in the folder")
    assert not temporaries(tmp_path)  # the dead process's temporary is removed
    assert snapshot(tmp_path).get("blob.bin") == kept


def test_a_stale_temporary_of_a_live_process_is_kept(tmp_path):
    name = f".x.{os.getppid()}-abcd{files.TEMPORARY_SUFFIX}"
    (tmp_path / name).write_bytes(b"still being written")
    files.write_bytes_atomic(tmp_path / "y", b"y")
    assert (tmp_path / name).read_bytes() == b"still being written"


# -- 9. two processes, one output ----------------------------------------------------------

RACER = r"""
import importlib.util, os, sys, time
spec = importlib.util.spec_from_file_location("gdws_files", sys.argv[1])
files = importlib.util.module_from_spec(spec)
spec.loader.exec_module(files)
path, go, tag = sys.argv[2:5]
try:
    with files.atomic_output(path, replace=False) as temporary:
        with open(temporary, "wb") as f:
            f.write(tag.encode() * 2**20)
        print("waiting", flush=True)  # past the early exists-check, content written
        while not os.path.exists(go):
            time.sleep(0.001)
except FileExistsError as exc:
    print("exists:", exc, flush=True)
    sys.exit(3)
print("wrote", flush=True)
"""


@pytest.mark.parametrize("round_", range(2))
def test_two_processes_creating_one_output_one_wins_the_other_is_told(tmp_path, round_):
    path, go = tmp_path / "out" / "result.bin", tmp_path / "go"
    racers = [_child(RACER, path, go, tag) for tag in ("A", "B")]
    try:
        for racer in racers:
            assert racer.stdout.readline().strip() == "waiting", racer.stderr.read()
        go.touch()
        outs = [racer.communicate(timeout=60) for racer in racers]
    finally:
        for racer in racers:
            if racer.poll() is None:
                racer.kill()
                racer.communicate()
    codes = [racer.returncode for racer in racers]
    assert sorted(codes) == [0, 3], outs
    winner = "AB"[codes.index(0)]
    loser_says = outs[codes.index(3)][0]
    assert "another process" in loser_says and str(path) in loser_says
    assert path.read_bytes() == winner.encode() * 2**20
    assert not temporaries(tmp_path)


# -- 10. Ctrl-C and SIGTERM ---------------------------------------------------------------


def _environment() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _command() -> list[str]:
    if SCRIPT.exists():
        return [str(SCRIPT)]
    return [sys.executable, "-c", "from gdws_command import console_script; console_script()"]


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_an_interrupted_eval_says_what_it_kept_in_one_line(tmp_path, weights, signum):
    checkpoint = copy_checkpoint(weights, tmp_path / "run")
    out = tmp_path / "results" / "eval.json"
    partial = out.with_suffix(".partial")
    # 200 PGD steps per batch: the evaluation outlasts the signal, which is sent once the
    # first batch's part file appears (with 20 it could finish first on a fast machine).
    args = ["eval", *DIGITS, "--checkpoint", checkpoint, "--attack-iters", "200"]
    args += ["--batch-size", "16", "--save-every", "0", "--no-progress", "--threads", "1"]
    before = snapshot(tmp_path)
    run = subprocess.Popen(
        [*_command(), *map(str, args), "--json", str(out)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=_environment(),
    )
    try:
        deadline = time.monotonic() + 120
        while not (partial.is_dir() and any(partial.glob("part-*.pt"))):
            assert run.poll() is None, run.communicate()
            assert time.monotonic() < deadline
            time.sleep(0.02)
        run.send_signal(signum)
        _, err = run.communicate(timeout=60)
    finally:
        if run.poll() is None:
            run.kill()
            run.communicate()
    assert run.returncode == 130, err
    line = one_line(err)
    assert line.startswith("gdws: interrupted"), line
    assert "no output written" in line and str(partial) in line, line
    assert not out.exists()
    assert MANIFEST in os.listdir(partial)
    assert_kept(before, snapshot(tmp_path))
    assert not temporaries(tmp_path)


def _loading_libraries(pid: int) -> bool:
    """Whether the process maps a library from site-packages (numpy, torch): past
    Python's own start-up, inside gdws's imports."""
    try:
        return "site-packages" in Path(f"/proc/{pid}/maps").read_text()
    except OSError:
        return False


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs /proc")
@pytest.mark.parametrize("delay", [0.0, 0.15])
def test_ctrl_c_while_the_command_starts_is_one_line(tmp_path, delay):
    run = subprocess.Popen(
        [*_command(), "eval", *DIGITS, "--checkpoint", tmp_path / "none.pth", *QUICK],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=_environment(),
        cwd=tmp_path,
    )
    try:
        deadline = time.monotonic() + 60
        while not _loading_libraries(run.pid) and run.poll() is None:
            assert time.monotonic() < deadline
            time.sleep(0.002)
        time.sleep(delay)
        run.send_signal(signal.SIGINT)
        _, err = run.communicate(timeout=60)
    finally:
        if run.poll() is None:
            run.kill()
            run.communicate()
    if run.returncode == 2:  # it had already refused the missing checkpoint: also one line
        assert "no checkpoint at" in one_line(err)
    else:
        assert run.returncode == 130, err
        assert one_line(err).startswith("gdws: interrupted"), err
    assert os.listdir(tmp_path) == []


# -- 11. edited or foreign saved results -------------------------------------------------


def test_edited_or_foreign_resume_results_are_refused(tmp_path, weights, capsys, monkeypatch):
    checkpoint = copy_checkpoint(weights, tmp_path)
    res, out = tmp_path / "res", tmp_path / "eval.json"
    args = ["eval", *DIGITS, "--checkpoint", checkpoint, "--attack-iters", "1", "--no-progress"]
    args += ["--batch-size", "10", "--save-every", "0", "--resume-dir", res, "--json", out]
    real = evaluation.batch_outcomes
    calls = []

    def interrupted_on_the_second_batch(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*a, **k)

    with monkeypatch.context() as patch:
        patch.setattr(evaluation, "batch_outcomes", interrupted_on_the_second_batch)
        rc = gdws(*args, "--n-samples", "30")
    err = capsys.readouterr().err
    assert rc == 130, err
    assert one_line(err).startswith("gdws: interrupted") and str(res) in err
    (part,) = res.glob("part-*.pt")
    assert len(torch.load(part, weights_only=True)["ids"]) == 10
    assert not temporaries(tmp_path)

    before = snapshot(tmp_path)
    for other, differs in ((["--n-samples", "40"], "n_samples"), (["--seed", "1"], "attacks")):
        rc = gdws(*args, "--n-samples", "30", *other)
        line = assert_refused(rc, 2, capsys, tmp_path, before, "differs in")
        assert differs in line, line

    saved = torch.load(part, weights_only=True)
    saved["outcomes"] = ~saved["outcomes"]  # edited by hand, checksum not recomputed
    torch.save(saved, part)
    before = snapshot(tmp_path)
    rc = gdws(*args, "--n-samples", "30")
    assert_refused(rc, 2, capsys, tmp_path, before, "checksum", part.name)

    assert gdws(*args, "--n-samples", "30", "--fresh") == 0, capsys.readouterr().err
    assert json.loads(out.read_text())["resumed_samples"] == 0
    assert not res.exists() or os.listdir(res) == []
    assert not temporaries(tmp_path)


def test_fresh_still_removes_the_resume_folder_gdws_created(tmp_path, weights, capsys):
    checkpoint = copy_checkpoint(weights, tmp_path)
    res = tmp_path / "res"
    ResultStore(res, {"format": 0}).save("x", 0, torch.tensor([0]), torch.tensor([[True]]))
    args = ["eval", *DIGITS, "--checkpoint", checkpoint, *PGD1, "--resume-dir", res]
    rc = gdws(*args, "--json", tmp_path / "e.json", "--fresh")
    assert rc == 0, capsys.readouterr().err
    assert not res.exists()


def test_a_refused_resume_folder_does_not_promise_to_resume(tmp_path, weights, capsys):
    checkpoint = copy_checkpoint(weights, tmp_path)
    res = tmp_path / "res"
    ResultStore(res, {"format": 0}).save("x", 0, torch.tensor([0]), torch.tensor([[True]]))
    before = snapshot(tmp_path)
    args = ["eval", *DIGITS, "--checkpoint", checkpoint, *PGD1, "--resume-dir", res]
    rc = gdws(*args, "--json", tmp_path / "e.json")
    line = assert_refused(rc, 2, capsys, tmp_path, before, "another evaluation", "--fresh")
    assert "the same command resumes" not in line, line


# -- 12. any combination of output paths -------------------------------------------------

POOL = {
    "file": "file",  # a person's file
    "log": "acc.txt",  # an accuracy log (may be appended to)
    "folder": "folder",  # a folder holding a file
    "empty": "empty",  # an empty folder
    "link": "link",  # a symlink to "file"
    "under": "file/x.json",  # under a file
    "new": "new.json",  # a new path
    "deep": "deep/new.txt",  # a new path in a new folder
    "checkpoint": "model_best.pth",  # the input
    "table": "table.json",  # a latency table of this machine, for the digits CNN
    "tablelink": "tablelink.json",  # a symlink to "table"
    "cached": "cache/latency-tables.json",  # where the cache "cachedir" keeps its table
}
# GDWS_CACHE_DIR: a new folder, an empty one, a file, a path under a file.
CACHES = {"cachedir": "cache", "empty": "empty", "file": "file", "under": "file/x"}
LOG = "epsilon\ttestacc\n0.00000000\t50.000\n"
SAME = {"tablelink": "table", "link": "file"}  # names of the same file


def _populate(folder: Path, weights: Path) -> None:
    shutil.copyfile(weights, folder / "model_best.pth")
    (folder / "file").write_text("precious\n")
    (folder / "acc.txt").write_text(LOG)
    (folder / "folder").mkdir()
    (folder / "folder" / "inner.txt").write_text("inner\n")
    (folder / "empty").mkdir()
    (folder / "link").symlink_to("file")
    from _fake_timing import fake_timing

    from gdws_torch import eligible_convs
    from gdws_torch.cost.latency import layer_input_shapes
    from gdws_torch.cost.latency_tables import LatencyTable

    network = DigitsCNN().eval()
    convs = dict(eligible_convs(network))  # those a conversion times
    shapes = layer_input_shapes(network, list(convs), (1, 16, 16))
    with fake_timing():
        table = LatencyTable("eager", 1, "cpu", folder / "table.json")
        table.layers(convs, shapes)
        table.network(network, (1, 16, 16))
    (folder / "tablelink.json").symlink_to("table.json")


def _table_file(table: str | None, cache: str) -> str:
    """The pool name (or path) of the latency table the run reads and extends."""
    if table is not None:
        return SAME.get(table, table)
    return "cached" if cache == "cachedir" else f"{CACHES[cache]}/latency-tables.json"


def _expected_refusal(
    json_: str,
    log: str | None,
    resume: str | None,
    overwrite: bool,
    table: str | None = None,
    cache: str = "cachedir",
) -> bool:
    if json_ in ("folder", "empty", "link", "under", "checkpoint", "tablelink"):
        return True
    if json_ in ("file", "log", "table") and not overwrite:
        return True
    if log not in (None, "log", "new", "deep", "cached"):
        return True
    if resume not in (None, "empty", "new", "deep", "cached"):
        return True
    if table not in (None, "table", "tablelink", "new", "deep", "cached"):
        return True  # not a table, a folder, under a file, the checkpoint
    named = [n for n in (json_, log, resume) if n is not None]
    if _table_file(table, cache) in named:
        return True  # an output over the table
    if resume == "empty" and table is None and cache == "empty":
        return True  # the cache inside the resume folder
    return len(set(named)) < len(named)


WRITABLE = {"json": ["new", "deep", "file", "log"], "log": [None, "log", "new", "deep"]}
WRITABLE["resume"] = [None, "empty", "new", "deep"]
WRITABLE["table"] = [None, "table", "tablelink", "new", "deep"]


def _names(option: str):
    """A name of the pool, twice as often one that ``option`` may write to."""
    return st.sampled_from(2 * WRITABLE[option] + sorted(POOL))


@settings(max_examples=30)
@given(
    json_=_names("json"),
    log=_names("log"),
    resume=_names("resume"),
    overwrite=st.booleans(),
    table=st.one_of(st.none(), _names("table")),
    cache=st.sampled_from(sorted(CACHES)),
)
def test_any_output_paths_lose_nothing(weights, json_, log, resume, overwrite, table, cache):
    """eval's outputs, and the latency table its speed target reads and extends (given, or
    the cache of GDWS_CACHE_DIR), from any paths: each refused before the work, or
    written with nothing else changed."""
    from unittest import mock

    from _fake_timing import fake_timing

    from gdws_torch.cost.latency_tables import LatencyTable

    with tempfile.TemporaryDirectory() as name:
        folder = Path(name)
        _populate(folder, weights)
        args = ["eval", *DIGITS, "--checkpoint", folder / "model_best.pth", *QUICK]
        args += ["--apply-gdws", "--target-speedup", "1.05", "--allow-miss"]
        args += ["--json", folder / POOL[json_]]
        if log is not None:
            args += ["--logfilename", folder / POOL[log]]
        if resume is not None:
            args += ["--resume-dir", folder / POOL[resume]]
        if table is not None:
            args += ["--latency-table", folder / POOL[table]]
        if overwrite:
            args += ["--overwrite"]
        before = snapshot(folder)
        out, err = io.StringIO(), io.StringIO()
        environment = {"GDWS_CACHE_DIR": str(folder / CACHES[cache])}
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            with mock.patch.dict(os.environ, environment), fake_timing(speedup=1.05):
                rc = gdws(*args)
        after = snapshot(folder)
        refused = _expected_refusal(json_, log, resume, overwrite, table, cache)
        event("refused" if refused else "written")
        assert rc == (2 if refused else 0), err.getvalue()
        if refused:
            one_line(err.getvalue())
            assert after == before
            assert not temporaries(folder)
            return
        allowed = {POOL[json_]} if overwrite else set()
        if log == "log":
            allowed.add(POOL["log"])
        allowed.add("table.json")  # extended, never replaced: checked below
        assert_kept(before, after, allowed)
        assert json.loads((folder / POOL[json_]).read_text())["command"] == "eval"
        if log is not None:
            lines = (folder / POOL[log]).read_text().splitlines()
            assert lines[0] == "epsilon\ttestacc" and len(lines) >= 2
        if resume == "empty":
            assert os.listdir(folder / "empty") == []
        elif resume is not None:
            assert not (folder / POOL[resume]).exists()
        assert not (folder / POOL[json_]).with_suffix(".partial").exists()
        written = _table_file(table, cache)
        if table is None and cache in ("file", "under"):  # the cache cannot be written
            assert "cannot be written" in out.getvalue()
        else:
            path = folder / POOL.get(written, written)
            assert len(LatencyTable("eager", 1, "cpu", path)) == 4  # complete, checked
        assert (folder / "tablelink.json").is_symlink()
        if json_ != "table":  # else replaced by the results, as --overwrite asked
            assert len(LatencyTable("eager", 1, "cpu", folder / "table.json")) == 4
        assert not temporaries(folder)


# -- 13. wrong numbers and tracebacks become refusals, through the command line ----------


def _inputs(folder: Path, weights: Path, onnx_model: Path) -> dict[str, Path]:
    """Bad input files of every kind, made in ``folder``."""
    import pickle

    from test_datasets import write_cifar10

    run = folder / "run"
    copy_checkpoint(weights, run)
    state = torch.load(weights, weights_only=True)["state_dict"]
    nan_state = {k: v.clone() for k, v in state.items()}
    next(v for v in nan_state.values() if v.is_floating_point())[0] = float("nan")
    torch.save({"state_dict": nan_state}, folder / "nan.pth")
    (folder / "empty.pth").write_bytes(b"")
    complex_gains = {"noise_gains": {"features.1.0.weight": torch.ones(32, dtype=torch.cfloat)}}
    torch.save(complex_gains, run / "complex.pth")
    copy_checkpoint(weights, run)
    run18 = folder / "run18"
    run18.mkdir()
    torch.save({"state_dict": PreActResNet18().state_dict()}, run18 / "model_best.pth")
    write_cifar10(folder / "cifar")
    batch = folder / "cifar" / "cifar-10-batches-py" / "test_batch"
    data = pickle.loads(batch.read_bytes())
    data[b"labels"][1] = 0.5
    batch.write_bytes(pickle.dumps(data, protocol=2))
    (folder / "afile").write_text("a person's file\n")
    shutil.copyfile(onnx_model, folder / "in.onnx")
    return {"run": run}


CIFAR = ["--data-dir", "cifar", "--fname", "run18"]
CASES = {
    "diverging training": (
        ["train", *DIGITS, *TRAIN, "--lr", "1e6", "--out", "new/m.pth"],
        1,
        "training diverged",
    ),
    "NaN weights": (["eval", *DIGITS, "--checkpoint", "nan.pth", *QUICK], 2, "NaN or inf"),
    "empty checkpoint": (
        ["eval", *DIGITS, "--checkpoint", "empty.pth", *QUICK],
        2,
        "not a torch checkpoint (empty file)",
    ),
    "empty converted model": (
        ["eval", *DIGITS, "--converted", "empty.pth", *QUICK],
        2,
        "not a torch checkpoint (empty file)",
    ),
    "no attack iterations": (
        ["eval", *DIGITS, "--fname", "run", "--attack-iters", "0", "--no-progress"],
        2,
        "--attack-iters must be positive",
    ),
    "complex alphas": (
        ["eval", *DIGITS, "--fname", "run", *QUICK, "--apply-gdws", "--alphas", "complex.pth"],
        2,
        "real numbers",
    ),
    "label 0.5": (
        ["eval", "--model", "preactresnet18", "--dataset", "cifar10", *CIFAR, *QUICK],
        2,
        "label 0.5",
    ),
    "refit beyond the training data": (
        ["eval", *DIGITS, "--fname", "run", *QUICK, "--apply-gdws", "--refit", "1000000"],
        2,
        "--refit 1000000 exceeds",
    ),
    "convert over its input": (
        ["convert", *DIGITS, "--fname", "run", "--beta", "0", "--out", "model_best.pth"],
        2,
        "an input of this command",
    ),
    "demo into a file": (["demo", "--quick", "--out-dir", "afile"], 2, "is a file, not a folder"),
    "huge kernel multiple": (
        ["onnx-convert", "in.onnx", "out.onnx", "--beta", "0", "--kernel-multiple", "1000000"],
        2,
        "--kernel-multiple must be an integer from 1 to 64; got 1000000",
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_refused_in_one_line_and_writes_nothing(
    tmp_path, weights, onnx_model, capsys, monkeypatch, case
):
    _inputs(tmp_path, weights, onnx_model)
    monkeypatch.chdir(tmp_path)
    before = snapshot(tmp_path)
    args, code, fragment = CASES[case]
    assert_refused(gdws(*args), code, capsys, tmp_path, before, fragment)
