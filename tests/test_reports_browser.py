"""Both HTML reports from a real demo (scripts/report_screenshots.py: a project pushed twice to three
local boards, one rolled back at push time by its latency budget, and an SSH board never reached;
`edgepack analyze` for an INT8-only NPU), laid out by headless Chromium: the elements a reader needs
are there, no two text labels of a chart overlap, the unreached board is shown, board strings are
escaped, a partial rollout is not green."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
import report_screenshots as rs  # noqa: E402

pytestmark = pytest.mark.skipif(rs.chromium() is None, reason="Debian chromium is not installed (scripts/setup.sh "
                                                              "installs it): the reports are not laid out")


@pytest.fixture(scope="module")
def fleet_page(tmp_path_factory):
    return rs.demo_fleet(tmp_path_factory.mktemp("fleet"))


@pytest.fixture(scope="module")
def analyze_page(tmp_path_factory):
    return rs.demo_analysis(tmp_path_factory.mktemp("analyze"))


def test_fleet_report_in_chromium(fleet_page, tmp_path):
    m = rs.measure(fleet_page)
    dom = m["dom"]
    assert m["overlaps"] == [], m["overlaps"]
    assert {"overview", "latency", "drift", "flags", "flag-table", "rollouts", "timeline", "waves", "boards"} <= set(m["ids"])
    # the board never reached is in the header count, the table and its own drill-down
    assert "4 boards (1 never reached)" in dom and "board-cam-04-<field>" in m["ids"]
    assert "cam-04-&lt;field&gt;" in dom and "<field>" not in dom  # a board name is text, never markup
    assert dom.count("never reached") >= 2
    # 2 of 4 committed is partial (amber), never a green "complete"
    assert "partial: 2 of 4 committed" in dom and "complete:" not in dom
    # the rollback at push time counts as a regression; its message says what happened
    assert "rolled back at push" in dom and "release None" not in dom
    # budget lines on the latency chart, byte counts in units, drill-down per board
    lat = dom.split('id="latency"', 1)[1].split("</svg>", 1)[0]
    assert 'class="limit"' in lat and "latency budget" in lat
    assert " kB" in dom and dom.count("<details") == 4 and "last error" in dom
    png = rs.screenshot(fleet_page, tmp_path / "fleet.png")
    assert png.stat().st_size > 20_000


def test_analyze_report_in_chromium(analyze_page, tmp_path):
    m = rs.measure(analyze_page)
    dom = m["dom"]
    assert m["overlaps"] == [], m["overlaps"]
    assert {"budgets", "sensitivity", "layers", "tensor-sqnr", "outliers", "sweep", "placement"} <= set(m["ids"])
    assert "60 - SQNR" not in dom and "higher is better" in dom
    sq = dom.split('id="tensor-sqnr"', 1)[1].split("</svg>", 1)[0]
    assert "logits" in sq  # tensors by name, not by index
    assert "(log scale)" in dom.split('id="sweep"', 1)[1].split("</svg>", 1)[0]
    layers = dom.split('id="layers"', 1)[1].split("</table>", 1)[0]
    for needle in ("conv1", "Conv", "Gemm", "NPU int8", "output SQNR dB"):
        assert needle in layers
    assert "OTA bundle" in dom and "of 50 MB" in dom  # the board's budget as a bar against its limit
    assert str(analyze_page.parent) not in dom  # no absolute paths in the page
    assert 'id="fallback"' not in dom  # an empty table is left out
    png = rs.screenshot(analyze_page, tmp_path / "analyze.png")
    assert png.stat().st_size > 20_000
