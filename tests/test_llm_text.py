"""R lazy-load reader (Austen's novels come as an R database in Debian's r-cran-janeaustenr):
hand-built XDR serializations, the exact bytes R writes, with the lazy-load framing."""
from __future__ import annotations

import gzip
import struct
import zlib

import pytest

from edgepack.llm.rdata import RDataError, character_vector, read_lazyload, unserialize


def _i(*v):
    return b"".join(struct.pack(">i", x) for x in v)


def _chars(s: str | None) -> bytes:
    if s is None:
        return _i(9, -1)
    b = s.encode()
    return _i(9 | (1 << 15), len(b)) + b   # CHARSXP, UTF-8 flag (R's gp bit 3 << 12)


def _strsxp(strings) -> bytes:
    return _i(16, len(strings)) + b"".join(_chars(s) for s in strings)


def _header(version=3) -> bytes:
    h = b"X\n" + _i(version, 0x040300, 0x030500)
    return h + (_i(5) + b"UTF-8" if version == 3 else b"")


def _named_list(items: dict[str, bytes]) -> bytes:
    """VECSXP with a names attribute (attribute flag 1<<9), the name symbol serialized once."""
    body = _i(19 | (1 << 9), len(items)) + b"".join(items.values())
    # attribute pairlist: LISTSXP with tag; tag = SYMSXP "names"; car = STRSXP; cdr = NILVALUE
    attr = _i(2 | (1 << 10), 1) + _chars("names") + _strsxp(list(items)) + _i(254)
    return body + attr


def _rdb(objects: dict[str, bytes], tmp_path, gzip_index=True):
    data, offsets = b"", {}
    for name, ser in objects.items():
        rec = struct.pack(">I", len(ser)) + zlib.compress(ser)
        offsets[name] = (len(data), len(rec))
        data += rec
    variables = _named_list({n: _i(13, 2, *o) for n, o in offsets.items()})
    raw = _header() + _named_list({"variables": variables, "references": _i(19, 0), "compressed": _i(10, 1, 1)})
    (tmp_path / "Rdata.rdb").write_bytes(data)
    (tmp_path / "Rdata.rdx").write_bytes(gzip.compress(raw) if gzip_index else struct.pack(">I", len(raw)) + zlib.compress(raw))
    return tmp_path / "Rdata.rdb"


def test_character_vector_with_na_and_utf8():
    obj = unserialize(_header() + _strsxp(["EMMA", "", None, "Mr. Knightley’s"]))
    assert character_vector(obj) == ["EMMA", "", "", "Mr. Knightley’s"]


@pytest.mark.parametrize("gzip_index", [True, False])
def test_lazyload_database_roundtrip(tmp_path, gzip_index):
    novels = {"emma": ["EMMA", "By Jane Austen"], "persuasion": ["Persuasion", "", "by", "Jane Austen"]}
    rdb = _rdb({k: _header() + _strsxp(v) for k, v in novels.items()}, tmp_path, gzip_index)
    got = {k: character_vector(v) for k, v in read_lazyload(rdb).items()}
    assert got == novels


def test_references_to_symbols_resolve():
    # two attributes whose second tag is a REFSXP to the first symbol (index packed above the type byte)
    body = _i(16 | (1 << 9), 1) + _chars("x")
    attr = (_i(2 | (1 << 10), 1) + _chars("names") + _strsxp(["a"])
            + _i(2 | (1 << 10)) + _i(255 | (1 << 8)) + _strsxp(["b"]) + _i(254))
    obj = unserialize(_header(2) + body + attr)
    assert character_vector(obj.attributes["names"]) == ["b"]   # the same tag twice: last wins


@pytest.mark.parametrize("blob", [b"", b"A\n", _header() + _i(16, 5) + _chars("only one"),
                                  _header() + _i(200), _header() + _i(255 | (7 << 8))])
def test_hostile_serializations_raise_named_error(blob):
    with pytest.raises(RDataError):
        unserialize(blob)


def test_missing_index_is_a_named_error(tmp_path):
    (tmp_path / "Rdata.rdb").write_bytes(b"")
    with pytest.raises(RDataError, match="rdx"):
        read_lazyload(tmp_path / "Rdata.rdb")
