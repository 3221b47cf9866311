"""The board's own figures: run a model on a board (``evaluate_on_board``, any board, real or
emulated) and confirm a quantized model's accuracy there (``edgepack quantize --confirm-on BOARD``).

The quantizer predicts the board's figure on this host from the target's declared arithmetic
(edgepack.quantize.numerics). The board itself, real or emulated under qemu (edgepack.fleet.emulated),
is the ground truth: the final model is run there on the same held-out samples and the two
figures are shown side by side. A difference of more than ``max_mismatch`` samples means the
host-side model of the board's numerics is wrong for this model, and is an error.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from ..data import Dataset
from ..errors import BoardMismatch
from ..quantize.evaluate import predict, session
from .agent_client import agent_error
from .emulated import KINDS, default_emulated_boards, emulator_kind, is_emulated
from .errors import AgentCommandFailed, InventoryError
from .inventory import Board, Fleet


@dataclass(frozen=True)
class BoardConfirmation:
    board: str
    samples: int
    board_agreement: float        # percent of held-out samples whose board top-1 matches FP32
    predicted_agreement: float    # what quantize computed on this host in the board's arithmetic
    mismatch_samples: int         # |board - predicted| in samples
    max_mismatch: int

    def to_dict(self) -> dict:
        return asdict(self)


def confirm_on_board(board: str, fp32_model: str | Path, int8_model: str | Path, holdout: Dataset,
                     predicted_agreement: float, *, max_mismatch: int = 2, fleet=None) -> BoardConfirmation:
    """Run ``int8_model`` on ``board`` over ``holdout``; raise BoardMismatch past ``max_mismatch``."""

    ref = predict(session(Path(fp32_model)), holdout).argmax(1)
    names = [i.name for i in session(Path(int8_model)).get_inputs()]
    feeds = [f for _, f in holdout.feeds(len(holdout), names)][0]
    top1 = np.asarray(evaluate_on_board(board, int8_model, feeds if len(feeds) > 1 else next(iter(feeds.values())),
                                        fleet=fleet))
    n = len(ref)
    agree = float((top1 == ref).mean() * 100)
    mism = int(round(abs(agree - predicted_agreement) * n / 100))
    c = BoardConfirmation(board, n, round(agree, 3), round(predicted_agreement, 3), mism, max_mismatch)
    if mism > max_mismatch:
        raise BoardMismatch(f"board {board} gives {agree:.2f} % agreement on {n} held-out samples where this host "
                            f"predicted {predicted_agreement:.2f} % ({mism} samples apart, {max_mismatch} allowed): "
                            "the target's declared int8_arithmetic does not match this board; report it with the model")
    return c


# --------------------------------------------------------------------------- the board's own top-1
def _resolve(board_or_name: Any, fleet: Any) -> tuple[Any, Any]:
    if isinstance(board_or_name, Board):
        return board_or_name, fleet or Fleet.default()
    fl = fleet or Fleet.default()
    name = str(board_or_name)
    try:
        return fl.board(name), fl
    except InventoryError:
        if fleet is None:  # asked for by name: the default emulated board even where the default leaves it out
            from .inventory import DEFAULT_HOME
            home = Path(os.environ.get("EDGEPACK_FLEET_HOME") or DEFAULT_HOME)
            for d in default_emulated_boards(home, always=True):
                if d["name"] == name:
                    return Board(**d), fl
        hint = next((f"; {k.missing()}" for k in KINDS.values() if k.default_name == name and not k.available()), "")
        raise InventoryError(f"no board named {name!r} in the fleet ({', '.join(b.name for b in fl.boards)}){hint}") from None


def _ensure_agent(t: Any, board: Any) -> None:
    """An emulated board without the agent gets the zipapp (what bootstrap copies); eval --model
    needs no initialised state."""
    if board.agent or t.size(board.agent_path) is not None:
        return
    from .agent_zipapp import build_zipapp
    with tempfile.TemporaryDirectory(prefix="edgepack-agent-") as td:
        pyz = build_zipapp(Path(td) / "edgepack-agent.pyz").path
        t.makedirs(str(Path(board.agent_path).parent))
        t.put(pyz, board.agent_path + ".part")
        t.rename(board.agent_path + ".part", board.agent_path)


def evaluate_on_board(board_or_name: Any, model_path: str | Path, inputs: Any, *, fleet: Any = None,
                      runtime: str | None = None, threads: int | None = None,
                      timeout: float | None = None) -> Any:
    """Run ``model_path`` on the board over ``inputs``; return the board's top-1 class per sample.

    ``inputs``: an array whose axis 0 enumerates samples (one more axis than the model input, or
    the model's own batch-of-one shape stacked), or ``{input_name: array}`` for several inputs.
    ``board_or_name``: a Board, or a board name in ``fleet`` (default: the embedded default fleet,
    whose emulated Raspberry Pi 4 is ``rpi4-emu``). Works for any board the fleet reaches; on an
    emulated one it is the board's arithmetic (ARM kernels) at the emulator's speed (about 1.2 s
    per EfficientNet-Lite0 image). Raises InventoryError (unknown board, emulator missing),
    AgentCommandFailed (the agent refused or the model did not run, with its message) or the
    transport's errors. The files sent are removed afterwards.
    """
    import numpy as np

    from .transport import file_sha256, open_transport
    board, fl = _resolve(board_or_name, fleet)
    if is_emulated(board) and not emulator_kind(board.kind).available() and board.python == str(
            emulator_kind(board.kind).python()):
        raise InventoryError(f"board {board.name}: {emulator_kind(board.kind).missing()}")
    model_path = Path(model_path)
    if not model_path.is_file():
        raise InventoryError(f"model {model_path} not found")
    arrays: Mapping[str, Any] = inputs if isinstance(inputs, Mapping) else {"inputs": inputs}
    arrays = {(k if k == "inputs" or k.startswith("inputs_") else f"inputs_{k}"): np.asarray(v)
              for k, v in arrays.items()}
    n = len(next(iter(arrays.values())))
    if n == 0 or any(len(v) != n for v in arrays.values()):
        raise InventoryError("inputs: every array needs the same number (> 0) of samples on axis 0")
    with tempfile.TemporaryDirectory(prefix="edgepack-confirm-") as td:
        data = Path(td) / "inputs.npz"
        np.savez(data, **arrays)
        tag = hashlib.sha256((file_sha256(model_path) + file_sha256(data)).encode()).hexdigest()[:16]
        remote = f"{board.incoming.rstrip('/')}/confirm-{tag}"
        rmodel, rdata = f"{remote}/{'model' + model_path.suffix}", f"{remote}/inputs.npz"
        t = open_transport(board, fl)
        try:
            t.connect()
            _ensure_agent(t, board)
            t.makedirs(remote)
            t.put(model_path, rmodel)
            t.put(data, rdata)
            args = ["eval", "--model", rmodel, "--data", rdata, "--per-sample"]
            if runtime:
                args += ["--runtime", runtime]
            if threads is not None:
                args += ["--threads", str(threads)]
            res = t.agent(*args, timeout=timeout or 300.0 + 10.0 * n)
            j = res.json()
        finally:
            try:
                t.remove(rmodel)
                t.remove(rdata)
                if board.transport == "local":
                    shutil.rmtree(os.path.expanduser(remote), ignore_errors=True)
            finally:
                t.close()
    if res.rc != 0 or not j.get("ok") or not isinstance(j.get("top1"), list):
        e = agent_error(j)
        raise AgentCommandFailed(f"board {board.name}: eval of {model_path.name} failed (exit {res.rc}): "
                                 f"{e.type}: {(e.message or res.stderr.strip()[-300:])[:300]}", j,
                                 agent_error_type=e.type)
    top1 = np.asarray(j["top1"], dtype=np.int64)
    if top1.shape != (n,):
        raise AgentCommandFailed(f"board {board.name}: eval returned {top1.size} predictions for {n} samples", j)
    return top1
