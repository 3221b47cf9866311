"""The agent names the LiteRT delegate that really ran (XNNPACK or none) and refuses one the board lacks.

Real processes (`python -m device_agent`), real LiteRT, real .tflite files written with LiteRT's
schema: a full-integer model XNNPACK takes, and an int32 ADD it takes no op of.
"""
from __future__ import annotations

import numpy as np
import pytest

from agent_helpers import bundle, init_board, make_pki, run_agent
from tflite_fixtures import int32_add, int8_mlp, weights

from device_agent.agent_errors import AcceleratorUnavailable
from device_agent.runtime import load_model


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("tfl-agent")
    w, b = weights()
    return int8_mlp(d / "int8.tflite", w, b), int32_add(d / "add.tflite")


def test_delegate_that_ran_is_named(files):
    int8, add = files
    assert load_model(int8, "litert", threads=1).provider == "XNNPACK"
    assert load_model(int8, "litert", threads=1, accelerator="none").provider == "none (builtin kernels)"
    # LiteRT applies XNNPACK by default only where it takes ops: an int32 ADD runs on the builtin kernels
    s = load_model(add, "litert", threads=1)
    assert s.provider == "none (builtin kernels)"
    assert np.array_equal(s.run({"a": np.array([[1, 2, 3, 4]], np.int32)})[0], [[1, 3, 5, 7]])


def test_bench_reports_it_and_refuses_a_missing_delegate(files):
    int8, add = files
    code, out, err = run_agent(None, "bench", "--model", str(int8), "--runtime", "litert", "--runs", "5", "--threads", "1")
    assert code == 0 and out["provider"] == "XNNPACK", err
    code, out, err = run_agent(None, "bench", "--model", str(int8), "--runtime", "litert", "--runs", "5",
                               "--accelerator", "none")
    assert code == 0 and out["provider"] == "none (builtin kernels)", err
    # XNNPACK required but it takes no op of this model: refused, not silently run on the builtin kernels
    code, out, err = run_agent(None, "bench", "--model", str(add), "--runtime", "litert", "--runs", "5",
                               "--accelerator", "xnnpack")
    assert code == 8 and "XNNPACK" in err and "Traceback" not in err, err
    with pytest.raises(AcceleratorUnavailable, match="took no op"):
        load_model(add, "litert", accelerator="xnnpack")
    # a delegate library this board does not have
    code, out, err = run_agent(None, "bench", "--model", str(int8), "--runtime", "litert", "--runs", "5",
                               "--accelerator", "libedgetpu_absent.so.1")
    assert code == 8 and "libedgetpu_absent.so.1" in err and "Traceback" not in err, err


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # LiteRT's Delegate.__del__ bug
def test_full_integer_bundle_installs_and_trial_names_xnnpack(tmp_path, files):
    int8, _ = files
    from device_agent.health import smoke_feed  # noqa: F401  (the trial's own smoke input for int8 models)

    pki = make_pki(tmp_path / "pki")
    (tmp_path / "m").mkdir()
    m = tmp_path / "m" / "model.tflite"
    m.write_bytes(int8.read_bytes())
    x = np.random.default_rng(0).integers(-128, 128, (4, 1, 8)).astype(np.int8)
    s = load_model(m, "litert", threads=1)
    y = np.stack([s.run({"x": xi})[0] for xi in x])
    np.savez(tmp_path / "g.npz", inputs=x, outputs=y)
    b = bundle(pki, tmp_path / "r1.bundle", m, release=1, golden=tmp_path / "g.npz",
               settings={"runtime": "litert", "threads": 1})
    a = init_board(tmp_path / "board", pki, runtimes=["litert"], threads=1, trial_in_process=True)
    r = a.install(b)
    assert r.status == "committed" and r.trial["provider"] == "XNNPACK", r
    code, out, err = run_agent(tmp_path / "board", "eval")
    assert code == 0 and out["provider"] == "XNNPACK" and out["comparison"]["top1_agreement"] == 1.0, err
