#!/usr/bin/env python3
"""NNCF (ONNX backend): nncf.quantize with defaults, with preset=MIXED (NNCF's documented choice
for models whose activations are not symmetric around 0), with fast_bias_correction=False (the
full BiasCorrection algorithm NNCF documents as the more accurate, slower choice), and
quantize_with_accuracy_control.

Accuracy control needs a validation set and metric: the --pool, which is edgepack's search split
(never the held-out evaluation images), max_drop 0.01 absolute. With --pool-labels the metric is
top-1 accuracy; without (label-free natural images) it is top-1 agreement with the FP32 model. The INT8 candidates
NNCF proposes are judged the way the board computes: ORT with every graph optimization off
(QDQ executed unfused, exact int8 products), not this host's fused u8 x s8 kernels.
"""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort

from _common import Timer, parser, report, versions


def sess(model: onnx.ModelProto, exact: bool) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.log_severity_level = 3
    if exact:
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def main() -> None:
    a = parser(["default", "mixed", "bias-correction", "accuracy-control"]).parse_args()
    import nncf
    from nncf.quantization.advanced_parameters import AdvancedAccuracyRestorerParameters

    model = onnx.load(a.model)
    name = model.graph.input[0].name
    x = np.load(a.calib)
    calib = nncf.Dataset(list(range(len(x))), lambda i: {name: x[i:i + 1]})
    extra = {}
    with Timer() as t:
        if a.variant == "default":
            q = nncf.quantize(model, calib, subset_size=len(x))
            notes = f"nncf.quantize(model, calib, subset_size={len(x)}), every other argument default"
        elif a.variant == "mixed":
            q = nncf.quantize(model, calib, subset_size=len(x), preset=nncf.QuantizationPreset.MIXED)
            notes = "nncf.quantize(..., preset=MIXED): symmetric weights, asymmetric activations"
        elif a.variant == "bias-correction":
            q = nncf.quantize(model, calib, subset_size=len(x), fast_bias_correction=False)
            notes = "nncf.quantize(..., fast_bias_correction=False): full BiasCorrection"
        else:
            pool = np.load(a.pool)
            ref = (np.load(a.pool_labels) if a.pool_labels else
                   np.concatenate([sess(model, exact=False).run(None, {name: pool[i:i + 32]})[0].argmax(1)
                                   for i in range(0, len(pool), 32)]))
            val = nncf.Dataset([(pool[i:i + 1], int(ref[i])) for i in range(len(pool))])

            def validate(m: onnx.ModelProto, items) -> tuple[float, list[float]]:
                s = sess(m, exact=True)
                items = list(items)
                hits: list[float] = []
                for i in range(0, len(items), 32):   # batched: the same per-sample hits, fewer runs
                    xb = np.concatenate([xi for xi, _ in items[i:i + 32]])
                    top = s.run(None, {name: xb})[0].reshape(len(xb), -1).argmax(1)
                    hits += [float(t == r) for t, (_, r) in zip(top, items[i:i + 32])]
                return float(np.mean(hits)), hits

            q = nncf.quantize_with_accuracy_control(
                model, calib, val, validate, max_drop=0.01, drop_type=nncf.DropType.ABSOLUTE,
                subset_size=len(x),
                # one ranking worker: the 2 cores are shared (the result does not depend on it)
                advanced_accuracy_restorer_parameters=AdvancedAccuracyRestorerParameters(num_ranking_workers=1))
            kept = sum(1 for n in q.graph.node if n.op_type == "QuantizeLinear")
            metric = "labelled top-1" if a.pool_labels else "label-free: top-1 agreement with FP32"
            notes = (f"quantize_with_accuracy_control(max_drop=0.01 absolute); validation = edgepack's "
                     f"search split ({len(pool)} samples, {metric}), "
                     f"candidates run with ORT_DISABLE_ALL (exact int8 products)")
            extra = {"validation_images": len(pool), "quantize_linear_nodes": kept}
    onnx.save(q, a.out)
    report(a.variant, t.s, notes, versions("nncf", "onnx", "onnxruntime", "numpy"), **extra)


if __name__ == "__main__":
    main()
