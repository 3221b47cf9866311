"""Read R's lazy-load databases (``Rdata.rdb`` / ``.rdx``) and ``.rds`` files without R.

Debian's ``r-cran-janeaustenr`` ships Jane Austen's novels as an R lazy-load database. Installing
the package pulls R; this reader unpacks only what the text needs: R's XDR serialization format
(version 2 and 3) for the common object types (vectors, strings, pairlists, environments,
compact ALTREP sequences). It reads data, never evaluates it: closures and promises are parsed
into inert tuples. Anything it does not know raises :class:`RDataError` naming the type.
"""
from __future__ import annotations

import bz2
import gzip
import lzma
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import DataError


class RDataError(DataError):
    """The file is not an R serialization this reader understands."""


@dataclass
class RObject:
    """An R value: ``value`` (list/str/numbers/None) and its attributes (names, class, ...)."""

    type: int
    value: object
    attributes: dict = field(default_factory=dict)


_NIL, _EMPTYENV, _BASEENV, _GLOBALENV, _UNBOUND, _MISSING, _BASENS = 254, 242, 241, 253, 252, 251, 247
_REF, _PERSIST, _PACKAGE, _NAMESPACE, _ALTREP, _ATTRLIST, _ATTRLANG = 255, 248, 250, 249, 238, 239, 240
_SPECIAL_CONST = {_NIL: None, _EMPTYENV: "<emptyenv>", _BASEENV: "<baseenv>", _GLOBALENV: "<globalenv>",
                  _UNBOUND: "<unbound>", _MISSING: "<missing>", _BASENS: "<basenamespace>"}


class _Reader:
    def __init__(self, data: bytes):
        self.b, self.i, self.refs = data, 0, []

    def _take(self, n: int) -> bytes:
        if self.i + n > len(self.b):
            raise RDataError("R serialization is truncated")
        s = self.b[self.i:self.i + n]
        self.i += n
        return s

    def int(self) -> int:
        return struct.unpack(">i", self._take(4))[0]

    def length(self) -> int:
        n = self.int()
        if n == -1:
            hi, lo = self.int(), self.int()
            n = (hi << 32) + (lo & 0xFFFFFFFF)
        if n < 0 or n > len(self.b) * 8:
            raise RDataError(f"R serialization has an impossible length {n}")
        return n

    def header(self) -> None:
        fmt = self._take(2)
        if fmt != b"X\n":
            raise RDataError(f"only XDR R serialization is supported (format {fmt!r})")
        version = self.int()
        self.int(), self.int()
        if version == 3:
            self._take(self.length())  # native encoding name
        elif version != 2:
            raise RDataError(f"R serialization version {version} is not supported")

    def _attrs(self, has_attr: bool) -> dict:
        if not has_attr:
            return {}
        a = self.item()
        out = {}
        while isinstance(a, RObject) and a.type in (2, _ATTRLIST):
            tag, car, cdr = a.value
            out[tag if isinstance(tag, str) else str(tag)] = car
            a = cdr
        return out

    def item(self):  # noqa: C901 - one branch per R type, as in R's own serialize.c
        flags = self.int()
        t, levels = flags & 0xFF, flags >> 12
        has_attr, has_tag = bool(flags & (1 << 9)), bool(flags & (1 << 10))
        if t in _SPECIAL_CONST:
            return _SPECIAL_CONST[t]
        if t == _REF:
            idx = (flags >> 8) or self.int()  # R packs the index above the type byte
            if not 0 < idx <= len(self.refs):
                raise RDataError(f"R serialization refers to unknown object {idx}")
            return self.refs[idx - 1]
        if t == 1:  # SYMSXP
            name = self.item()
            self.refs.append(name)
            return name
        if t in (_PERSIST, _PACKAGE, _NAMESPACE):
            if self.int() != 0:
                raise RDataError("R persistent name has an unexpected flag")
            v = RObject(t, [self.item() for _ in range(self.int())])
            self.refs.append(v)
            return v
        if t == 4:  # ENVSXP
            env = RObject(4, None)
            self.refs.append(env)
            self.int()  # locked
            enclos, frame, hashtab, attrib = self.item(), self.item(), self.item(), self.item()
            env.value = {"enclos": enclos, "frame": frame, "hashtab": hashtab}
            env.attributes = {"attributes": attrib}
            return env
        if t in (2, 3, 5, 6, 17, _ATTRLIST, _ATTRLANG):  # pairlists, closures, promises, calls
            attrs = self._attrs(has_attr)
            tag = self.item() if has_tag else None
            car = self.item()
            cdr = self.item()
            return RObject(t, (tag, car, cdr), attrs)
        if t == 9:  # CHARSXP
            n = self.int()
            if n == -1:
                return None  # NA_character_
            raw = self._take(n)
            enc = "latin-1" if levels & (1 << 2) else "utf-8"
            return raw.decode(enc, errors="replace")
        if t in (10, 13):  # logical, integer
            n = self.length()
            v = list(struct.unpack(f">{n}i", self._take(4 * n)))
        elif t == 14:
            n = self.length()
            v = list(struct.unpack(f">{n}d", self._take(8 * n)))
        elif t == 15:
            n = self.length()
            d = struct.unpack(f">{2 * n}d", self._take(16 * n))
            v = [complex(d[2 * k], d[2 * k + 1]) for k in range(n)]
        elif t == 16:  # STRSXP
            v = [self.item() for _ in range(self.length())]
        elif t in (19, 20):  # list, expression
            v = [self.item() for _ in range(self.length())]
        elif t == 24:
            v = self._take(self.length())
        elif t == _ALTREP:
            info, state, attr = self.item(), self.item(), self.item()
            return _altrep(info, state, attr)
        elif t in (25, 21, 22, 23):  # S4, bytecode, extptr, weakref: not data we read
            raise RDataError(f"R object type {t} (S4/bytecode/pointer) is not supported")
        else:
            raise RDataError(f"unknown R object type {t}")
        return RObject(t, v, self._attrs(has_attr))


def _altrep(info, state, attr) -> RObject:
    cls = info.value[1] if isinstance(info, RObject) else None
    name = cls if isinstance(cls, str) else ""
    if name in ("compact_intseq", "compact_realseq"):
        n, start, step = state.value
        vals = [start + k * step for k in range(int(n))]
        return RObject(13 if name == "compact_intseq" else 14,
                       [int(x) for x in vals] if name == "compact_intseq" else vals)
    if name.startswith("wrap_"):
        inner = state.value[0]
        return inner
    if name == "deferred_string":
        arg = state.value[1] if isinstance(state, RObject) else state
        arg = arg.value if isinstance(arg, RObject) else arg
        return RObject(16, [str(x) for x in arg])
    raise RDataError(f"R ALTREP class {name!r} is not supported")


def unserialize(data: bytes):
    r = _Reader(data)
    r.header()
    return r.item()


def _decompress(blob: bytes) -> bytes:
    """A lazy-load DB record: 4-byte big-endian length, then zlib (or a type byte + bzip2/xz)."""
    if len(blob) < 5:
        raise RDataError("R lazy-load record is too short")
    n = struct.unpack(">I", blob[:4])[0]
    kind = blob[4:5]
    if kind == b"2":
        out = bz2.decompress(blob[5:])
    elif kind == b"X":
        out = lzma.decompress(blob[5:])
    elif kind == b"0":
        out = blob[5:]
    else:
        out = zlib.decompress(blob[4:])
    if len(out) != n:
        raise RDataError(f"R lazy-load record decompressed to {len(out)} bytes, not {n}")
    return out


def _names(obj: RObject) -> list:
    names = obj.attributes.get("names")
    return list(names.value) if isinstance(names, RObject) else []


def read_lazyload(rdb: str | Path) -> dict:
    """All objects of an R lazy-load database (``X.rdb`` with its ``X.rdx``), by name."""
    rdb = Path(rdb)
    rdx = rdb.with_suffix(".rdx")
    if not rdb.is_file() or not rdx.is_file():
        raise RDataError(f"{rdb} and {rdx.name} are both needed")
    raw = rdx.read_bytes()
    # R writes the index as 4-byte length + zlib; some builds (Debian's) leave it gzip'd
    index = unserialize(gzip.decompress(raw) if raw[:2] == b"\x1f\x8b" else _decompress(raw))
    parts = dict(zip(_names(index), index.value))
    variables = parts.get("variables")
    if not isinstance(variables, RObject):
        raise RDataError(f"{rdx} has no 'variables' index")
    data = rdb.read_bytes()
    out = {}
    for name, pos in zip(_names(variables), variables.value):
        off, ln = (int(x) for x in pos.value)
        out[name] = unserialize(_decompress(data[off:off + ln]))
    return out


def character_vector(obj) -> list[str]:
    """The strings of an R character vector (NA becomes an empty line)."""
    if not isinstance(obj, RObject) or obj.type != 16:
        raise RDataError("expected an R character vector")
    return [s if s is not None else "" for s in obj.value]
