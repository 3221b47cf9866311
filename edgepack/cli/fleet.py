"""`edgepack push`, `edgepack fleet bootstrap|status|history|check`, `edgepack report`.

A thin shell over ``edgepack.fleet``: parse, call one function, render (a table on stderr, or JSON
on stdout with --json). Without --fleet the embedded default is used: one local board (the agent
as a subprocess with its own state directory under .edgepack/).
"""
from __future__ import annotations

import datetime as dt
from dataclasses import asdict
from pathlib import Path
from typing import Any, Optional

import typer
from rich.table import Table

from ._common import JSON_OPT, Notes, cell, dump, err, finish, fleet_of, fmt, output_path, run_guarded

fleet_app = typer.Typer(no_args_is_help=True, help="Fleet: bootstrap boards, status, history, regression checks.")

FLEET_OPT = typer.Option(None, "--fleet", "-f", help="fleet file (TOML); default: the local board under .edgepack/")
GROUP_OPT = typer.Option(None, "--group", "-g", help="only boards in this group (or tag key=value)")
STORE_OPT = typer.Option(None, "--store", help="SQLite store (default: from the fleet file)")


def _fleet(path: Optional[Path]):
    return fleet_of(path)


def _store(fleet: Any, store: Optional[Path], *, must_exist: bool = False):
    """The fleet's SQLite store; a command that only reads it refuses a missing one instead of
    creating an empty store (and an empty board) in whatever folder it was run from."""
    from ..fleet import Store
    from ..fleet.errors import InventoryError
    db = Path(store or fleet.store)
    if must_exist and not db.is_file():
        raise InventoryError(f"no fleet store at {db.resolve()}: nothing was pushed from here. Run this in the "
                             "project folder (where edgepack.toml is), pass --fleet FILE or --store DB, or start "
                             "with `edgepack init`")
    return Store(db)


def _table(title: str, columns: tuple[str, ...]) -> Table:
    t = Table(title=cell(title))
    for c in columns:
        # notes carry the advice: folded onto more lines, never cut off
        t.add_column(c, overflow="fold", ratio=3 if c == "note" else None)
    return t


RESULT_STYLE = {"committed": "green", "current": "green", "failed": "red", "rolled_back": "red"}


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
             accept_budget_miss: bool = typer.Option(False, "--accept-budget-miss", help="push a release whose "
                                                     "bundled quantize report missed its accuracy budget"),
             store: Optional[Path] = STORE_OPT,
             dry_run: bool = typer.Option(False, "--dry-run", "-n", help="print the plan (per board: wave, delta or "
                                          "full, bytes; what the canary gates) and send nothing"),
             live: bool = typer.Option(False, "--live", help="with --dry-run: ask the boards what they hold "
                                       "(default: their last report in the store)"),
             as_json: bool = JSON_OPT) -> None:
    """Roll a release out: canary, then waves; halt and roll back on failures, drift or latency."""
    from ..fleet import Policy, load_release, push
    from ..fleet.control import abort_requested, clear_abort
    from ..ota.release_gate import gate

    def go() -> None:
        fl = _fleet(fleet)
        rel = load_release(release, list(delta))
        note = gate(rel.full.path, accept_budget_miss=accept_budget_miss)   # BudgetNotMet: exit 4
        if note:
            err.print(f"[yellow]warning:[/] {note}", highlight=False, soft_wrap=True)
        boards = fl.select(group, list(board) or None)
        pol = Policy(canary=canary, wave_size=wave_size, max_failures=max_failures, max_drift=max_drift,
                     latency_margin=latency_margin, concurrency=concurrency, retries=retries,
                     max_bytes_factor=max_bytes_factor)
        if dry_run:
            _show_plan(rel, fl, boards, pol, store, live, as_json)
            return

        def ev(e: dict[str, Any]) -> None:
            if e["event"] == "wave_start":
                err.print(cell(f"{e['name']}: {len(e['boards'])} board(s): {', '.join(e['boards'][:8])}"
                               + (" …" if len(e["boards"]) > 8 else "")))
            elif e["event"] == "wave_end":
                err.print(cell(f"  {e['name']} done in {e['seconds']:.1f} s: {e['committed']} committed, "
                               f"{e['current']} current, {e['rolled_back']} rolled back, {e['failed']} failed, "
                               f"{e['not_reached']} not reached; {e['bytes_sent']} bytes"))
            elif e["event"] == "halted":
                err.print("[bold red]halted:[/]", cell(e["reason"]))

        with _store(fl, store) as st:
            db = Path(store or fl.store)
            clear_abort(db)  # an abort request is for the push that is running, not for the next one
            err.print(cell(f"release {rel.release} ({rel.full.path.name}, {rel.full.bytes} bytes; "
                           f"{len(rel.deltas)} delta(s)) to {len(boards)} board(s); "
                           f"`edgepack abort` stops it before its next wave"))
            with TransferBars(enabled=not as_json and not err.quiet, total=rel.full.bytes) as bars:
                rep = push(rel, fl, boards=boards, policy=pol, store=st, on_event=None if as_json else bars.wrap(ev),
                           on_bytes=bars.on_bytes, abort=lambda: abort_requested(db))
            clear_abort(db)
        if as_json:
            dump(rep.to_json())
        else:
            t = _table(f"release {rep.release}: {'HALTED' if rep.halted else 'done'} in {rep.seconds:.1f} s, "
                       f"{rep.bytes_sent} bytes sent",
                       ("board", "wave", "result", "sent", "bytes", "release", "p90 ms", "drift", "note"))
            notes = Notes()
            for b in rep.boards:
                style = RESULT_STYLE.get(b.result, "yellow")
                t.add_row(cell(b.board), str(b.wave), cell(b.result, style),
                          b.kind or "–", str(b.bytes_sent), f"{fmt(b.release_before)}→{fmt(b.release_after)}",
                          fmt(b.p90_ms), fmt(b.drift), notes.cell(b.board, b.error))
            err.print(t)
            notes.print(err)
        finish(rep)

    run_guarded(go)


class TransferBars:
    """One transfer bar per board on stderr, fed by push's ``on_bytes(board, n)`` byte hook."""

    def __init__(self, *, enabled: bool, total: int):
        from rich.progress import (BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn)
        self.total = total
        self.p = Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                          console=err, disable=not enabled, transient=True)
        self.tasks: dict[str, Any] = {}
        import threading
        self.lock = threading.Lock()

    def __enter__(self) -> "TransferBars":
        self.p.__enter__()
        return self

    def __exit__(self, *a: Any) -> None:
        self.p.__exit__(*a)

    def on_bytes(self, board: str, n: int) -> None:
        with self.lock:
            if board not in self.tasks:
                self.tasks[board] = self.p.add_task(safe_desc(board), total=self.total)
            # a delta is smaller than the full bundle, a resent file larger: the bar never overflows
            self.p.update(self.tasks[board], completed=n, total=max(self.total, n))

    def wrap(self, ev: Any) -> Any:
        def f(e: dict[str, Any]) -> None:
            if e["event"] == "wave_end":  # a finished wave's bars make room for the next wave's
                with self.lock:
                    for t in list(self.tasks.values()):
                        self.p.remove_task(t)
                    self.tasks.clear()
            ev(e)
        return f


def safe_desc(board: str) -> str:
    from rich.markup import escape
    return escape(cell(board).plain)


def _show_plan(rel: Any, fl: Any, boards: list, pol: Any, store: Optional[Path], live: bool, as_json: bool) -> None:
    from ..fleet.plan import plan_push
    from ..fleet import Store
    db = Path(store or fl.store)
    st = Store(db) if db.is_file() else None
    try:
        plan = plan_push(rel, fl, boards, policy=pol, store=st, live=live)
    finally:
        if st is not None:
            st.close()
    if as_json:
        dump(plan.to_json())
        return
    t = _table(f"plan: release {plan.release} ({plan.version}) to {len(plan.boards)} board(s), "
               f"{plan.bytes_total:,} bytes in all; nothing sent (--dry-run)",
               ("wave", "board", "holds", "gets", "bytes", "note"))
    notes = Notes()
    for b in plan.boards:
        t.add_row(cell(b.wave_name), cell(b.board), fmt(b.holds_release), cell(b.kind), f"{b.bytes:,}",
                  notes.cell(b.board, b.why))
    err.print(t)
    notes.print(err)
    err.print("[bold]gates[/] (a failed gate halts the rollout):")
    for g in plan.gates:
        err.print("  -", cell(g))


def abort_cmd(reason: str = typer.Option("aborted by the operator", "--reason", help="recorded with the halt"),
              fleet: Optional[Path] = FLEET_OPT, store: Optional[Path] = STORE_OPT, as_json: bool = JSON_OPT) -> None:
    """Stop the running push of this fleet before its next wave (it halts and reports it; boards already
    committed stay; `edgepack rollback` switches them back)."""
    from ..fleet.control import request_abort

    def go() -> None:
        fl = _fleet(fleet)
        f = request_abort(Path(store or fl.store), reason)
        if as_json:
            dump({"ok": True, "abort_file": str(f), "reason": reason})
        else:
            err.print(cell(f"abort requested ({f}): the push halts before its next wave"))

    run_guarded(go)


def rollback_cmd(fleet: Optional[Path] = FLEET_OPT, group: Optional[str] = GROUP_OPT,
                 board: list[str] = typer.Option([], "--board", "-b", help="only this board (repeat)"),
                 reason: str = typer.Option("operator rollback", "--reason", help="recorded on the board and in the store"),
                 store: Optional[Path] = STORE_OPT, as_json: bool = JSON_OPT) -> None:
    """Switch boards back to the release kept in their other slot (the agent's rollback), from the host."""
    from ..fleet.control import rollback, rollback_exit_code, to_json

    def go() -> None:
        fl = _fleet(fleet)
        with _store(fl, store) as st:
            res = rollback(fl, fl.select(group, list(board) or None), reason=reason, store=st)
        if as_json:
            dump(to_json(res))
        else:
            t = _table("rollback", ("board", "ok", "release", "note"))
            notes = Notes()
            for r in res:
                t.add_row(cell(r.board), "[green]yes[/]" if r.ok else "[red]no[/]",
                          f"{fmt(r.release_before)}→{fmt(r.release_after)}", notes.cell(r.board, r.error))
            err.print(t)
            notes.print(err)
        code = rollback_exit_code(res)
        if code:
            raise typer.Exit(code)

    run_guarded(go)


@fleet_app.command("bootstrap")
def bootstrap_cmd(trust_root: Path = typer.Option(..., help="root.json to flash onto the boards"),
                  release_keys: Optional[Path] = typer.Option(None, help="release-keys.json (optional)"),
                  fleet: Optional[Path] = FLEET_OPT, group: Optional[str] = GROUP_OPT,
                  force: bool = typer.Option(False, help="reset the boards' state (forgets installed releases)"),
                  as_json: bool = JSON_OPT) -> None:
    """Copy the agent onto boards, check it runs, initialise them."""
    from ..fleet import bootstrap
    from ..fleet.bootstrap import exit_code

    def go() -> None:
        fl = _fleet(fleet)
        with _store(fl, None) as st:
            res = bootstrap(fl, fl.select(group), trust_root=trust_root, release_keys=release_keys, force=force,
                            store=st)
        if as_json:
            dump([asdict(r) for r in res])
        else:
            t = _table("bootstrap", ("board", "ok", "agent", "python", "runtimes", "note"))
            notes = Notes()
            for r in res:
                t.add_row(cell(r.board), "[green]yes[/]" if r.ok else "[red]no[/]", cell(r.agent_version),
                          cell(r.python), cell(",".join(k for k, v in r.runtimes.items() if v)),
                          notes.cell(r.board, r.error))
            err.print(t)
            notes.print(err)
        code = exit_code(res)
        if code:
            raise typer.Exit(code)

    run_guarded(go)


@fleet_app.command("status")
def status_cmd(fleet: Optional[Path] = FLEET_OPT, group: Optional[str] = GROUP_OPT,
               live: bool = typer.Option(False, help="ask the boards now (and store the answers)"),
               store: Optional[Path] = STORE_OPT, as_json: bool = JSON_OPT,
               reported: bool = typer.Option(False, "--reported", help="also every board the store has reports "
                                             "from (pull fleets: after `fleet ingest`)"),
               watch: Optional[float] = typer.Option(None, "--watch", "-w", help="redraw every SECONDS until "
                                                     "Ctrl-C (with --live: ask the boards each time)"),
               count: Optional[int] = typer.Option(None, "--count", help="with --watch: stop after N redraws")) -> None:
    """Each board's active release and last figures (from the store; --live asks the boards)."""
    import time

    from ..fleet import status

    def table(rows: list) -> None:
        t = _table(f"fleet ({len(rows)} boards)" + (f", every {watch:g} s" if watch else ""),
                   ("board", "host", "release", "last install", "p90 ms", "tok/s", "drift", "last seen", "note"))
        notes = Notes()
        for r in rows:
            t.add_row(cell(r.board), cell(r.host), fmt(r.release), cell(r.last_install), fmt(r.p90_ms),
                      fmt(r.decode_tok_s, 1), fmt(r.drift), fmt(r.last_seen), notes.cell(r.board, r.error))
        err.print(t)
        notes.print(err)

    def go() -> None:
        fl = _fleet(fleet)
        if watch is not None and watch <= 0:
            from ..errors import UsageError
            raise UsageError("--watch takes a positive number of seconds, e.g. --watch 5")
        n = 0
        with _store(fl, store, must_exist=True) as st:
            while True:
                rows = status(fl, st, group=group, live=live, reported=reported)
                n += 1
                if as_json:
                    dump([r.to_json() for r in rows])
                else:
                    if watch and err.is_terminal:
                        err.clear()
                    table(rows)
                if not watch or (count is not None and n >= count):
                    break
                time.sleep(watch)

    run_guarded(go)


@fleet_app.command("history")
def history_cmd(board: str = typer.Argument(..., help="board name"), fleet: Optional[Path] = FLEET_OPT,
                limit: int = typer.Option(30, help="rows"), store: Optional[Path] = STORE_OPT,
                as_json: bool = JSON_OPT) -> None:
    """Everything the store holds for one board, newest first."""
    def go() -> None:
        fl = _fleet(fleet)
        fl.board(board)
        with _store(fl, store, must_exist=True) as st:
            rows = st.history(board, limit=limit)
        if as_json:
            dump([{**{k: v for k, v in asdict(r).items() if k != "data"}, "data": r.data} for r in rows])
            return
        t = _table(f"{board}: last {len(rows)} reports",
                   ("when", "kind", "ok", "release", "p90 ms", "drift", "peak RSS MiB", "bytes"))
        for r in rows:
            t.add_row(dt.datetime.fromtimestamp(r.ts).isoformat(timespec="seconds"), cell(r.kind),
                      "yes" if r.ok else "[red]no[/]", fmt(r.release), fmt(r.p90_ms), fmt(r.drift),
                      fmt(r.peak_rss_mb, 1), fmt(r.bytes))
        err.print(t)

    run_guarded(go)


@fleet_app.command("check")
def check_cmd(fleet: Optional[Path] = FLEET_OPT, group: Optional[str] = GROUP_OPT,
              max_drift: float = typer.Option(0.02, help="flag top-1 drift above this"),
              latency_margin: float = typer.Option(0.20, help="flag p90 above the previous release by this fraction"),
              latency_floor_ms: float = typer.Option(0.5, help="... and by at least this many ms"),
              runs: int = typer.Option(50, help="timed bench runs per board"),
              concurrency: int = typer.Option(4, help="boards checked at once"),
              store: Optional[Path] = STORE_OPT, as_json: bool = JSON_OPT) -> None:
    """Re-run eval and bench on boards; flag drift, latency and RAM regressions. Exit 26 if any (cron/CI)."""
    from ..fleet import CheckPolicy, check

    def go() -> None:
        fl = _fleet(fleet)
        with _store(fl, store) as st:
            rep = check(fl, fl.select(group), store=st,
                        policy=CheckPolicy(max_drift=max_drift, latency_margin=latency_margin,
                                           latency_floor_ms=latency_floor_ms, bench_runs=runs, concurrency=concurrency))
        if as_json:
            dump(rep.to_json())
        else:
            t = _table(f"fleet check: {len(rep.flags)} regression(s)",
                       ("board", "release", "top-1", "drift", "p90 ms", "prev p90", "peak RSS", "note"))
            for b in rep.boards:
                note = "; ".join(f.kind for f in b.flags) or (b.error or "ok")
                t.add_row(cell(b.board), fmt(b.release), fmt(b.top1), fmt(b.drift), fmt(b.p90_ms),
                          fmt(b.baseline_p90_ms), fmt(b.peak_rss_mb, 1), cell(note, "red" if b.flags or b.error else ""))
            err.print(t)
            for f in rep.flags:
                err.print("[red]regression:[/]", cell(f.message))
        finish(rep)

    run_guarded(go)


def report_cmd(output: Optional[Path] = typer.Option(None, "-o", "--output", "--html",
                                                     help="HTML page to write (default: fleet.html in the project's out folder)"),
               fleet: Optional[Path] = FLEET_OPT, store: Optional[Path] = STORE_OPT,
               max_drift: float = typer.Option(0.02, help="drift threshold drawn on the plot"),
               as_json: bool = JSON_OPT) -> None:
    """Fleet report: latency per board and release, drift over time, flagged regressions."""
    from ..fleet import render_html

    def go() -> None:
        fl = _fleet(fleet)
        with _store(fl, store, must_exist=True) as st:
            out = render_html(st, output_path(output, "fleet.html"), max_drift=max_drift, fleet=fl)
        if as_json:
            dump({"html": str(out), "bytes": out.stat().st_size})
        else:
            err.print(cell(f"wrote {out} ({out.stat().st_size / 1024:.1f} KiB, self-contained)"))

    run_guarded(go)


def register(app: typer.Typer) -> None:
    app.command("push")(push_cmd)
    app.command("abort")(abort_cmd)
    app.command("rollback")(rollback_cmd)
    app.command("report")(report_cmd)
    app.add_typer(fleet_app, name="fleet")


__all__ = ["register", "fleet_app"]
