"""The project file, ``edgepack.toml``: what a bundle, a push or a report would otherwise take seven
flags for (model name, target(s), key paths, fleet file, output folder), written once by
``edgepack init`` and read by every command run in that folder or below it, flags overriding.

```toml
[project]
name = "demo"                 # bundle --name (the same across releases)
targets = ["rpi4-2gb"]        # quantize/analyze --target (the first), bundle --target (all)
out = "out"                   # where outputs go when -o is not given

[quantize]                    # any default of `edgepack quantize` / `analyze`
calib = "data/calib.npz"
eval = "data/eval.npz"

[keys]
release_key = "keys/release-1.key"
release_keys = "keys/release-keys.json"
root = "keys/root.json"

[fleet]
file = "fleet.toml"           # push / fleet / report --fleet
```

Paths are relative to the project file, so per-board state and the store do not depend on the
folder a command is run from. Like Cargo and Olive, the file is found by walking up from the
current folder (``EDGEPACK_PROJECT`` names one explicitly).
"""
from __future__ import annotations

import os
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import UsageError

FILE_NAME = "edgepack.toml"
NAME_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._+-]{0,127}")  # the manifest's rule for model and target names
_SECTIONS = {"project": {"name", "targets", "out"},
             "quantize": {"calib", "eval", "search", "preprocess", "max_drop", "calib_size", "rounding"},
             "keys": {"release_key", "release_keys", "root"},
             "fleet": {"file", "store"}}
_PATH_KEYS = {("project", "out"), ("quantize", "calib"), ("quantize", "eval"), ("quantize", "search"),
              ("keys", "release_key"), ("keys", "release_keys"), ("keys", "root"), ("fleet", "file"),
              ("fleet", "store")}


class ProjectError(UsageError):
    """The project file is missing, unreadable or names something that is not there."""


def check_name(name: str) -> str:
    """A model name as bundles and boards carry it: letters, digits, ``.``, ``_``, ``-`` (no spaces)."""
    if not isinstance(name, str) or not NAME_RE.fullmatch(name):
        safe = re.sub(r"[^A-Za-z0-9._+-]+", "-", str(name)).strip("-.") or "model"
        raise ProjectError(f"model name {str(name)[:80]!r} may hold only letters, digits, '.', '_', '+' and '-' "
                           f"(1-128 characters, no spaces); e.g. --name {safe[:128]}")
    return name


@dataclass(frozen=True, kw_only=True)
class Project:
    path: Path                                   # the edgepack.toml
    name: str
    targets: tuple[str, ...] = ()
    out: Path | None = None
    quantize: dict[str, Any] = field(default_factory=dict)
    release_key: Path | None = None
    release_keys: Path | None = None
    root: Path | None = None
    fleet_file: Path | None = None
    store: Path | None = None

    @property
    def dir(self) -> Path:
        return self.path.parent

    @property
    def home(self) -> Path:
        """The project's own state: the default local board and store live here, not in the cwd."""
        return self.dir / ".edgepack"

    @property
    def out_dir(self) -> Path:
        return self.out or self.dir / "out"

    def fleet(self):
        """The project's fleet: its fleet file, else the embedded default board under ``home``."""
        from .fleet import Fleet, load_fleet
        return load_fleet(self.fleet_file) if self.fleet_file else Fleet.default(self.home)


def _load(path: Path) -> Project:
    try:
        doc = tomllib.loads(path.read_text())
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
        raise ProjectError(f"project file {path} is not valid TOML ({e}); fix it or remove it") from None
    unknown = set(doc) - set(_SECTIONS)
    if unknown:
        raise ProjectError(f"{path}: unknown section(s) {sorted(unknown)}; known: {sorted(_SECTIONS)}")
    base = path.resolve().parent
    vals: dict[tuple[str, str], Any] = {}
    for sec, keys in _SECTIONS.items():
        body = doc.get(sec, {})
        if not isinstance(body, dict):
            raise ProjectError(f"{path}: [{sec}] must be a table")
        bad = set(body) - keys
        if bad:
            raise ProjectError(f"{path}: unknown key(s) {sorted(bad)} in [{sec}]; known: {sorted(keys)}")
        for k, v in body.items():
            if (sec, k) in _PATH_KEYS:
                if not isinstance(v, str) or not v:
                    raise ProjectError(f"{path}: [{sec}] {k} must be a path (a string)")
                v = base / os.path.expanduser(v)
            vals[(sec, k)] = v
    name = vals.get(("project", "name"))
    if name is None:
        raise ProjectError(f"{path}: [project] needs a name (the model name bundles carry)")
    check_name(name)
    targets = vals.get(("project", "targets"), [])
    if isinstance(targets, str):
        targets = [targets]
    if not isinstance(targets, list) or not all(isinstance(t, str) for t in targets):
        raise ProjectError(f"{path}: [project] targets must be a list of board profile names")
    return Project(path=path.resolve(), name=name, targets=tuple(targets), out=vals.get(("project", "out")),
                   quantize={k: v for (s, k), v in vals.items() if s == "quantize"},
                   release_key=vals.get(("keys", "release_key")), release_keys=vals.get(("keys", "release_keys")),
                   root=vals.get(("keys", "root")), fleet_file=vals.get(("fleet", "file")),
                   store=vals.get(("fleet", "store")))


def find_project(start: str | Path | None = None) -> Project | None:
    """The project file for ``start`` (default: the current folder): ``EDGEPACK_PROJECT`` if set,
    else the nearest ``edgepack.toml`` in ``start`` or a folder above it; None when there is none."""
    env = os.environ.get("EDGEPACK_PROJECT")
    if env:
        p = Path(env)
        p = p / FILE_NAME if p.is_dir() else p
        if not p.is_file():
            raise ProjectError(f"EDGEPACK_PROJECT={env} is not a project file; run `edgepack init` there or unset it")
        return _load(p)
    d = Path(start or Path.cwd()).resolve()
    for folder in (d, *d.parents):
        p = folder / FILE_NAME
        if p.is_file():
            return _load(p)
    return None


def load_project(path: str | Path) -> Project:
    p = Path(path)
    p = p / FILE_NAME if p.is_dir() else p
    if not p.is_file():
        raise ProjectError(f"no project file at {p}; run `edgepack init` first")
    return _load(p)


SAMPLE_FLEET = """\
# The fleet: which boards exist and how to reach them (docs/fleet.md). Paths are relative to this file.
[fleet]
store = ".edgepack/fleet.db"          # SQLite reports of every push, check and status
known_hosts = "~/.ssh/known_hosts"    # SSH host keys are checked against this file
trust_on_first_use = false

# A board on this machine: the agent as a subprocess with its own state folder (no SSH needed).
[[boards]]
name = "local"
transport = "local"
target = "{target}"
state = ".edgepack/boards/local/state"
incoming = ".edgepack/boards/local/incoming"
trial_in_process = true
env = {{ EDGEPACK_AGENT_INT8 = "exact" }}  # it stands in for boards that compute INT8 exactly
groups = ["canary"]

# A Raspberry Pi over SSH: uncomment, then `edgepack fleet bootstrap`.
# [[boards]]
# name = "cam-01"
# host = "cam-01.lan"
# user = "pi"
# target = "{target}"
# groups = ["site-a"]
"""

PROJECT_TEMPLATE = """\
# edgepack project: every edgepack command run in this folder (or below) reads it; flags override.
[project]
name = "{name}"
targets = [{targets}]
out = "out"

[quantize]
# calib = "data/calib"                # image folder, .npy or .npz
# eval = "data/eval"
# preprocess = "size=224,resize=256,mean=127,std=128"

[keys]                                # made by `edgepack init`: keep keys/root-*.key offline
release_key = "keys/release-1.key"
release_keys = "keys/release-keys.json"
root = "keys/root.json"

[fleet]
file = "fleet.toml"
"""


@dataclass
class InitReport:
    project: Path
    fleet: Path
    keys: dict[str, str]
    created: list[str]

    def to_json(self) -> dict[str, Any]:
        return {"project": str(self.project), "fleet": str(self.fleet), "keys": self.keys, "created": self.created}


def init_project(directory: str | Path, *, name: str, targets: list[str] | tuple[str, ...]) -> InitReport:
    """Write ``edgepack.toml``, a 2-of-3 root and a release key under ``keys/`` (the key list v1
    signed by two root keys) and a sample ``fleet.toml`` with one local board. Refuses to touch a
    folder that already has a project file: keys are never overwritten."""
    from .ota.keys import generate_key, init_root, make_release_keys, pub_path, read_doc, write_doc
    from .targets import load_target

    check_name(name)
    if not targets:
        raise ProjectError("name at least one board profile: --target rpi4-2gb (`edgepack targets` lists them)")
    for t in targets:
        load_target(t)  # an unknown target is refused before anything is written
    d = Path(directory)
    if d.exists() and not d.is_dir():
        raise ProjectError(f"{d} is not a folder")
    pf = d / FILE_NAME
    if pf.exists():
        raise ProjectError(f"{pf} already exists; edit it, or run `edgepack init` in another folder")
    keys = d / "keys"
    if (keys / "root.json").exists() or (keys / "release-1.key").exists():
        raise ProjectError(f"{keys} already holds keys; move them away or run `edgepack init` in another folder")
    d.mkdir(parents=True, exist_ok=True)
    created = []
    root_path, root_keys = init_root(keys)
    rel = generate_key(keys / "release-1.key")
    write_doc(keys / "release-keys.json", make_release_keys(
        read_doc(root_path), root_keys[:2], [rel.public_raw], version=1))
    created += [str(keys / f"root-{i + 1}.key") for i in range(len(root_keys))]
    created += [str(root_path), str(keys / "release-1.key"), str(pub_path(keys / "release-1.key")),
                str(keys / "release-keys.json")]
    fleet = d / "fleet.toml"
    if not fleet.exists():
        fleet.write_text(SAMPLE_FLEET.format(target=targets[0]))
        created.append(str(fleet))
    tmp = pf.with_name(f".{pf.name}.tmp")
    tmp.write_text(PROJECT_TEMPLATE.format(name=name, targets=", ".join(f'"{t}"' for t in targets)))
    tmp.replace(pf)
    created.append(str(pf))
    gi = d / ".gitignore"
    if not gi.exists():
        gi.write_text("# edgepack: private keys, board state and outputs stay out of git\nkeys/*.key\n.edgepack/\nout/\n")
        created.append(str(gi))
    return InitReport(project=pf, fleet=fleet, created=created,
                      keys={"root": str(root_path), "release_key": str(keys / "release-1.key"),
                            "release_keys": str(keys / "release-keys.json")})


__all__ = ["Project", "ProjectError", "find_project", "load_project", "init_project", "InitReport", "check_name",
           "FILE_NAME"]
