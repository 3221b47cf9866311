"""Issue 13: the CLI as a new user meets it, every case through the real entry point
(``python -m edgepack.cli`` runs ``edgepack.cli:main``, the console script), in an 80-column terminal.

Conventions (``--version``, ``-h``, help on every option, flags without ``<bool>``, ``-t``,
``report -o``, ``--json`` errors, one rule for output folders, ``--quiet``) and errors that say
what to do (each case reproduced from the issue).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import small_cnn

ROOT = Path(__file__).resolve().parents[1]


def ep(*args: str, cwd: Path | None = None, env: dict[str, str] | None = None,
       timeout: float = 300) -> subprocess.CompletedProcess:
    """``edgepack ARGS`` through its real entry point, in an 80-column terminal."""
    e = {**os.environ, "COLUMNS": "80", "PYTHONPATH": str(ROOT), "EDGEPACK_EMULATED_BOARD": "0", **(env or {})}
    e.pop("EDGEPACK_PROJECT", None)
    return subprocess.run([sys.executable, "-m", "edgepack.cli", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd or ROOT, env=e, timeout=timeout)


def one_line_error(r: subprocess.CompletedProcess) -> str:
    assert r.returncode != 0, r.stderr
    assert "Traceback" not in r.stderr, r.stderr
    lines = [ln for ln in r.stderr.strip().splitlines() if ln.strip()]
    assert lines and lines[-1].startswith("error:"), r.stderr
    return " ".join(lines)  # a long line folds onto several terminal lines: read it as one


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    d = tmp_path_factory.mktemp("pki")
    for a in (["keys", "init-root", d / "k"], ["keys", "new-release-key", d / "k" / "r.key"],
              ["keys", "sign-release-keys", "--root", d / "k" / "root.json", "--root-key", d / "k" / "root-1.key",
               "--root-key", d / "k" / "root-2.key", "--key", d / "k" / "r.key.pub", "--version", 1,
               "-o", d / "k" / "rk.json"], ["keys", "init-root", d / "other"]):
        assert ep(*a).returncode == 0
    small_cnn(d / "m.onnx")
    return d


def bundle_args(pki: Path, **over: str) -> list:
    a = {"--name": "m", "--release": "1", "--target": "rpi4-2gb", "--key": pki / "k" / "r.key",
         "--release-keys": pki / "k" / "rk.json", "--root": pki / "k" / "root.json"}
    a.update(over)
    return ["bundle", pki / "m.onnx", *sum(([k, v] for k, v in a.items()), [])]


# ------------------------------------------------------------------------- conventions
def test_version_and_short_help_exit_zero():
    r = ep("--version")
    assert r.returncode == 0 and r.stdout.startswith("edgepack 0.") and "agent" in r.stdout
    for args in (["-h"], ["push", "-h"], ["fleet", "status", "-h"], ["keys", "-h"]):
        r = ep(*args)
        assert r.returncode == 0 and "Usage: edgepack" in r.stdout, (args, r.stderr)


def test_help_shows_flags_as_flags_and_values_by_name():
    for args in (["push", "-h"], ["bundle", "-h"], ["quantize", "-h"], ["-h"]):
        out = ep(*args, env={"COLUMNS": "200"}).stdout
        assert "<bool>" not in out and "<list[" not in out, out
    out = ep("bundle", "-h", env={"COLUMNS": "200"}).stdout
    assert "--key" in out and "PATH" in out and "--allow-oversize" in out


def test_every_option_has_help_text_and_targets_take_t():
    sys.path.insert(0, str(ROOT))
    import edgepack.cli as cli

    missing, no_t = [], []

    def walk(cmd, path=()):
        for p in cmd.params:
            if hasattr(p, "is_flag") and not p.hidden and not p.help:
                missing.append((" ".join(path), p.opts))
            if hasattr(p, "is_flag") and "--target" in p.opts and "-t" not in p.opts:
                no_t.append(" ".join(path))
        for n, sub in getattr(cmd, "commands", {}).items():
            walk(sub, path + (n,))

    walk(cli.command())
    assert not missing, missing
    assert not no_t, no_t


def test_json_failure_prints_a_json_error_object(pki, tmp_path):
    (tmp_path / "x.bundle").write_bytes(b"hello")
    r = ep("verify", tmp_path / "x.bundle", "--root", pki / "k" / "root.json", "--json")
    assert r.returncode != 0
    d = json.loads(r.stdout)
    assert d["ok"] is False and d["error"]["type"] and d["error"]["exit_code"] == r.returncode
    assert "bad magic" in d["error"]["message"]


def test_one_rule_for_output_folders_and_report_o(pki, tmp_path):
    out = tmp_path / "new" / "deeper" / "b.bundle"
    r = ep(*bundle_args(pki), "-o", out, "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["output"] == str(out) and out.is_file()
    r = ep(*bundle_args(pki), "-o", tmp_path / "new")  # a folder is not an output file
    assert "is a folder" in one_line_error(r)
    r = ep("report", "-h")
    assert "-o" in r.stdout and r.returncode == 0


def test_quiet_leaves_out_tables_json_unchanged(pki, tmp_path):
    r = ep("-q", *bundle_args(pki), "-o", tmp_path / "q.bundle")
    assert r.returncode == 0 and r.stderr.strip() == ""
    r = ep("-q", *bundle_args(pki, **{"--release": "2"}), "-o", tmp_path / "q2.bundle", "--json")
    assert json.loads(r.stdout)["release"] == 2


# ------------------------------------------------------------------------- errors that say what to do
def test_public_key_as_key_says_so(pki, tmp_path):
    line = one_line_error(ep(*bundle_args(pki, **{"--key": pki / "k" / "r.key.pub"}), "-o", tmp_path / "b.bundle"))
    assert "is a public key" in line and "r.key" in line and "chmod" not in line
    assert not (tmp_path / "b.bundle").exists()


def test_name_with_a_space_is_a_name_error(pki, tmp_path):
    line = one_line_error(ep(*bundle_args(pki, **{"--name": "my model"}), "-o", tmp_path / "b.bundle"))
    assert "model name 'my model'" in line and "--name my-model" in line and "manifest" not in line


def test_unknown_target_refused(pki, tmp_path):
    r = ep(*bundle_args(pki, **{"--target": "nosuchboard"}), "-o", tmp_path / "b.bundle")
    line = one_line_error(r)
    assert r.returncode == 2 and "unknown target" in line and "rpi4-2gb" in line and "--any-target" in line
    assert not (tmp_path / "b.bundle").exists()
    assert ep(*bundle_args(pki, **{"--target": "my-board"}), "--any-target", "-o", tmp_path / "b.bundle").returncode == 0


def test_wrong_root_and_text_file_as_root(pki, tmp_path):
    b = tmp_path / "b.bundle"
    assert ep(*bundle_args(pki), "-o", b).returncode == 0
    line = one_line_error(ep("verify", b, "--root", pki / "other" / "root.json"))
    assert "different root" in line and "collect more" not in line
    (tmp_path / "notes.txt").write_text("this is not a root\n")
    for args in (["verify", b, "--root", tmp_path / "notes.txt"],
                 bundle_args(pki, **{"--root": tmp_path / "notes.txt"}) + ["-o", tmp_path / "c.bundle"]):
        line = one_line_error(ep(*args))
        assert "is not a trust document" in line and "rebuild the bundle" not in line


def test_bad_data_one_line_before_any_work(tmp_path):
    m = small_cnn(tmp_path / "m.onnx")
    x = np.random.default_rng(0).normal(0, 1, (16, 1, 8, 8)).astype(np.float32)
    np.savez(tmp_path / "e.npz", inputs=x)
    (tmp_path / "empty").mkdir()
    np.savez(tmp_path / "int.npz", inputs=(x * 10).astype(np.int64))
    xn = x.copy()
    xn[3, 0, 2, 2] = np.nan
    np.savez(tmp_path / "nan.npz", inputs=xn)
    xi = x.copy()
    xi[15, 0, 7, 7] = np.inf     # the last sample: arrays are checked whole, not only the first few
    np.savez(tmp_path / "inf.npz", inputs=xi)
    np.savez(tmp_path / "f64.npz", inputs=x.astype(np.float64))   # evaluation data is float32
    for calib, needle in (("empty", "holds no images"), ("int.npz", "integer dtype"), ("nan.npz", "NaN"),
                          ("inf.npz", "NaN or Inf"), ("f64.npz", "dtype float32 but calibration data has float64")):
        r = ep("quantize", m, "-t", "x86-vnni", "--calib", tmp_path / calib, "--eval", tmp_path / "e.npz",
               "-o", tmp_path / "q.onnx", timeout=120)
        line = one_line_error(r)
        assert needle in line and "no preprocessing is declared" not in line, line
        assert not (tmp_path / "q.onnx").exists()


def test_rich_markup_does_not_eat_toml_tables(tmp_path):
    (tmp_path / "fleet.toml").write_text("[fleet]\nstore = 'f.db'\n")
    line = one_line_error(ep("fleet", "bootstrap", "--fleet", tmp_path / "fleet.toml", "--trust-root", tmp_path / "x"))
    assert "[[boards]]" in line
    (tmp_path / "t.toml").write_text('name = "t"\ndescription = "x"\n')
    line = one_line_error(ep("quantize", tmp_path / "m.onnx", "-t", tmp_path / "t.toml", "--calib", tmp_path,
                             "--eval", tmp_path, "-o", tmp_path / "q.onnx"))
    assert "[[compute]]" in line or "compute" in line


def test_status_in_a_new_folder_creates_nothing(tmp_path):
    r = ep("fleet", "status", cwd=tmp_path)
    line = one_line_error(r)
    assert "no fleet store" in line and "edgepack init" in line
    assert not (tmp_path / ".edgepack").exists()


def test_push_advice_is_not_cut_off(tmp_path, pki):
    """A board that was never bootstrapped: the note with what to do reaches the end, in 80 columns."""
    b = tmp_path / "b.bundle"
    assert ep(*bundle_args(pki), "-o", b).returncode == 0
    r = ep("push", b, cwd=tmp_path, timeout=300)
    assert r.returncode != 0
    note = next(ln for ln in r.stderr.splitlines() if ln.startswith("(1) local: "))
    assert note.rstrip().endswith("run `edgepack fleet bootstrap` for it"), r.stderr


@pytest.mark.skipif(not Path("/usr/sbin/sshd").is_file(), reason="Debian openssh-server is installed by setup.sh")
def test_bootstrap_unknown_host_key_exits_23_with_whole_advice(tmp_path, pki):
    from fleet_helpers import fleet_toml, keygen, make_boards

    key = keygen(tmp_path / "id")
    boards = make_boards(tmp_path, 1, key.with_suffix(".pub"))
    boards[0].sshd.start()
    try:
        kh = tmp_path / "known_hosts"
        kh.write_text("")
        ft = fleet_toml(tmp_path / "fleet.toml", boards, key=key, known_hosts=kh)
        r = ep("fleet", "bootstrap", "--fleet", ft, "--trust-root", pki / "k" / "root.json", timeout=120)
        assert r.returncode == 23, r.stderr
        note = next(ln for ln in r.stderr.splitlines() if ln.startswith("(1) b0: "))  # whole, under the table
        assert f"`ssh-keyscan -p {boards[0].sshd.port} -t ssh-ed25519 127.0.0.1 >> {kh}`" in note, r.stderr
        assert "SHA256:" in note and "see (1)" in r.stderr
        # doctor names the same problem and the same fix
        r = ep("doctor", "--fleet", ft, "--no-boards", "--json", cwd=tmp_path)
        d = json.loads(r.stdout)
        bad = [c for c in d["checks"] if c["status"] == "fail"]
        assert r.returncode == 1 and any("ssh-keyscan" in c["advice"] for c in bad)
    finally:
        boards[0].sshd.kill()


def test_json_usage_error_is_a_json_object_too():
    r = ep("verify", "--json")
    d = json.loads(r.stdout)
    assert r.returncode == 2 and d == {"ok": False, "error": {"type": "UsageError", "message": d["error"]["message"],
                                                              "exit_code": 2}}
    assert "BUNDLE" in d["error"]["message"]


def test_init_refuses_to_overwrite_and_a_broken_project_file_is_one_line(tmp_path):
    r = ep("init", "p", "--name", "my model", cwd=tmp_path)
    assert "--name my-model" in one_line_error(r) and not (tmp_path / "p" / "edgepack.toml").exists()
    assert ep("init", "p", "-t", "rpi4-2gb", cwd=tmp_path).returncode == 0
    keys = sorted(p.name for p in (tmp_path / "p" / "keys").iterdir())
    assert "release-1.key" in keys and "root.json" in keys and "release-keys.json" in keys
    assert "already exists" in one_line_error(ep("init", "p", cwd=tmp_path))
    assert ep("init", "q", "-t", "nosuchboard", cwd=tmp_path).returncode == 2 and not (tmp_path / "q").exists()
    (tmp_path / "p" / "edgepack.toml").write_text("[project\nname = 1\n")
    line = one_line_error(ep("targets", cwd=tmp_path / "p"))
    assert "edgepack.toml is not valid TOML" in line


def test_transfer_bars_follow_the_push_byte_hook():
    sys.path.insert(0, str(ROOT))
    from edgepack.cli.fleet import TransferBars

    with TransferBars(enabled=True, total=1000) as bars:
        bars.on_bytes("cam-01", 400)
        bars.on_bytes("cam-01", 1200)  # a resend: the bar grows instead of overflowing
        bars.on_bytes("cam-[red]x", 10)  # a board name is not markup
        tasks = {t.description: (t.completed, t.total) for t in bars.p.tasks}
    assert tasks["cam-01"] == (1200, 1200) and tasks[r"cam-\[red]x"] == (10, 1000)


def test_quiet_still_prints_the_error_and_verbose_its_cause(tmp_path):
    (tmp_path / "t.txt").write_text("not json")
    r = ep("-q", "keys", "show", tmp_path / "t.txt")
    assert r.returncode != 0 and r.stderr.startswith("error:"), r.stderr
    r = ep("-v", "verify", tmp_path / "t.txt", "--root", tmp_path / "t.txt")
    assert "error:" in r.stderr and "Traceback" not in r.stderr
