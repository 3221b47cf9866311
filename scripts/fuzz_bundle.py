#!/usr/bin/env python
"""Longer fuzz run of the bundle parser, verifier and delta decoder.

Runs the hypothesis properties of tests/test_bundle_fuzz.py with many more examples than CI
(CI runs 150 per property). Every mutated bundle must be refused with a named OtaError and leave
nothing written; any other exception is a bug.

    python scripts/fuzz_bundle.py --examples 20000
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--examples", type=int, default=5000, help="examples per property")
    ap.add_argument("--seed", type=int, default=None, help="hypothesis seed (default: random)")
    args = ap.parse_args()
    env = dict(os.environ, EDGEPACK_FUZZ_EXAMPLES=str(args.examples))
    cmd = [sys.executable, "-m", "pytest", str(ROOT / "tests" / "test_bundle_fuzz.py"), "-q", "-x", "-p", "no:cacheprovider"]
    if args.seed is not None:
        cmd.append(f"--hypothesis-seed={args.seed}")
    return subprocess.call(cmd, env=env, cwd=ROOT)


if __name__ == "__main__":
    sys.exit(main())
