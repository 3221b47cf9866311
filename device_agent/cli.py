"""``edgepack-agent``: the board-side command. stdlib argparse only (no typer/rich on a board).

Every command prints exactly one JSON object on stdout (``{"ok": true, ...}`` or
``{"ok": false, "error": {...}}``) and human-readable lines on stderr, and exits with a
documented code (docs/agent.md): 0 ok, 1 internal error, 2 usage, 3 not initialised / state,
5 bundle refused (signature, trust, anti-rollback, expiry, target, hash), 6 budget or
compatibility refused before writing, 7 trial failed and rolled back, 8 runtime/accelerator
missing or model does not load, 9 nothing to roll back to / corrupt active slot, 10 disk full,
130 interrupted.

The state directory comes from ``--state DIR`` or ``EDGEPACK_AGENT_STATE``; every command but
``init`` and ``version`` first runs ``recover()`` (what a boot does).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from . import __version__
from .agent_errors import AgentError, UsageError
from .errors import OtaError


def _out(obj: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(obj, indent=1, default=str) + "\n")
    sys.stdout.flush()


def _say(msg: str) -> None:
    """One human line on stderr. Bundle/board strings in it are data: control characters (ANSI
    escapes, carriage returns) are shown escaped, never sent to the terminal."""
    from .wire.encoding import safe_text
    sys.stderr.write(safe_text(msg, limit=2000) + "\n")


def _agent(args: argparse.Namespace):
    from .install import Agent
    return Agent(args.state)


def cmd_init(a: argparse.Namespace) -> dict[str, Any]:
    from .state import BoardConfig
    cfg = BoardConfig(target=a.target, ram_budget_mb=a.ram_mb, storage_mb=a.storage_mb, threads=a.threads,
                      runtimes=a.runtime or ["onnxruntime"], accelerator=a.accelerator,
                      latency_budget_ms=a.latency_budget_ms, trial_runs=a.trial_runs,
                      trial_in_process=a.trial_in_process)
    r = _agent(a).init(cfg, a.trust_root, a.release_keys, force=a.force)
    _say(f"initialised board {a.target} in {r['state_dir']}")
    return r


def cmd_install(a: argparse.Namespace) -> dict[str, Any]:
    rep = _agent(a).install(a.bundle)
    _say(f"release {rep.release} ({rep.kind}) committed in slot {rep.slot} in {rep.seconds:.2f} s; "
         f"trial: {rep.trial.get('reason')}")
    return rep.to_json()


def cmd_status(a: argparse.Namespace) -> dict[str, Any]:
    s = _agent(a).status(verify=a.verify, history=a.history)
    act = s["active"]
    _say(f"board {s['target']}: " + (f"release {act.get('release')} active in slot {act.get('slot')}"
                                     if act else "no release installed") + f", counter {s['counter']}")
    return s


def cmd_rollback(a: argparse.Namespace) -> dict[str, Any]:
    r = _agent(a).rollback(a.reason)
    _say(f"rolled back to release {r['active']['release']} (slot {r['active']['slot']})")
    return r


def cmd_recover(a: argparse.Namespace) -> dict[str, Any]:
    r = _agent(a).recover(rebuild=True)
    _say("; ".join(r["actions"]) or "nothing to recover")
    return r


def cmd_reset_counter(a: argparse.Namespace) -> dict[str, Any]:
    r = _agent(a).reset_counter(a.document)
    _say(f"anti-rollback counter {r['counter_before']} -> {r['counter']} (root-signed reset v{r['reset_version']})")
    return r


def _model_args(a: argparse.Namespace) -> tuple[Path, str, int, str | None, Path | None, int | None]:
    """(model, runtime, threads, accelerator, golden, release) from --model or the active slot."""
    from .runtime import choose_runtime
    if a.model:
        model = Path(a.model)
        if not model.is_file():
            raise UsageError(f"model file {model} not found")
        runtimes = a.runtime or ["onnxruntime", "litert", "openvino"]
        rt = choose_runtime(model, runtimes, a.runtime[0] if a.runtime else None)
        return model, rt, a.threads or 0, a.accelerator, Path(a.data) if a.data else None, None
    agent = _agent(a)
    agent.recover()
    cfg = agent.board()
    info = agent.active_info(verify=True)
    rt = choose_runtime(info.model_path, a.runtime or cfg.runtimes,
                        a.runtime[0] if a.runtime else info.settings.get("runtime"))
    from .trial import board_accelerator
    accel = a.accelerator or board_accelerator(cfg, info.settings)
    threads = a.threads if a.threads is not None else cfg.threads
    golden = Path(a.data) if a.data else info.file("golden")
    return info.model_path, rt, threads, accel, golden, info.release


def cmd_bench(a: argparse.Namespace) -> dict[str, Any]:
    from .benchmark import TokenOptions, bench_model
    model, rt, threads, accel, golden, release = _model_args(a)
    tok = TokenOptions(prompt_tokens=a.prompt_tokens, new_tokens=a.new_tokens, generations=a.generations)
    r = bench_model(model, rt, threads=threads, accelerator=accel, runs=a.runs, warmup=a.warmup, golden=golden,
                    tokens=tok)
    lat = r.latency
    if r.llm is not None:
        t = r.llm
        _say(f"{r.model} on {r.runtime} ({r.provider}, {r.threads or 'default'} threads): load {r.load_ms:.1f} ms, "
             f"TTFT {t['ttft_ms']:.1f} ms ({t['prompt_tokens']}-token prompt, {t['prefill_tok_s']:.1f} tokens/s), "
             f"decode {t['decode_tok_s']:.1f} tokens/s (p90 {lat['p90_ms']:.2f} ms/token); peak RSS {r.peak_rss_mb:.1f} MiB")
    else:
        _say(f"{r.model} on {r.runtime} ({r.provider}, {r.threads or 'default'} threads): load {r.load_ms:.1f} ms, "
             f"first {r.first_inference_ms:.2f} ms, mean {lat['mean_ms']:.3f} p50 {lat['p50_ms']:.3f} "
             f"p90 {lat['p90_ms']:.3f} p99 {lat['p99_ms']:.3f} ms; RSS model {r.rss_model_mb:.1f} MiB, peak {r.peak_rss_mb:.1f} MiB")
    from .machine import latency_source
    return {"release": release, **r.to_json(), "latency_source": latency_source()}


def cmd_eval(a: argparse.Namespace) -> dict[str, Any]:
    from .benchmark import eval_model
    model, rt, threads, accel, golden, release = _model_args(a)
    if golden is None:
        raise UsageError("no evaluation data: the active release carries no golden.npz; pass --data FILE.npz")
    r = eval_model(model, rt, golden, threads=threads, accelerator=accel, release=release,
                   per_sample=a.per_sample)
    c = r.comparison
    _say(f"{r.model}: {c.samples} samples; accuracy {c.accuracy}, top-1 agreement {c.top1_agreement}, "
         f"cosine mean {c.cosine_mean}, max abs error {c.max_abs_error}")
    return r.to_json()


def cmd_pull(a: argparse.Namespace) -> dict[str, Any]:
    from .pull import PullOptions, pull
    res = pull(a.state, PullOptions(repo_url=a.repo, board_id=a.board_id, model=a.model,
                                    tuf_root=Path(a.tuf_root) if a.tuf_root else None, report_url=a.report_url,
                                    deadline_s=a.timeout, min_rate_bps=a.min_rate, upload=not a.no_report))
    _say(f"pull {res.board}: {res.action}" + (f" release {res.release_before} -> {res.release_after} ({res.kind}, "
                                              f"{res.bytes_downloaded} bytes)" if res.target else "")
         + f"; {res.requests} request(s), {res.metadata_bytes} metadata bytes")
    return res.to_json()


def cmd_version(a: argparse.Namespace) -> dict[str, Any]:
    import device_agent
    from .machine import machine_info, runtime_versions
    from .runtime import MODULES, installed
    return {"agent_version": __version__, "python": sys.version.split()[0], "path": str(Path(device_agent.__file__).parent),
            "runtimes": {r: installed(r) for r in MODULES}, "runtime_versions": runtime_versions(), **machine_info()}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="edgepack-agent", description="edgepack device agent: verified A/B model installs "
                                "with health-gated commit, rollback, benchmark and drift evaluation.")
    p.add_argument("--state", help="board state directory (default: $EDGEPACK_AGENT_STATE)")
    sub = p.add_subparsers(dest="cmd", required=True)

    s = sub.add_parser("init", help="create board.json and state.json (flashes the trust root)")
    s.add_argument("--target", required=True, help="the board's target name (bundles must list it)")
    s.add_argument("--trust-root", required=True, help="root.json (signed by its threshold of root keys)")
    s.add_argument("--release-keys", help="release-keys.json (optional: bundles carry it)")
    s.add_argument("--ram-mb", type=float, default=512.0, help="RAM budget for the model (MiB)")
    s.add_argument("--storage-mb", type=float, default=1024.0, help="storage budget for both slots (MiB)")
    s.add_argument("--threads", type=int, default=0, help="inference threads (0: runtime default)")
    s.add_argument("--runtime", action="append", help="runtime in preference order (repeat): onnxruntime, litert, openvino")
    s.add_argument("--accelerator", help="EP / delegate / device the board must use (never replaced if missing)")
    s.add_argument("--latency-budget-ms", type=float, help="p90 latency budget checked in the trial")
    s.add_argument("--trial-runs", type=int, default=10)
    s.add_argument("--trial-in-process", action="store_true", help="run the trial in the agent process (no child)")
    s.add_argument("--force", action="store_true", help="reset state.json (forgets installed releases)")
    s.set_defaults(fn=cmd_init)

    s = sub.add_parser("install", help="verify, write to the inactive slot, switch, trial, commit or roll back")
    s.add_argument("bundle")
    s.set_defaults(fn=cmd_install)

    s = sub.add_parser("status", help="active/previous release, counter, history")
    s.add_argument("--verify", action="store_true", help="hash-verify the slots (heals a corrupt active slot)")
    s.add_argument("--history", type=int, default=10)
    s.set_defaults(fn=cmd_status)

    s = sub.add_parser("rollback", help="switch back to the kept previous release")
    s.add_argument("--reason", default="requested by operator")
    s.set_defaults(fn=cmd_rollback)

    s = sub.add_parser("reset-counter", help="apply a root-signed anti-rollback counter reset")
    s.add_argument("document", help="counter-reset.json made by `edgepack keys reset-counter`")
    s.set_defaults(fn=cmd_reset_counter)
    s = sub.add_parser("pull", help="one poll of a TUF repository: refresh, download (delta or full), install, report")
    s.add_argument("--repo", required=True, help="repository base URL (metadata/ and targets/ below it)")
    s.add_argument("--tuf-root", help="the repository's root.json (first run only; then kept in STATE/pull/tuf)")
    s.add_argument("--board-id", help="this board's id (default: $EDGEPACK_BOARD_ID or one generated and kept)")
    s.add_argument("--model", help="model to follow (default: the active release's)")
    s.add_argument("--report-url", help="where to PUT the report (default: REPO/reports)")
    s.add_argument("--timeout", type=float, default=30.0, help="total deadline per request in seconds, plus the "
                   "bundle's length at --min-rate for a download (slow retrieval)")
    s.add_argument("--min-rate", type=float, default=1024.0, help="minimum average bytes/s of a transfer after a 5 s "
                   "grace (0: the deadline alone)")
    s.add_argument("--no-report", action="store_true", help="keep the report in STATE/pull/outbox only")
    s.set_defaults(fn=cmd_pull)

    sub.add_parser("recover", help="finish or undo an interrupted install (also done by every command)").set_defaults(fn=cmd_recover)
    sub.add_parser("version", help="agent version and installed runtimes").set_defaults(fn=cmd_version)

    for name, fn, h in (("bench", cmd_bench, "latency, load time and memory of the active model"),
                        ("eval", cmd_eval, "accuracy, top-1 agreement and drift vs the bundle's reference outputs")):
        s = sub.add_parser(name, help=h)
        s.add_argument("--model", help="a model file instead of the active release")
        s.add_argument("--runtime", action="append", help="runtime to use (default: board preference)")
        s.add_argument("--accelerator", help="EP / delegate / device to use")
        s.add_argument("--threads", type=int, default=None)
        s.add_argument("--data", help="npz with inputs / outputs / labels (default: the release's golden.npz)")
        if name == "eval":
            s.add_argument("--per-sample", action="store_true", help="also report each sample's top-1 class")
        if name == "bench":
            s.add_argument("--runs", type=int, default=100)
            s.add_argument("--warmup", type=int, default=10)
            s.add_argument("--prompt-tokens", type=int, default=128, help="decoder LLM: prompt length of the prefill")
            s.add_argument("--new-tokens", type=int, default=32, help="decoder LLM: greedy tokens generated per run")
            s.add_argument("--generations", type=int, default=3, help="decoder LLM: timed runs (medians reported)")
        s.set_defaults(fn=fn)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        result = args.fn(args)
        from .budgets import peak_rss_mb, rss_mb
        _out({"ok": True, "command": args.cmd, **result,
              "process": {"rss_mb": round(rss_mb(), 2), "peak_rss_mb": round(peak_rss_mb(), 2)}})
        return 0
    except (AgentError, OtaError) as e:
        code = getattr(e, "exit_code", 1)
        err = {"type": type(e).__name__, "message": str(e), "exit_code": code}
        rep = getattr(e, "report", None)
        _out({"ok": False, "command": args.cmd, "error": err, **({"report": rep.to_json()} if rep else {})})
        _say(f"error: {type(e).__name__}: {e}")
        return code
    except KeyboardInterrupt:
        _out({"ok": False, "command": args.cmd, "error": {"type": "Interrupted", "message": "interrupted", "exit_code": 130}})
        _say("interrupted")
        return 130
    except Exception as e:  # a bug: still one line and a JSON object, never a bare traceback
        _out({"ok": False, "command": args.cmd, "error": {"type": type(e).__name__, "message": str(e), "exit_code": 1}})
        _say(f"internal error: {type(e).__name__}: {e} (set EDGEPACK_AGENT_DEBUG=1 for the traceback)")
        import os
        if os.environ.get("EDGEPACK_AGENT_DEBUG"):
            raise
        return 1


if __name__ == "__main__":
    sys.exit(main())
