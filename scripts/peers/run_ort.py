#!/usr/bin/env python3
"""Plain ONNX Runtime quantize_static (QDQ, MinMax): defaults (per-tensor) and per-channel."""
from __future__ import annotations

import numpy as np
import onnx

from _common import Timer, parser, report, versions


def main() -> None:
    a = parser(["default", "per-channel"]).parse_args()
    from onnxruntime.quantization import CalibrationDataReader, quantize_static

    x = np.load(a.calib)
    name = onnx.load(a.model, load_external_data=False).graph.input[0].name

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter(range(len(x)))

        def get_next(self):
            i = next(self.it, None)
            return None if i is None else {name: x[i:i + 1]}

    with Timer() as t:
        quantize_static(a.model, a.out, Reader(), per_channel=a.variant == "per-channel")
    report(a.variant, t.s, "quantize_static, every other argument default (QDQ, MinMax, s8 weights, "
           "u8 activations)" + (", per_channel=True" if a.variant == "per-channel" else ""),
           versions("onnxruntime", "onnx", "numpy"))


if __name__ == "__main__":
    main()
