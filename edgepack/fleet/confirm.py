"""Confirm a quantized model's accuracy on a board (``edgepack quantize --confirm-on BOARD``).

The quantizer predicts the board's figure on this host from the target's declared arithmetic
(edgepack.quantize.numerics). The board itself, real or emulated under qemu (edgepack.fleet.emulated),
is the ground truth: the final model is run there on the same held-out samples and the two
figures are shown side by side. A difference of more than ``max_mismatch`` samples means the
host-side model of the board's numerics is wrong for this model, and is an error.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from ..data import Dataset
from ..errors import BoardMismatch
from ..quantize.evaluate import predict, session


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
    from .emulated import evaluate_on_board

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
