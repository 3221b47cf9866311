"""CLI for OTA bundles: ``edgepack keys ...``, ``bundle``, ``delta``, ``verify`` (issue 3).

Thin shell over edgepack.ota.keys / edgepack.ota.bundle / edgepack.ota.delta and the board's reader
(device_agent.bundle). Board-side errors (device_agent.errors.OtaError) are reported like
EdgepackError: one line on stderr, non-zero exit. Private key material is never printed.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, List, Optional

import typer
from rich.table import Table
from rich.text import Text

from ._common import JSON_OPT, cell, dump, out, output_path, run_guarded

keys_app = typer.Typer(no_args_is_help=True, help="Root keys, release keys, key lists: create, rotate, revoke.")


def _emit(as_json: bool, data: Any, table: Table | None = None, lines: list[str] | None = None) -> None:
    if as_json:
        dump(data)
        return
    if table is not None:
        out.print(table)
    for line in lines or []:
        out.print(line, highlight=False)


def _t(v: Any) -> Text:
    """A cell from a bundle (model, version, targets, paths): plain text, control characters escaped."""
    return cell(v)


def _kv_table(title: str, rows: dict[str, Any]) -> Table:
    t = Table(title=_t(title), show_header=False)
    t.add_column("field", style="bold")
    t.add_column("value")
    for k, v in rows.items():
        t.add_row(_t(k), _t(", ".join(map(str, v)) if isinstance(v, (list, tuple)) else v))
    return t


def _files_table(files: list[dict[str, Any]], title: str) -> Table:
    t = Table(title=_t(title))
    for c in ("path", "role", "encoding", "length", "transport", "sha256"):
        t.add_column(c, justify="right" if c in ("length", "transport") else "left")
    for f in files:
        t.add_row(_t(f["path"]), _t(f.get("role", "")), _t(f["encoding"]), f"{f['length']:,}",
                  f"{f['transport_length']:,}", _t(f["sha256"][:16] + "…"))
    return t


# --------------------------------------------------------------------------- keys
@keys_app.command("init-root")
def keys_init_root(directory: Path = typer.Argument(..., help="Directory for root-N.key files and root.json"),
                   count: int = typer.Option(3, help="Number of root keys"),
                   threshold: int = typer.Option(2, help="Root signatures needed to sign a key list or a new root"),
                   expires_days: float = typer.Option(3650, help="Root document lifetime"),
                   as_json: bool = JSON_OPT) -> None:
    """Create the root keys (0600 files: move them offline) and root.json v1 to flash onto boards."""
    def run() -> None:
        from ..ota.keys import init_root
        path, ks = init_root(directory, count=count, threshold=threshold, expires_days=expires_days)
        data = {"root": str(path), "threshold": threshold,
                "keys": [{"keyid": k.keyid, "file": str(Path(directory) / f"root-{i + 1}.key")} for i, k in enumerate(ks)]}
        _emit(as_json, data, _kv_table("root v1", {"root document": path, "threshold": f"{threshold} of {count}",
                                                  "key ids": [k.keyid[:16] for k in ks]}),
              ["[dim]Keep root-*.key offline; boards get root.json.[/]"])
    run_guarded(run)


@keys_app.command("new-release-key")
def keys_new_release_key(path: Path = typer.Argument(..., help="Private key file to create (0600); PATH.pub is written too"),
                         as_json: bool = JSON_OPT) -> None:
    """Create a release-signing key. Add it to the key list with `keys sign-release-keys`."""
    def run() -> None:
        from ..ota.keys import generate_key, pub_path
        k = generate_key(path)
        _emit(as_json, {"keyid": k.keyid, "private": str(path), "public": str(pub_path(path))},
              lines=[f"release key {k.keyid}", f"private: {path} (0600)", f"public:  {pub_path(path)}"])
    run_guarded(run)


def _load_signers(paths: list[Path]) -> list:
    from ..ota.keys import load_signing_key
    return [load_signing_key(p) for p in paths]


@keys_app.command("sign-release-keys")
def keys_sign_release_keys(root: Path = typer.Option(..., help="Current root.json"),
                           root_key: List[Path] = typer.Option(..., help="Root private key (repeat to reach the threshold)"),
                           key: List[Path] = typer.Option([], help="Release public key (.pub) to list (repeat)"),
                           version: int = typer.Option(..., help="List version: higher than the one boards hold"),
                           revoke: List[str] = typer.Option([], help="Key id to list as revoked (repeat)"),
                           threshold: int = typer.Option(1, help="Release signatures a bundle needs"),
                           expires_days: float = typer.Option(365, help="lifetime of the key list in days (boards refuse it after)"),
                           output: Path = typer.Option(..., "-o", "--output", help="file to write"),
                           as_json: bool = JSON_OPT) -> None:
    """Sign the list of release keys with root keys (also the way to rotate release keys)."""
    def run() -> None:
        from ..ota.keys import describe_doc, load_public_key, make_release_keys, read_doc, write_doc
        doc = make_release_keys(read_doc(root), _load_signers(root_key), [load_public_key(k) for k in key],
                                version=version, revoked=revoke, threshold=threshold, expires_days=expires_days)
        write_doc(output_path(output, output.name), doc)
        d = describe_doc(doc)
        _emit(as_json, {"output": str(output), **d},
              _kv_table(f"release-key list v{version} -> {output}", {"keys": [k[:16] for k in d["keys"]],
                        "revoked": [k[:16] for k in d["revoked"]] or "-", "signed by": [k[:16] for k in d["signatures"]]}))
    run_guarded(run)


@keys_app.command("revoke")
def keys_revoke(keyid: List[str] = typer.Argument(..., help="Release key id(s) (or unique prefix) to revoke"),
                root: Path = typer.Option(..., help="Current root.json"),
                release_keys: Path = typer.Option(..., help="Current release-key list"),
                root_key: List[Path] = typer.Option(..., help="Root private key (repeat to reach the threshold)"),
                expires_days: float = typer.Option(365, help="lifetime of the key list in days (boards refuse it after)"),
                output: Path = typer.Option(..., "-o", "--output", help="file to write"),
                as_json: bool = JSON_OPT) -> None:
    """Publish a new key list (version + 1) that revokes release keys. Ship it in the next bundle."""
    def run() -> None:
        from ..ota.keys import describe_doc, read_doc, revoke as do_revoke, write_doc
        doc = do_revoke(read_doc(release_keys), read_doc(root), _load_signers(root_key), keyid,
                        expires_days=expires_days)
        write_doc(output_path(output, output.name), doc)
        d = describe_doc(doc)
        _emit(as_json, {"output": str(output), **d},
              _kv_table(f"release-key list v{d['version']} -> {output}",
                        {"keys": [k[:16] for k in d["keys"]] or "-", "revoked": [k[:16] for k in d["revoked"]]}))
    run_guarded(run)


@keys_app.command("rotate-root")
def keys_rotate_root(root: Path = typer.Option(..., help="Current root.json (version n)"),
                     old_key: List[Path] = typer.Option(..., help="Current root private key (threshold of them)"),
                     new_key: List[Path] = typer.Option(..., help="Private key of the new root (all new keys; they sign too)"),
                     threshold: int = typer.Option(2, help="root signatures the new root needs"),
                     expires_days: float = typer.Option(3650, help="lifetime of the root document in days"),
                     output: Path = typer.Option(..., "-o", "--output", help="file to write"),
                     as_json: bool = JSON_OPT) -> None:
    """Make root v(n+1) signed by the old and new root keys. Ship it in bundles (`bundle --root`)."""
    def run() -> None:
        from ..ota.keys import describe_doc, read_doc, rotate_root, write_doc
        news = _load_signers(new_key)
        doc = rotate_root(read_doc(root), _load_signers(old_key), news, news, threshold, expires_days=expires_days)
        write_doc(output_path(output, output.name), doc)
        d = describe_doc(doc)
        _emit(as_json, {"output": str(output), **d},
              _kv_table(f"root v{d['version']} -> {output}", {"threshold": d["threshold"],
                        "keys": [k[:16] for k in d["keys"]], "signed by": [k[:16] for k in d["signatures"]]}))
    run_guarded(run)


@keys_app.command("reset-counter")
def keys_reset_counter(root: Path = typer.Option(..., help="Current root.json"),
                       root_key: List[Path] = typer.Option(..., help="Root private key (repeat to reach the threshold)"),
                       counter: int = typer.Option(..., help="Anti-rollback counter the boards get"),
                       version: int = typer.Option(..., help="Reset version: higher than any reset boards applied"),
                       target: List[str] = typer.Option(..., "--target", "-t", help="Board target the reset is for (repeat)"),
                       expires_days: float = typer.Option(7, help="lifetime of the reset document in days"),
                       output: Path = typer.Option(..., "-o", "--output", help="file to write"),
                       as_json: bool = JSON_OPT) -> None:
    """Root-signed reset of the boards' anti-rollback counter (`edgepack-agent reset-counter DOC`)."""
    def run() -> None:
        from ..ota.keys import make_counter_reset, read_doc, write_doc
        doc = make_counter_reset(read_doc(root), _load_signers(root_key), counter=counter, version=version,
                                 targets=target, expires_days=expires_days)
        write_doc(output_path(output, output.name), doc)
        _emit(as_json, {"output": str(output), "counter": counter, "version": version, "targets": list(target)},
              _kv_table(f"counter reset v{version} -> {output}", {"counter": counter, "targets": list(target)}))
    run_guarded(run)


@keys_app.command("show")
def keys_show(path: Path = typer.Argument(..., help="root.json, release-key list, or a .pub/.key file"),
              as_json: bool = JSON_OPT) -> None:
    """Show a trust document or a key's id (never the private key)."""
    def run() -> None:
        from ..ota.keys import describe_doc, key_id, load_public_key, read_doc
        from device_agent.errors import MalformedBundle
        try:
            doc = read_doc(path)
        except MalformedBundle:
            doc = {}
        if "signed" in doc:
            data = describe_doc(doc)
        else:
            raw = load_public_key(path)
            data = {"keyid": key_id(raw), "public": raw.hex()}
        _emit(as_json, data, _kv_table(str(path), data))
    run_guarded(run)


# --------------------------------------------------------------------------- bundle / delta / verify
def _roots(paths: list[Path]) -> list[dict]:
    from ..ota.keys import read_doc
    return [read_doc(p) for p in paths]


def _check_targets(targets: List[str], any_target: bool) -> None:
    """A bundle for a board class nobody ships is refused (a typo would reach no board), unless the
    user says it is their own class (``--any-target``)."""
    from ..errors import TargetError
    from ..targets import list_targets

    known = set(list_targets())
    unknown = [t for t in targets if t not in known]
    if unknown and not any_target:
        raise TargetError(f"unknown target(s) {unknown}; shipped: {', '.join(sorted(known))} "
                          "(`edgepack targets`); for a board class of your own pass --any-target")


def _check_ota_budget(path: Path, size: int, targets: List[str]) -> None:
    """A bundle over a shipped target's OTA budget is removed and refused (--allow-oversize keeps it)."""
    from ..errors import BudgetNotMet
    from ..targets import list_targets, load_target

    known = set(list_targets())
    for t in (load_target(n) for n in targets if n in known):
        if size > t.ota_budget_mb * 1e6:
            path.unlink(missing_ok=True)
            raise BudgetNotMet(f"bundle is {size / 1e6:.2f} MB, over {t.name}'s OTA budget of {t.ota_budget_mb:g} MB; "
                               "nothing written (quantize to a smaller model, or pass --allow-oversize)")


def bundle_cmd(model: List[Path] = typer.Argument(..., help="Model file(s): .onnx or .tflite"),
               name: str = typer.Option(..., "--name", "-n", help="Model name (same across releases; letters, digits, "
                                        "._+-)"),
               release: int = typer.Option(..., "--release", "-r",
                                           help="Monotonic release number (boards refuse lower ones)"),
               label: Optional[str] = typer.Option(None, "--label", "--version", "-l",
                                                   help="Human version label, e.g. 1.4.0 (default: the release "
                                                   "number; --version is the old spelling)"),
               target: List[str] = typer.Option(..., "--target", "-t", help="Compatible target (repeat)"),
               key: List[Path] = typer.Option(..., help="Release private key (repeat for multi-signature)"),
               release_keys: Path = typer.Option(..., help="Release-key list signed by the root keys"),
               root: List[Path] = typer.Option(..., help="root.json; repeat with rotated roots to ship the chain"),
               settings: Optional[Path] = typer.Option(None, help="Runtime settings JSON (runtime, threads, execution_provider)"),
               golden: Optional[Path] = typer.Option(None, help=".npz with input* arrays and output* reference outputs "
                                                     "(default: MODEL.golden.npz next to the model, if there)"),
               quantize_report: Optional[Path] = typer.Option(
                   None, "--quantize-report", help="the model's `edgepack quantize` JSON report: carried in the "
                   "bundle, and `push` refuses a release that missed its budget unless --accept-budget-miss"),
               expires_days: float = typer.Option(90, help="Manifest lifetime (boards refuse expired bundles)"),
               level: int = typer.Option(9, help="zstd level"),
               allow_oversize: bool = typer.Option(False, "--allow-oversize",
                                                   help="Keep a bundle larger than a target's OTA budget"),
               any_target: bool = typer.Option(False, "--any-target",
                                               help="Accept target names that are not shipped profiles"),
               keep_file_names: bool = typer.Option(False, "--keep-file-names",
                                                    help="Carry a single model under its own file name (default: "
                                                    "NAME.onnx, the same in every release, so deltas find their base)"),
               output: Optional[Path] = typer.Option(None, "-o", "--output",
                                                     help="bundle to write (default: NAME-rRELEASE.bundle in the "
                                                     "project's out folder)"),
               llm: Optional[bool] = typer.Option(None, "--llm/--no-llm",
                                                  help="Package a KV-cache decoder with its external data, "
                                                  "genai_config.json and golden prompts (default: detected)"),
               min_token_agreement: float = typer.Option(0.9, help="LLM health: next-token agreement the board "
                                                         "demands on the golden prompts"),
               max_ppl_ratio: float = typer.Option(1.1, help="LLM health: highest perplexity / reference"),
               as_json: bool = JSON_OPT) -> None:
    """Build a signed full bundle; it is read back with the board's verifier before it is kept."""
    def run() -> None:
        from ..ota.bundle import build_bundle
        from ..ota.llm_bundle import LLMBundleOptions, wants_llm
        from ..ota.keys import read_doc
        import tempfile

        from ..project import check_name
        from ..quantize.workflows import stable_model_names
        check_name(name)
        _check_targets(target, any_target)
        gold = golden
        if gold is None and model and model[0].with_suffix(".golden.npz").is_file():
            gold = model[0].with_suffix(".golden.npz")  # what `edgepack quantize` writes beside its model
        out_path = output_path(output, f"{name}-r{release}.bundle")
        lopt = LLMBundleOptions(detect=llm, min_token_agreement=min_token_agreement, max_ppl_ratio=max_ppl_ratio)
        # an LLM keeps the builder's names: its graph and genai_config.json name each other's files
        keep = keep_file_names or wants_llm(list(model), lopt)
        with tempfile.TemporaryDirectory(prefix="edgepack-bundle-names-") as td:
            models = list(model) if keep else stable_model_names(list(model), name, Path(td))
            rep = build_bundle(out_path, models=models, name=name, release=release, version=label or str(release),
                               targets=target, signer=_load_signers(key), release_keys_doc=read_doc(release_keys),
                               roots=_roots(root), settings=settings, golden=gold, quantize_report=quantize_report,
                               expires_days=expires_days, level=level, llm=lopt)
        if not allow_oversize:
            _check_ota_budget(rep.path, rep.bundle_bytes, target)
        data = {"output": str(rep.path), "bundle_bytes": rep.bundle_bytes, "seconds": round(rep.seconds, 3),
                "files": rep.files, "release": release, "golden": str(gold) if gold else None}
        _emit(as_json, data, _files_table(rep.files, f"{rep.path} ({rep.bundle_bytes:,} bytes)"))
    run_guarded(run)


def delta_cmd(old: Path = typer.Argument(..., help="Full bundle the boards hold"),
              new: Path = typer.Argument(..., help="Full bundle to reach"),
              output: Path = typer.Option(..., "-o", "--output", help="file to write"),
              key: List[Path] = typer.Option(..., help="Release private key to sign the delta manifest"),
              root: List[Path] = typer.Option(..., help="root.json the boards hold (to verify OLD and NEW)"),
              release_keys: Optional[Path] = typer.Option(None, help="Release-key list, if the bundles do not carry one"),
              level: int = typer.Option(19, help="zstd level for patches"),
              as_json: bool = JSON_OPT) -> None:
    """Make a delta bundle OLD -> NEW (tensor-aware for ONNX); writes NEW itself if no delta is smaller."""
    def run() -> None:
        from ..ota.bundle import trust_for_check
        from ..ota.delta import make_delta_bundle
        from ..ota.keys import read_doc
        trust = trust_for_check(_roots(root), None)
        if release_keys is not None:
            trust = trust.update_release_keys(read_doc(release_keys))
        rep = make_delta_bundle(old, new, output, trust=trust, signer=_load_signers(key), level=level)
        data = {"output": str(rep.path), "fallback_to_full": rep.fallback, "bundle_bytes": rep.bundle_bytes,
                "full_bundle_bytes": rep.full_bundle_bytes, "ratio": round(rep.bundle_bytes / rep.full_bundle_bytes, 4),
                "base_release": rep.base_release, "release": rep.release, "files": rep.files,
                "seconds": round(rep.seconds, 3), "warnings": rep.warnings}
        t = Table(title=f"delta {rep.base_release} -> {rep.release}: {rep.path}")
        for c in ("path", "encoding", "bytes"):
            t.add_column(c)
        for f in rep.files:
            t.add_row(_t(f["path"]), _t(f["encoding"]), f"{f['bytes']:,}")
        note = ("[yellow]delta was not smaller: wrote the full bundle[/]" if rep.fallback else
                f"{rep.bundle_bytes:,} bytes = {data['ratio']:.1%} of the full bundle ({rep.full_bundle_bytes:,})")
        _emit(as_json, data, t, [note])
        if not as_json:
            for w in rep.warnings:
                out.print(Text.assemble(("warning: ", "yellow"), cell(w)))
    run_guarded(run)


def verify_cmd(bundle: Path = typer.Argument(..., help="Bundle to verify"),
               root: Path = typer.Option(..., help="root.json (what the board has flashed)"),
               release_keys: Optional[Path] = typer.Option(None, help="Release-key list the board already holds"),
               target: Optional[str] = typer.Option(None, "--target", "-t", help="Board target to check compatibility against"),
               min_release: int = typer.Option(0, help="Lowest release accepted (anti-rollback counter)"),
               base_dir: Optional[Path] = typer.Option(None, help="Directory holding the base release (delta bundles)"),
               extract_to: Optional[Path] = typer.Option(None, "--extract", help="Also write the verified files here"),
               as_json: bool = JSON_OPT) -> None:
    """Verify a bundle exactly as a board does (signatures, policy, every payload hash)."""
    def run() -> None:
        from device_agent.bundle import extract, open_bundle, verify_payloads
        from device_agent.trust import TrustRoot
        trust = TrustRoot.from_files(root, release_keys)
        vm = open_bundle(bundle, trust, target=target, min_release=min_release)
        if extract_to is not None:
            written = extract(vm, extract_to, base_dir=base_dir)
        else:
            verify_payloads(vm, base_dir=base_dir)
            written = []
        s = vm.summary()
        rebuilt = vm.kind == "full" or base_dir is not None
        data = {"ok": True, "payloads_rebuilt": rebuilt, "written": [str(p) for p in written], **s}
        lines = ["[green]OK[/]: signature, policy and every payload hash verified"
                 + ("" if rebuilt else " (delta: transport hashes only; pass --base-dir to rebuild and check files)")]
        _emit(as_json, data, _kv_table(str(bundle), {k: s[k] for k in ("kind", "model", "release", "version", "targets",
                                                                           "expires", "content_sha256")}), lines)
        if not as_json:
            out.print(_files_table(s["files"], "files"))
    run_guarded(run)


def register(app: typer.Typer) -> None:
    app.add_typer(keys_app, name="keys")
    app.command("bundle")(bundle_cmd)
    app.command("delta")(delta_cmd)
    app.command("verify")(verify_cmd)
    app.command("diff")(diff_cmd)


def diff_cmd(old: Path = typer.Argument(..., help="the earlier full bundle"),
             new: Path = typer.Argument(..., help="the later full bundle"),
             root: Path = typer.Option(..., "--root", help="root.json both bundles verify against"),
             release_keys: Optional[Path] = typer.Option(None, help="Release-key list, if the bundles do not carry one"),
             runs: int = typer.Option(20, help="timed runs per model for the host latency figure"),
             as_json: bool = JSON_OPT) -> None:
    """What changed between two releases: files, changed tensors, size, agreement on the golden inputs, latency."""
    def run() -> None:
        from device_agent.trust import TrustRoot

        from ..diff import diff_bundles
        rep = diff_bundles(old, new, TrustRoot.from_files(root, release_keys), runs=runs)
        if as_json:
            dump(rep.to_json())
            return
        o, n = rep.old, rep.new
        rows = {"release": f"{o['release']} ({o['version']}) -> {n['release']} ({n['version']})",
                "model": o["model"] if o["model"] == n["model"] else f"{o['model']} -> {n['model']}",
                "bundle bytes": f"{o['bytes']:,} -> {n['bytes']:,} ({n['bytes'] - o['bytes']:+,})",
                "tensors": f"{len(rep.tensors)} changed/added/removed, {rep.tensors_same} the same"}
        if rep.agreement is not None:
            rows["top-1 agreement"] = f"{rep.agreement:.2%} of {rep.golden_samples} golden inputs (old vs new)"
        if rep.latency_ms:
            rows["latency, this host"] = (f"{rep.latency_ms['old']:.3f} ms -> {rep.latency_ms['new']:.3f} ms "
                                          f"(median of {runs}, 1 thread; not a board figure)")
        out.print(_kv_table(f"diff {old.name} -> {new.name}", rows))
        t = Table(title="files")
        for c in ("path", "role", "change", "old bytes", "new bytes"):
            t.add_column(c, justify="right" if "bytes" in c else "left")
        for f in rep.files:
            t.add_row(cell(f.path), cell(f.role), cell(f.change), f"{f.old_bytes:,}" if f.old_bytes is not None else "–",
                      f"{f.new_bytes:,}" if f.new_bytes is not None else "–")
        out.print(t)
        if rep.tensors:
            t = Table(title=f"tensors ({len(rep.tensors)} of {len(rep.tensors) + rep.tensors_same} differ)")
            for c in ("tensor", "change", "shape", "max |diff|"):
                t.add_column(c, overflow="fold")
            for x in rep.tensors[:40]:
                t.add_row(cell(x.tensor), cell(x.change), cell("x".join(map(str, x.shape))),
                          "–" if x.max_abs_diff is None else f"{x.max_abs_diff:.3g}")
            out.print(t)
            if len(rep.tensors) > 40:
                out.print(f"... and {len(rep.tensors) - 40} more (--json lists all)", markup=False)
    run_guarded(run)
