#!/usr/bin/env python3
"""Screenshots of both HTML reports (docs/fleet-report.png, docs/analyze-report.png) in headless
Chromium, from a real demo: a project (`edgepack init`), a small CNN quantized and bundled twice,
pushed to a fleet of three local boards (one with a latency budget it cannot meet, so its install is
rolled back at push time) and one SSH board that is never reached; and `edgepack analyze` of the
same model for an INT8-only NPU target.

    .venv/bin/python scripts/report_screenshots.py [--out docs/]

The same functions check the pages in tests/test_reports_browser.py: ``measure(page)`` loads a copy
with a measuring script in Chromium and returns every chart's overlapping text labels.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

FLEET = """\
[fleet]
store = ".edgepack/fleet.db"
known_hosts = "known_hosts"

[[boards]]
name = "cam-01"
transport = "local"
target = "{target}"
groups = ["local", "canary"]
trial_in_process = true
env = {{ EDGEPACK_AGENT_INT8 = "exact" }}
state = ".edgepack/boards/cam-01/state"
incoming = ".edgepack/boards/cam-01/incoming"
latency_budget_ms = 0.5

[[boards]]
name = "cam-02"
transport = "local"
target = "{target}"
groups = ["local"]
trial_in_process = true
env = {{ EDGEPACK_AGENT_INT8 = "exact" }}
state = ".edgepack/boards/cam-02/state"
incoming = ".edgepack/boards/cam-02/incoming"
latency_budget_ms = 0.001   # a budget no board meets: its install is rolled back at push time

[[boards]]
name = "cam-03"
transport = "local"
target = "{target}"
groups = ["local"]
trial_in_process = true
env = {{ EDGEPACK_AGENT_INT8 = "exact" }}
state = ".edgepack/boards/cam-03/state"
incoming = ".edgepack/boards/cam-03/incoming"
latency_budget_ms = 0.5

[[boards]]
name = "cam-04-<field>"
host = "127.0.0.1"
port = {port}
user = "pi"
target = "{target}"
connect_timeout = 1
"""


def chromium() -> str | None:
    for c in ("chromium", "chromium-browser", "google-chrome"):
        if shutil.which(c):
            return shutil.which(c)
    return None


def ep(args: list[str], cwd: Path, ok: tuple[int, ...] = (0,)) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "EDGEPACK_EMULATED_BOARD": "0", "COLUMNS": "120"}
    env.pop("EDGEPACK_PROJECT", None)
    r = subprocess.run([sys.executable, "-m", "edgepack.cli", *args], cwd=cwd, env=env, capture_output=True, text=True,
                       timeout=600)
    if r.returncode not in ok:
        raise RuntimeError(f"edgepack {' '.join(args)} exited {r.returncode}:\n{r.stderr[-2000:]}")
    return r


def _model(folder: Path, name: str, seed: int, scale: float = 1.0) -> None:
    import numpy as np
    import onnx
    from onnx import numpy_helper
    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import small_cnn
    p = small_cnn(folder / name, seed=seed)
    if scale != 1.0:
        m = onnx.load(str(p))
        for t in m.graph.initializer:
            if t.name == "wf":
                t.CopyFrom(numpy_helper.from_array((numpy_helper.to_array(t) * scale).astype(np.float32), "wf"))
        onnx.save(m, str(p))


def _data(folder: Path) -> None:
    import numpy as np
    import onnxruntime as ort
    x = np.random.default_rng(3).normal(0, 1, (96, 1, 8, 8)).astype(np.float32)
    y = ort.InferenceSession(str(folder / "model.onnx")).run(None, {"x": x})[0].argmax(1)
    np.savez(folder / "calib.npz", inputs=x[:48])
    np.savez(folder / "eval.npz", inputs=x[48:], labels=y[48:])


def demo_fleet(work: Path, target: str = "x86-vnni") -> Path:
    """A project pushed twice to four boards; returns out/fleet.html."""
    import socket
    work.mkdir(parents=True, exist_ok=True)
    ep(["init", "demo", "-t", target], work)
    proj = work / "demo"
    with socket.socket() as s:  # a port nothing listens on: the SSH board is never reached
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    (proj / "fleet.toml").write_text(FLEET.format(target=target, port=port))
    (proj / "known_hosts").write_text("")
    _model(proj, "model.onnx", 0)
    _data(proj)
    ep(["quantize", "model.onnx", "--calib", "calib.npz", "--eval", "eval.npz", "--threads", "1"], proj, ok=(0, 4))
    ep(["bundle", "out/model-int8.onnx", "--release", "1"], proj)
    ep(["fleet", "bootstrap", "-g", "local"], proj)
    ep(["push", "out/demo-r1.bundle", "--canary", "1", "--wave-size", "2", "--max-failures", "2"], proj,
       ok=(0, 21, 24))
    _model(proj, "model-v2.onnx", 0, scale=1.02)
    ep(["quantize", "model-v2.onnx", "--calib", "calib.npz", "--eval", "eval.npz", "--threads", "1"], proj, ok=(0, 4))
    ep(["bundle", "out/model-v2-int8.onnx", "--release", "2"], proj)
    ep(["delta", "out/demo-r1.bundle", "out/demo-r2.bundle", "-o", "out/demo-r1-r2.bundle"], proj)
    ep(["push", "out/demo-r2.bundle", "--canary", "1", "--wave-size", "2", "--max-failures", "2"], proj,
       ok=(0, 21, 24))
    ep(["report"], proj)
    return proj / "out" / "fleet.html"


def demo_analysis(work: Path, target: str = "phone-npu-int8") -> Path:
    work.mkdir(parents=True, exist_ok=True)
    _model(work, "model.onnx", 0)
    _data(work)
    ep(["analyze", "model.onnx", "-t", target, "--calib", "calib.npz", "--eval", "eval.npz", "-o", "analyze.html"],
       work)
    return work / "analyze.html"


MEASURE = """
<script>
(function(){
  function ov(a,b){return !(a.x+a.width<=b.x+0.5||b.x+b.width<=a.x+0.5||a.y+a.height<=b.y+0.5||b.y+b.height<=a.y+0.5);}
  var out={charts:[],overlaps:[]};
  document.querySelectorAll('svg').forEach(function(svg){
    var id=svg.id||svg.getAttribute('aria-label');
    var ts=[].slice.call(svg.querySelectorAll('text')).map(function(t){var r=t.getBoundingClientRect();
      return {t:t.textContent,x:r.x,y:r.y,width:r.width,height:r.height};}).filter(function(r){return r.width>0;});
    out.charts.push({id:id,texts:ts.length});
    for(var i=0;i<ts.length;i++)for(var j=i+1;j<ts.length;j++)if(ov(ts[i],ts[j]))
      out.overlaps.push({chart:id,a:ts[i].t,b:ts[j].t});
  });
  out.ids=[].slice.call(document.querySelectorAll('[id]')).map(function(e){return e.id;});
  var pre=document.createElement('pre');pre.id='edgepack-measure';pre.textContent=JSON.stringify(out);
  document.body.appendChild(pre);
})();
</script>
"""


def _base(profile: Path) -> list[str]:
    c = chromium()
    if c is None:
        raise RuntimeError("headless Chromium is not installed (apt-get install -y chromium; scripts/setup.sh does it)")
    return [c, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", f"--user-data-dir={profile}",
            "--host-resolver-rules=MAP * ~NOTFOUND", "--virtual-time-budget=3000", "--hide-scrollbars"]


def measure(page: Path) -> dict:
    """Chromium's layout of the page: every chart's text labels that overlap another, and the ids
    present. The page itself has no script: a copy with the measuring script is loaded."""
    with tempfile.TemporaryDirectory(prefix="edgepack-measure-") as td:
        probe = Path(td) / "probe.html"
        probe.write_text(page.read_text().replace("</body>", MEASURE + "</body>"))
        r = subprocess.run([*_base(Path(td) / "profile"), "--window-size=1100,1400", "--dump-dom", probe.as_uri()],
                           capture_output=True, text=True, timeout=180)
        m = re.search(r'<pre id="edgepack-measure">(.*?)</pre>', r.stdout, re.S)
        if r.returncode != 0 or not m:
            raise RuntimeError(f"chromium did not render {page}: {r.stderr[-800:]}")
        import html
        return {**json.loads(html.unescape(m.group(1))), "dom": r.stdout}


def screenshot(page: Path, png: Path, width: int = 1100, height: int = 2400) -> Path:
    with tempfile.TemporaryDirectory(prefix="edgepack-shot-") as td:
        r = subprocess.run([*_base(Path(td) / "profile"), f"--window-size={width},{height}", f"--screenshot={png}",
                            page.as_uri()], capture_output=True, text=True, timeout=180)
        if r.returncode != 0 or not png.is_file():
            raise RuntimeError(f"chromium screenshot of {page} failed: {r.stderr[-800:]}")
    return png


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=ROOT / "docs")
    a = ap.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="edgepack-screens-") as td:
        fleet = demo_fleet(Path(td) / "f")
        analysis = demo_analysis(Path(td) / "a")
        for page, name in ((fleet, "fleet-report.png"), (analysis, "analyze-report.png")):
            m = measure(page)
            screenshot(page, a.out / name)
            print(f"{a.out / name}: {len(m['charts'])} charts, {len(m['overlaps'])} overlapping labels")
    return 0


if __name__ == "__main__":
    sys.exit(main())
