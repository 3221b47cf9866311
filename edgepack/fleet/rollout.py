"""Staged rollout of a published release by rewriting signed metadata only.

Each target of a release carries ``custom.edgepack.rollout = {percent, halted, recall}``. A board
computes its stable cohort bucket in [0, 100) from its id (``device_agent.pull.cohort_bucket``)
and takes the release only when ``bucket < percent`` and the rollout is not halted; raising the
percentage only ever adds boards, and a board outside the cohort keeps its release. ``--halt``
stops new installs; ``--recall`` also makes boards that run the release roll back to their kept
previous one. Nothing but targets/snapshot/timestamp metadata changes: no bundle is re-uploaded.

``watch`` is the automatic halt: ingest the boards' reports, count the release's failures in
its cohort (install refused, trial rolled back, and committed installs that push's regression
judgement flags: ``push.judge_install``), and halt (with recall when regressions were committed)
once they pass ``max_failures``.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from device_agent.pull import cohort_bucket

from .agent_client import agent_error
from .errors import InventoryError
from .publish import CUSTOM, RepoOptions, TufRepository
from .push import BoardResult, Policy, _count, judge_install
from .storage import Backend
from .store import Store


@dataclass
class RolloutState:
    model: str
    release: int
    percent: float
    halted: bool
    recall: bool
    targets: list[str]
    timestamp_version: int | None = None


def _release_targets(repo: TufRepository, release: int, model: str | None) -> tuple[str, list[Any]]:
    found: dict[str, list[Any]] = {}
    for name, tf in repo.target_items().items():
        c = (tf.custom or {}).get(CUSTOM, {})
        if c.get("release") == release and (model is None or c.get("model") == model):
            found.setdefault(c.get("model"), []).append(tf)
    if not found:
        raise InventoryError(f"release {release}{' of ' + model if model else ''} is not published in "
                             f"{repo.be.describe()}; `edgepack publish` it first")
    if len(found) > 1:
        raise InventoryError(f"release {release} is published for several models ({', '.join(sorted(found))}); "
                             "pass --model")
    (m, tfs), = found.items()
    return m, tfs


def rollout_states(repository: str | Path | Backend, keys_dir: str | Path) -> list[RolloutState]:
    repo = TufRepository.open(repository, keys_dir)
    by: dict[tuple[str, int], RolloutState] = {}
    for name, tf in repo.target_items().items():
        c = (tf.custom or {}).get(CUSTOM, {})
        r = c.get("rollout") or {}
        k = (c.get("model"), c.get("release"))
        st = by.setdefault(k, RolloutState(model=k[0], release=k[1], percent=r.get("basis_points", 0) / 100,
                                           halted=bool(r.get("halted")), recall=bool(r.get("recall")), targets=[]))
        st.targets.append(name)
    return sorted(by.values(), key=lambda s: (str(s.model), s.release))


def set_rollout(repository: str | Path | Backend, keys_dir: str | Path, release: int, *, model: str | None = None,
                percent: float | None = None, halt: bool = False, resume: bool = False, recall: bool = False,
                options: RepoOptions | None = None) -> RolloutState:
    """Rewrite the rollout fields of a release's targets and commit new signed metadata."""
    if sum([percent is not None, halt, resume]) != 1:
        raise InventoryError("give exactly one of --percent P, --halt or --resume")
    if recall and not halt:
        raise InventoryError("--recall goes with --halt (boards running the release roll back)")
    if percent is not None and not 0 <= percent <= 100:
        raise InventoryError(f"--percent must be in 0..100, not {percent}")
    repo = TufRepository.open(repository, keys_dir, options=options)
    m, tfs = _release_targets(repo, release, model)
    new: dict[str, Any] = {}
    for tf in tfs:
        c = tf.unrecognized_fields["custom"][CUSTOM]
        r = dict(c.get("rollout") or {"basis_points": 0, "halted": False, "recall": False})
        if percent is not None:
            r["basis_points"] = round(percent * 100)
        if halt:
            r["halted"], r["recall"] = True, bool(recall)
        if resume:
            r["halted"], r["recall"] = False, False
        c["rollout"] = new = r
    _, _, tsv = repo.commit()
    return RolloutState(model=m, release=release, percent=new["basis_points"] / 100, halted=new["halted"], recall=new["recall"],
                        targets=[tf.path for tf in tfs], timestamp_version=tsv)


# --------------------------------------------------------------------------- automatic halt
@dataclass
class WatchReport:
    model: str
    release: int
    percent: float
    reports: int
    committed: int
    failures: list[dict[str, Any]] = field(default_factory=list)
    limit: int = 0
    halted: bool = False
    recall: bool = False
    reason: str | None = None

    @property
    def exit_code(self) -> int:
        from .errors import RolloutHalted
        return RolloutHalted.exit_code if self.halted else 0

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "exit_code": self.exit_code}


def watch(repository: str | Path | Backend, keys_dir: str | Path, store: Store, release: int, *,
          model: str | None = None, policy: Policy | None = None, latency_budget_ms: float | None = None,
          ingest_first: bool = True) -> WatchReport:
    """Ingest reports, judge the release's installs, halt the rollout when failures pass
    ``policy.max_failures`` (a count, or a percentage of the boards that reported on it)."""
    from .ingest import ingest
    p = policy or Policy()
    repo = TufRepository.open(repository, keys_dir)
    m, tfs = _release_targets(repo, release, model)
    roll = tfs[0].custom[CUSTOM].get("rollout") or {}
    if ingest_first:
        ingest(store, repo.be)
    with store.transaction() as db:
        rows = db.execute("SELECT board, ok, json FROM reports WHERE kind='install' AND release=? ORDER BY id",
                          (release,)).fetchall()
    latest: dict[str, tuple[bool, dict[str, Any]]] = {}
    for board, ok, js in rows:
        latest[board] = (bool(ok), json.loads(js))
    failures: list[dict[str, Any]] = []
    committed = 0
    regressed = False
    for board, (ok, d) in latest.items():
        if not ok:
            e = agent_error(d)
            if e.type in ("Busy", "DiskFull"):
                continue  # the board's condition, not the release's
            failures.append({"board": board, "bucket": cohort_bucket(board, m), "reason": f"{e.type}: "
                             f"{e.message[:160]}"})
            continue
        committed += 1
        from .store import figures
        f = figures("install", d)
        r = BoardResult(board=board, wave=0, p90_ms=f["p90_ms"], drift=f["drift"],
                        baseline_p90_ms=store.baseline_p90(board, release))
        flags = judge_install(r, p, latency_budget_ms)
        if flags:
            regressed = True
            failures.append({"board": board, "bucket": cohort_bucket(board, m), "reason": "; ".join(flags)})
    limit = _count(p.max_failures, max(len(latest), 1), "--max-failures")
    rep = WatchReport(model=m, release=release, percent=roll.get("basis_points", 0) / 100, reports=len(latest),
                      committed=committed, failures=failures, limit=limit, halted=bool(roll.get("halted")),
                      recall=bool(roll.get("recall")))
    if len(failures) > limit and not roll.get("halted"):
        set_rollout(repo.be, keys_dir, release, model=m, halt=True, recall=regressed)
        rep.halted, rep.recall = True, regressed
        rep.reason = (f"{len(failures)} failure(s) > max {limit} at {rep.percent:g} %: "
                      + "; ".join(f"{x['board']}: {x['reason']}" for x in failures)[:400])
    return rep


__all__ = ["set_rollout", "rollout_states", "watch", "RolloutState", "WatchReport"]
