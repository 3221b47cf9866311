"""`edgepack repo init|refresh|rotate`, `edgepack publish`, `edgepack rollout set|status|watch`,
`edgepack fleet ingest|check-reports`: the pull side of a fleet (docs/fleet.md, "Pull fleets").

Thin shell over edgepack.fleet.publish / rollout / ingest: parse, call one function, print a
table on stderr or JSON on stdout (--json).
"""
from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer
from rich.table import Table

from ._common import JSON_OPT, dump as _dump, err, finish, run_guarded

repo_app = typer.Typer(no_args_is_help=True, help="TUF repository for pull fleets: create, re-sign, rotate keys.")
rollout_app = typer.Typer(no_args_is_help=True, help="Staged rollout of a published release by signed metadata.")

REPO_OPT = typer.Option(..., "--repo", help="repository: a folder (served by any web server) or s3://BUCKET/PREFIX"
                        "[?endpoint=URL]")
KEYS_OPT = typer.Option(..., "--keys", help="folder of the repository's TUF keys (tuf-*.key, 0600)")


@repo_app.command("init")
def repo_init(repo: str = REPO_OPT, keys: Path = KEYS_OPT,
              root_key: List[Path] = typer.Option([], "--root-key", help="reuse this key (e.g. the project's "
                                                  "keys/root-1.key) as a TUF root key (repeat)"),
              root_count: int = typer.Option(1, help="root keys to create when no --root-key is given"),
              root_threshold: int = typer.Option(1, help="root signatures needed"),
              timestamp_days: float = typer.Option(7.0, help="timestamp lifetime (re-sign with `repo refresh`)"),
              as_json: bool = JSON_OPT) -> None:
    """Create the repository: TUF keys (if KEYS has none) and root/targets/snapshot/timestamp v1."""
    from ..fleet.publish import RepoOptions, TufRepository

    def go() -> None:
        r = TufRepository.init(repo, keys, root_keys=list(root_key) or None, root_count=root_count,
                               root_threshold=root_threshold, options=RepoOptions(timestamp_days=timestamp_days))
        d = {"repository": r.be.describe(), "root_version": r.root.signed.version,
             "root_threshold": root_threshold, "root_keys": [str(p) for p in r.keys.root_paths],
             "flash_onto_boards": "metadata/root.json"}
        if as_json:
            _dump(d)
        else:
            err.print(f"repository in {d['repository']}: root v1 ({root_threshold} of {len(r.keys.root_paths)} "
                      f"root keys), keys in {keys}; boards need metadata/root.json "
                      f"(`edgepack-agent pull --tuf-root root.json` once)", highlight=False)
    run_guarded(go)


@repo_app.command("refresh")
def repo_refresh(repo: str = REPO_OPT, keys: Path = KEYS_OPT,
                 timestamp_days: float = typer.Option(7.0, help="timestamp lifetime in days"), as_json: bool = JSON_OPT) -> None:
    """Re-sign the timestamp with a fresh expiry (run from cron well within its lifetime)."""
    from ..fleet.publish import RepoOptions, TufRepository

    def go() -> None:
        v = TufRepository.open(repo, keys, options=RepoOptions(timestamp_days=timestamp_days)).refresh_timestamp()
        _dump({"timestamp_version": v}) if as_json else err.print(f"timestamp v{v} signed")
    run_guarded(go)


@repo_app.command("rotate")
def repo_rotate(role: str = typer.Argument(..., help="targets, snapshot or timestamp"), repo: str = REPO_OPT,
                keys: Path = KEYS_OPT, as_json: bool = JSON_OPT) -> None:
    """Replace a role's key (compromise): new root version signed by the root keys."""
    from ..fleet.publish import TufRepository

    def go() -> None:
        v = TufRepository.open(repo, keys).rotate_key(role)
        _dump({"root_version": v, "role": role}) if as_json else err.print(f"{role} key rotated; root v{v}")
    run_guarded(go)


def publish_cmd(release: Path = typer.Argument(..., help="the release's full bundle (deltas next to it are found)"),
                repo: str = REPO_OPT, keys: Path = KEYS_OPT,
                delta: List[Path] = typer.Option([], "--delta", help="a delta bundle of this release (repeat)"),
                percent: Optional[float] = typer.Option(None, help="rollout percentage (default 0: "
                                                        "then `edgepack rollout set`)"),
                as_json: bool = JSON_OPT) -> None:
    """Add a release to a TUF repository (bundles first, timestamp last: atomic for boards)."""
    from ..fleet.publish import publish

    def go() -> None:
        r = publish(release, repo, keys, deltas=list(delta), percent=percent)
        if as_json:
            _dump(r.to_json())
            return
        t = Table(title=f"release {r.release} published to {r.repository} (timestamp v{r.timestamp_version})")
        for c in ("target", "kind", "bytes", "base"):
            t.add_column(c)
        for x in r.targets:
            t.add_row(x["path"], x["kind"], f"{x['length']:,}", str(x["base_release"] or "–"))
        err.print(t)
        if not percent:
            err.print(f"rollout at 0 %: `edgepack rollout set {r.release} --percent 5 --repo ... --keys ...`",
                      highlight=False)
    run_guarded(go)


@rollout_app.command("set")
def rollout_set(release: int = typer.Argument(...), repo: str = REPO_OPT, keys: Path = KEYS_OPT,
                model: Optional[str] = typer.Option(None, help="model (needed when several share the release)"),
                percent: Optional[float] = typer.Option(None, help="admit boards whose cohort bucket < P %"),
                halt: bool = typer.Option(False, "--halt", help="no new installs of this release"),
                recall: bool = typer.Option(False, "--recall", help="with --halt: boards running it roll back"),
                resume: bool = typer.Option(False, "--resume", help="undo --halt"),
                as_json: bool = JSON_OPT) -> None:
    """Rewrite the release's rollout fields in signed metadata (nothing else changes)."""
    from dataclasses import asdict

    from ..fleet.rollout import set_rollout

    def go() -> None:
        s = set_rollout(repo, keys, release, model=model, percent=percent, halt=halt, resume=resume, recall=recall)
        _dump(asdict(s)) if as_json else err.print(
            f"{s.model} release {s.release}: {s.percent:g} %{', HALTED' if s.halted else ''}"
            f"{', recalled' if s.recall else ''} (timestamp v{s.timestamp_version})", highlight=False)
    run_guarded(go)


@rollout_app.command("status")
def rollout_status(repo: str = REPO_OPT, keys: Path = KEYS_OPT, as_json: bool = JSON_OPT) -> None:
    """Every published release and its rollout."""
    from dataclasses import asdict

    from ..fleet.rollout import rollout_states

    def go() -> None:
        st = rollout_states(repo, keys)
        if as_json:
            _dump([asdict(s) for s in st])
            return
        t = Table(title="rollouts")
        for c in ("model", "release", "percent", "state", "targets"):
            t.add_column(c)
        for s in st:
            t.add_row(str(s.model), str(s.release), f"{s.percent:g}",
                      "recalled" if s.recall else ("halted" if s.halted else "open"), ", ".join(s.targets))
        err.print(t)
    run_guarded(go)


@rollout_app.command("watch")
def rollout_watch(release: int = typer.Argument(...), repo: str = REPO_OPT, keys: Path = KEYS_OPT,
                  store: Path = typer.Option(..., help="SQLite store the reports are ingested into"),
                  model: Optional[str] = typer.Option(None, help="model (needed when several share the release)"),
                  max_failures: str = typer.Option("0", help="failures tolerated (count or %) before halting"),
                  max_drift: float = typer.Option(0.02, help="flag top-1 drift above this"),
                      latency_margin: float = typer.Option(0.20, help="flag p90 above the previous release by "
                                                           "this fraction"),
                  latency_budget_ms: Optional[float] = typer.Option(None, help="flag p90 above this budget"),
                  as_json: bool = JSON_OPT) -> None:
    """Ingest reports and halt the rollout when the cohort regresses (push's judgement). Exit 25 if halted."""
    from ..fleet import Policy, Store
    from ..fleet.rollout import watch

    def go() -> None:
        with Store(store) as st:
            rep = watch(repo, keys, st, release, model=model, latency_budget_ms=latency_budget_ms,
                        policy=Policy(max_failures=max_failures, max_drift=max_drift,
                                      latency_margin=latency_margin))
        if as_json:
            _dump(rep.to_json())
        else:
            err.print(f"{rep.model} release {rep.release} at {rep.percent:g} %: {rep.reports} board(s) reported, "
                      f"{rep.committed} committed, {len(rep.failures)} failure(s) (max {rep.limit})"
                      + (f"; [bold red]HALTED[/]{' and recalled' if rep.recall else ''}" if rep.halted else ""),
                      highlight=False)
            if rep.reason:
                err.print(rep.reason, highlight=False)
        finish(rep)
    run_guarded(go)


def ingest_cmd(repo: str = REPO_OPT, store: Path = typer.Option(..., help="SQLite store"),
               full: bool = typer.Option(False, help="rescan every report object"), as_json: bool = JSON_OPT) -> None:
    """Read the boards' report objects from the repository's store into the SQLite store (idempotent)."""
    from ..fleet import Store
    from ..fleet.ingest import ingest
    from ..fleet.storage import open_backend

    def go() -> None:
        with Store(store) as st:
            rep = ingest(st, open_backend(repo), full=full)
        if as_json:
            _dump(rep.to_json())
        else:
            err.print(f"{rep.new} new report(s), {rep.rows} row(s); {rep.skipped_known} already ingested; "
                      f"{len(rep.bad)} refused in {rep.seconds:.2f} s", highlight=False)
            for b in rep.bad[:10]:
                err.print(f"  refused {b}", highlight=False)
    run_guarded(go)


def check_reports_cmd(store: Path = typer.Option(..., help="SQLite store (after `fleet ingest`)"),
                      max_drift: float = typer.Option(0.02, help="flag top-1 drift above this"),
                      latency_margin: float = typer.Option(0.20, help="flag p90 above the previous release by "
                                                           "this fraction"),
                      latency_floor_ms: float = typer.Option(0.5, help="... and by at least this many ms"),
                      latency_budget_ms: Optional[float] = typer.Option(None, help="flag p90 above this budget"),
                      ram_budget_mb: Optional[float] = typer.Option(None, help="flag peak RSS above this budget"),
                      as_json: bool = JSON_OPT) -> None:
    """`fleet check` for pull fleets: judge every board's latest reported install. Exit 26 if flagged."""
    from ..fleet import CheckPolicy, Store
    from ..fleet.ingest import check_reports

    def go() -> None:
        with Store(store) as st:
            rep = check_reports(st, CheckPolicy(max_drift=max_drift, latency_margin=latency_margin,
                                                latency_floor_ms=latency_floor_ms),
                                latency_budget_ms=latency_budget_ms, ram_budget_mb=ram_budget_mb)
        if as_json:
            _dump(rep.to_json())
        else:
            err.print(f"{len(rep.boards)} board(s) judged in {rep.seconds:.2f} s: {len(rep.flags)} regression(s)",
                      highlight=False)
            for f in rep.flags[:20]:
                err.print(f"[red]regression:[/] {f.message}", highlight=False)
        finish(rep)
    run_guarded(go)


def register(app: typer.Typer, fleet_app: typer.Typer) -> None:
    """The pull side: ``repo`` and ``rollout`` groups, ``publish``, and ``fleet ingest|check-reports``
    (added to the fleet group it is given, so this module imports no other command module)."""
    app.command("publish")(publish_cmd)
    fleet_app.command("ingest")(ingest_cmd)
    fleet_app.command("check-reports")(check_reports_cmd)
    app.add_typer(repo_app, name="repo")
    app.add_typer(rollout_app, name="rollout")


__all__ = ["register"]
