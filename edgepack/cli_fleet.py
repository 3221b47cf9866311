"""`edgepack push`, `edgepack fleet bootstrap|status|history|check`, `edgepack report --html`.

A thin shell over ``edgepack.fleet``: parse, call one function, render (rich table on stderr, or
JSON on stdout with --json). Without --fleet the embedded default is used: one local board (the
agent as a subprocess with its own state directory under .edgepack/).
"""
from __future__ import annotations

import datetime as dt
import json
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any, Optional

import typer
from rich.table import Table

fleet_app = typer.Typer(no_args_is_help=True, help="Fleet: bootstrap boards, status, history, regression checks.")

FLEET_OPT = typer.Option(None, "--fleet", "-f", help="fleet file (TOML); default: the local board under .edgepack/")
GROUP_OPT = typer.Option(None, "--group", "-g", help="only boards in this group (or tag key=value)")
JSON_OPT = typer.Option(False, "--json", help="print the result as JSON on stdout")


def _fleet(path: Optional[Path]):
    from .fleet import Fleet, load_fleet
    return load_fleet(path) if path else Fleet.default()


def _store(fleet: Any, store: Optional[Path]):
    from .fleet import Store
    return Store(store or fleet.store)


def _dump(obj: Any) -> None:
    sys.stdout.write(json.dumps(obj, indent=2, default=str) + "\n")


def _f(v: Any, nd: int = 3) -> str:
    return "–" if v is None else (f"{v:.{nd}f}" if isinstance(v, float) else str(v))


def register(app: typer.Typer) -> None:
    from .cli import err, run_guarded

    @app.command("push")
    def push_cmd(release: Path = typer.Argument(..., help="the release's full bundle (deltas next to it are found)"),
                 fleet: Optional[Path] = FLEET_OPT, group: Optional[str] = GROUP_OPT,
                 board: list[str] = typer.Option([], "--board", help="only this board (repeat)"),
                 delta: list[Path] = typer.Option([], "--delta", help="a delta bundle of this release (repeat)"),
                 canary: str = typer.Option("1", help="canary wave: boards or percent (e.g. 10%)"),
                 wave_size: str = typer.Option("25%", help="boards per later wave, or percent"),
                 max_failures: str = typer.Option("0", help="release failures tolerated before halting (count or %)"),
                 max_drift: float = typer.Option(0.02, help="halt above this top-1 drift vs the reference outputs"),
                 latency_margin: float = typer.Option(0.20, help="halt when p90 exceeds the previous release by this fraction"),
                 concurrency: int = typer.Option(8, help="boards in flight at once"),
                 retries: int = typer.Option(3, help="reconnects per board (transfers resume)"),
                 max_bytes_factor: float = typer.Option(2.0, help="bytes sent per board <= factor x file size"),
                 store: Optional[Path] = typer.Option(None, help="SQLite store (default: from the fleet file)"),
                 accept_budget_miss: bool = typer.Option(False, "--accept-budget-miss", help="push a release whose "
                                                         "bundled quantize report missed its accuracy budget"),
                 as_json: bool = JSON_OPT) -> None:
        """Roll a release out: canary, then waves; halt and roll back on failures, drift or latency."""
        from .fleet import Policy, load_release, push

        def go() -> None:
            fl = _fleet(fleet)
            rel = load_release(release, list(delta))
            from .release_gate import gate
            note = gate(rel.full.path, accept_budget_miss=accept_budget_miss)   # BudgetNotMet: exit 4
            if note:
                err.print(f"[yellow]warning:[/] {note}", highlight=False, soft_wrap=True)
            boards = fl.select(group, list(board) or None)
            pol = Policy(canary=canary, wave_size=wave_size, max_failures=max_failures, max_drift=max_drift,
                         latency_margin=latency_margin, concurrency=concurrency, retries=retries,
                         max_bytes_factor=max_bytes_factor)

            def ev(e: dict[str, Any]) -> None:
                if e["event"] == "wave_start":
                    err.print(f"[bold]{e['name']}[/]: {len(e['boards'])} board(s): {', '.join(e['boards'][:8])}"
                              + (" …" if len(e["boards"]) > 8 else ""), highlight=False)
                elif e["event"] == "wave_end":
                    err.print(f"  {e['name']} done in {e['seconds']:.1f} s: {e['committed']} committed, {e['current']} "
                              f"current, {e['rolled_back']} rolled back, {e['failed']} failed, {e['not_reached']} not "
                              f"reached; {e['bytes_sent']} bytes", highlight=False)
                elif e["event"] == "halted":
                    err.print(f"[bold red]halted:[/] {e['reason']}", highlight=False)

            with _store(fl, store) as st:
                err.print(f"release {rel.release} ({rel.full.path.name}, {rel.full.bytes} bytes; "
                          f"{len(rel.deltas)} delta(s)) to {len(boards)} board(s)", highlight=False)
                rep = push(rel, fl, boards=boards, policy=pol, store=st, on_event=None if as_json else ev)
            if as_json:
                _dump(rep.to_json())
            else:
                t = Table(title=f"release {rep.release}: {'HALTED' if rep.halted else 'done'} in {rep.seconds:.1f} s, "
                                f"{rep.bytes_sent} bytes sent")
                for c in ("board", "wave", "result", "sent", "bytes", "release", "p90 ms", "drift", "note"):
                    t.add_column(c)
                for b in rep.boards:
                    style = "green" if b.result in ("committed", "current") else ("red" if b.result in
                                                                                  ("failed", "rolled_back") else "yellow")
                    t.add_row(b.board, str(b.wave), f"[{style}]{b.result}[/]", b.kind or "–", str(b.bytes_sent),
                              f"{_f(b.release_before)}→{_f(b.release_after)}", _f(b.p90_ms), _f(b.drift),
                              (b.error or "")[:70])
                err.print(t)
            if rep.exit_code:
                raise typer.Exit(rep.exit_code)

        run_guarded(go)

    @fleet_app.command("bootstrap")
    def bootstrap_cmd(trust_root: Path = typer.Option(..., help="root.json to flash onto the boards"),
                      release_keys: Optional[Path] = typer.Option(None, help="release-keys.json (optional)"),
                      fleet: Optional[Path] = FLEET_OPT, group: Optional[str] = GROUP_OPT,
                      force: bool = typer.Option(False, help="reset the boards' state (forgets installed releases)"),
                      as_json: bool = JSON_OPT) -> None:
        """Copy the agent onto boards, check it runs, initialise them."""
        from .fleet import bootstrap

        def go() -> None:
            fl = _fleet(fleet)
            with _store(fl, None) as st:
                res = bootstrap(fl, fl.select(group), trust_root=trust_root, release_keys=release_keys, force=force,
                                store=st)
            if as_json:
                _dump([asdict(r) for r in res])
            else:
                t = Table(title="bootstrap")
                for c in ("board", "ok", "agent", "python", "runtimes", "note"):
                    t.add_column(c)
                for r in res:
                    t.add_row(r.board, "[green]yes[/]" if r.ok else "[red]no[/]", _f(r.agent_version), _f(r.python),
                              ",".join(k for k, v in r.runtimes.items() if v), (r.error or "")[:80])
                err.print(t)
            if not all(r.ok for r in res):
                raise typer.Exit(21)

        run_guarded(go)

    @fleet_app.command("status")
    def status_cmd(fleet: Optional[Path] = FLEET_OPT, group: Optional[str] = GROUP_OPT,
                   live: bool = typer.Option(False, help="ask the boards now (and store the answers)"),
                   store: Optional[Path] = typer.Option(None, help="SQLite store"), as_json: bool = JSON_OPT,
                   reported: bool = typer.Option(False, "--reported", help="also every board the store has reports "
                                                 "from (pull fleets: after `fleet ingest`)")) -> None:
        """Each board's active release and last figures (from the store; --live asks the boards)."""
        from .fleet import open_transport
        from .fleet.errors import FleetError

        def go() -> None:
            fl = _fleet(fleet)
            rows = []
            with _store(fl, store) as st:
                sel = fl.select(group)
                if reported:  # pull boards are known by their reports, not by a fleet file
                    from .fleet import Board
                    names = {b.name for b in sel}
                    sel = sel + [Board(name=n, transport="pull") for n in st.boards() if n not in names]
                for b in sel:
                    live_err = None
                    if live and b.transport != "pull":
                        try:
                            with open_transport(b, fl) as t:
                                r = t.agent("status", "--history", "0")
                                st.add(b.name, "status", r.json(), ok=r.rc == 0)
                        except FleetError as e:
                            live_err = str(e)
                    last = st.history(b.name, limit=1)
                    ins = st.latest(b.name, "install", ok_only=False)
                    bench = st.latest(b.name, "bench", need="p90_ms")
                    ev = st.latest(b.name, "eval", need="drift")
                    rows.append({"board": b.name, "host": b.host if b.transport == "ssh" else
                                 ("pull" if b.transport == "pull" else "local"),
                                 "groups": b.groups, "release": st.active_release(b.name),
                                 "last_install": (ins.data.get("status") or (ins.data.get("error") or {}).get("type"))
                                 if ins else None,
                                 "p90_ms": bench.p90_ms if bench else (ins.p90_ms if ins else None),
                                 "drift": ev.drift if ev else (ins.drift if ins else None),
                                 "last_seen": dt.datetime.fromtimestamp(last[0].ts).isoformat(timespec="seconds")
                                 if last else None, "error": live_err})
            if as_json:
                _dump(rows)
                return
            t = Table(title=f"fleet ({len(rows)} boards)")
            for c in ("board", "host", "release", "last install", "p90 ms", "drift", "last seen", "note"):
                t.add_column(c)
            for r in rows:
                t.add_row(r["board"], r["host"], _f(r["release"]), _f(r["last_install"]), _f(r["p90_ms"]),
                          _f(r["drift"]), _f(r["last_seen"]), (r["error"] or "")[:60])
            err.print(t)

        run_guarded(go)

    @fleet_app.command("history")
    def history_cmd(board: str = typer.Argument(..., help="board name"), fleet: Optional[Path] = FLEET_OPT,
                    limit: int = typer.Option(30, help="rows"), store: Optional[Path] = typer.Option(None),
                    as_json: bool = JSON_OPT) -> None:
        """Everything the store holds for one board, newest first."""
        def go() -> None:
            fl = _fleet(fleet)
            fl.board(board)
            with _store(fl, store) as st:
                rows = st.history(board, limit=limit)
            if as_json:
                _dump([{**{k: v for k, v in asdict(r).items() if k != "data"}, "data": r.data} for r in rows])
                return
            t = Table(title=f"{board}: last {len(rows)} reports")
            for c in ("when", "kind", "ok", "release", "p90 ms", "drift", "peak RSS MiB", "bytes"):
                t.add_column(c)
            for r in rows:
                t.add_row(dt.datetime.fromtimestamp(r.ts).isoformat(timespec="seconds"), r.kind,
                          "yes" if r.ok else "[red]no[/]", _f(r.release), _f(r.p90_ms), _f(r.drift), _f(r.peak_rss_mb, 1),
                          _f(r.bytes))
            err.print(t)

        run_guarded(go)

    @fleet_app.command("check")
    def check_cmd(fleet: Optional[Path] = FLEET_OPT, group: Optional[str] = GROUP_OPT,
                  max_drift: float = typer.Option(0.02, help="flag top-1 drift above this"),
                  latency_margin: float = typer.Option(0.20, help="flag p90 above the previous release by this fraction"),
                  latency_floor_ms: float = typer.Option(0.5, help="... and by at least this many ms"),
                  runs: int = typer.Option(50, help="timed bench runs per board"),
                  concurrency: int = typer.Option(4, help="boards checked at once"),
                  store: Optional[Path] = typer.Option(None), as_json: bool = JSON_OPT) -> None:
        """Re-run eval and bench on boards; flag drift, latency and RAM regressions. Exit 26 if any (cron/CI)."""
        from .fleet import CheckPolicy, check

        def go() -> None:
            fl = _fleet(fleet)
            with _store(fl, store) as st:
                rep = check(fl, fl.select(group), store=st,
                            policy=CheckPolicy(max_drift=max_drift, latency_margin=latency_margin,
                                               latency_floor_ms=latency_floor_ms, bench_runs=runs, concurrency=concurrency))
            if as_json:
                _dump(rep.to_json())
            else:
                t = Table(title=f"fleet check: {len(rep.flags)} regression(s)")
                for c in ("board", "release", "top-1", "drift", "p90 ms", "prev p90", "peak RSS", "flags"):
                    t.add_column(c)
                for b in rep.boards:
                    note = "; ".join(f.kind for f in b.flags) or (b.error or "ok")
                    t.add_row(b.board, _f(b.release), _f(b.top1), _f(b.drift), _f(b.p90_ms), _f(b.baseline_p90_ms),
                              _f(b.peak_rss_mb, 1), f"[red]{note}[/]" if b.flags or b.error else note)
                err.print(t)
                for f in rep.flags:
                    err.print(f"[red]regression:[/] {f.message}", highlight=False)
            if rep.exit_code:
                raise typer.Exit(rep.exit_code)

        run_guarded(go)

    @app.command("report")
    def report_cmd(html: Path = typer.Option(..., "--html", help="write one self-contained HTML page here"),
                   fleet: Optional[Path] = FLEET_OPT, store: Optional[Path] = typer.Option(None),
                   max_drift: float = typer.Option(0.02, help="drift threshold drawn on the plot"),
                   as_json: bool = JSON_OPT) -> None:
        """Fleet report: latency per board and release, drift over time, flagged regressions."""
        from .fleet import render_html
        from .fleet.errors import InventoryError

        def go() -> None:
            fl = _fleet(fleet)
            db = Path(store or fl.store)
            if not db.is_file():
                raise InventoryError(f"no fleet store at {db}; push a release or run `edgepack fleet check` first")
            with _store(fl, db) as st:
                out = render_html(st, html, max_drift=max_drift)
            if as_json:
                _dump({"html": str(out), "bytes": out.stat().st_size})
            else:
                err.print(f"wrote {out} ({out.stat().st_size / 1024:.1f} KiB, self-contained)", highlight=False)

        run_guarded(go)

    app.add_typer(fleet_app, name="fleet")


__all__ = ["register"]
