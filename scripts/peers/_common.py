"""Shared by the peer runners (each runs inside its own peer venv; numpy + onnx only here).

A runner gets the FP32 model, calibration/pool arrays (.npy, already preprocessed by edgepack's
loader in the main venv) and an output path; it writes the INT8 ONNX there and prints one JSON
line {"variant", "quantize_seconds", "notes", "versions"} on stdout as its last line.
"""
from __future__ import annotations

import argparse
import importlib.metadata as md
import json
import sys
import time


def parser(variants: list[str]) -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--calib", required=True, help=".npy (N,C,H,W) float32")
    ap.add_argument("--pool", help=".npy validation pool (accuracy control only)")
    ap.add_argument("--pool-labels", help=".npy labels of the pool: accuracy control then validates top-1 "
                                          "accuracy instead of agreement with FP32")
    ap.add_argument("--variant", required=True, choices=variants)
    ap.add_argument("--out", required=True)
    ap.add_argument("--iterations", type=int, default=1000, help="AdaRound iterations per layer")
    return ap


def versions(*names: str) -> dict:
    out = {"python": sys.version.split()[0]}
    for n in names:
        try:
            out[n] = md.version(n)
        except md.PackageNotFoundError:
            out[n] = None
    return out


def report(variant: str, seconds: float, notes: str, vers: dict, **extra) -> None:
    print(json.dumps({"variant": variant, "quantize_seconds": round(seconds, 2), "notes": notes,
                      "versions": vers, **extra}), flush=True)


class Timer:
    def __enter__(self):
        self.t = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.s = time.perf_counter() - self.t
