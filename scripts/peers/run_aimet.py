#!/usr/bin/env python3
"""AIMET-ONNX: QuantSim defaults, CLE, AdaRound, and the PTQ recipe its docs give
(BN fold + CLE, then AdaRound, then QuantSim compute_encodings), exported as QDQ ONNX with
int8 weights (to_onnx_qdq(prequantize_constants=True)) so ORT can run it and its size is real.

  ptq        QuantSim defaults (min_max; aimet-onnx 2.42's "default" config alias IS
             default_config_per_channel.json: per-channel symmetric Conv/Gemm weights), compute_encodings
  per-channel  default_config_per_channel.json named explicitly (the same model as ptq in 2.42)
  cle        equalize_model (BN fold, ReLU6 -> ReLU, CLE, bias absorption) + QuantSim defaults
  adaround   QuantSim defaults + apply_adaround
  recipe     CLE + QuantSim per-channel config, tf_enhanced + apply_adaround + compute_encodings
"""
from __future__ import annotations

import os

import numpy as np
import onnx

from _common import Timer, parser, report, versions


def main() -> None:
    a = parser(["ptq", "per-channel", "cle", "adaround", "recipe"]).parse_args()
    import torch

    torch.set_num_threads(2)   # the machine's 2 cores are shared
    from aimet_onnx import QuantizationSimModel, apply_adaround
    from aimet_onnx.cross_layer_equalization import equalize_model

    model = onnx.load(a.model)
    name = model.graph.input[0].name
    x = np.load(a.calib)
    batches = [{name: x[i:i + 10]} for i in range(0, len(x), 10)]
    kw: dict = {}
    notes = []
    with Timer() as t:
        if a.variant in ("cle", "recipe"):
            equalize_model(model)
            notes.append("equalize_model (BN fold, ReLU6->ReLU, CLE, high-bias absorption)")
        if a.variant in ("recipe", "per-channel"):
            import aimet_onnx.common.quantsim_config as qc

            kw = {"config_file": os.path.join(os.path.dirname(qc.__file__), "default_config_per_channel.json")}
            if a.variant == "recipe":
                kw["quant_scheme"] = "tf_enhanced"
            notes.append("QuantSim default_config_per_channel.json" +
                         (", quant_scheme=tf_enhanced" if a.variant == "recipe" else ", min_max"))
        else:
            notes.append("QuantSim defaults (int8/int8, min_max; config alias 'default' = "
                         "default_config_per_channel.json: per-channel Conv/Gemm weights)")
        sim = QuantizationSimModel(model, **kw)
        if a.variant in ("adaround", "recipe"):
            apply_adaround(sim, batches, num_iterations=a.iterations)
            notes.append(f"apply_adaround(num_iterations={a.iterations}; AIMET recommends 10000)")
        sim.compute_encodings(batches)
        q = sim.to_onnx_qdq(prequantize_constants=True)
    onnx.save(q, a.out)
    report(a.variant, t.s, "; ".join(notes), versions("aimet-onnx", "onnx", "onnxruntime", "torch", "numpy"))


if __name__ == "__main__":
    main()
