"""Calibration and evaluation data: folders of images, .npy/.npz arrays, or a Python hook.

Preprocessing is *declared*, never guessed: by ``--preprocess`` (a short spec such as
``size=224,resize=256,mean=127,std=128,layout=nchw,color=rgb``), by the model's own
``edgepack.preprocess`` metadata (our export scripts write it), or by a hook
``path/to/file.py:function`` that maps a file path to an array. Arrays (.npy/.npz) are taken as
already preprocessed.
"""
from __future__ import annotations

import csv
import importlib.util
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from .errors import DataError

Sample = "np.ndarray | dict[str, np.ndarray]"
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".ppm", ".pgm", ".tif", ".tiff"}


@dataclass(frozen=True)
class ImagePreprocess:
    """How an image file becomes the model's input tensor (one sample, no batch axis)."""

    size: int = 224
    resize: int | None = None  # shorter side before the centre crop; None: resize straight to size
    mean: tuple[float, float, float] = (0.0, 0.0, 0.0)
    std: tuple[float, float, float] = (1.0, 1.0, 1.0)
    layout: str = "nchw"
    color: str = "rgb"

    @classmethod
    def parse(cls, spec: str) -> "ImagePreprocess":
        kw: dict = {}
        for part in filter(None, (p.strip() for p in spec.split(","))):
            if "=" not in part:
                raise DataError(f"preprocess spec: {part!r} is not key=value (e.g. size=224,mean=127,std=128)")
            k, v = (s.strip() for s in part.split("=", 1))
            try:
                if k in ("size", "resize"):
                    kw[k] = int(v)
                elif k in ("mean", "std"):
                    vals = tuple(float(x) for x in v.split("/"))
                    kw[k] = vals * 3 if len(vals) == 1 else vals
                elif k in ("layout", "color"):
                    kw[k] = v.lower()
                else:
                    raise DataError(f"preprocess spec: unknown key {k!r} (size, resize, mean, std, layout, color)")
            except ValueError:
                raise DataError(f"preprocess spec: bad value for {k}: {v!r}") from None
        p = cls(**kw)
        if p.layout not in ("nchw", "nhwc") or p.color not in ("rgb", "bgr", "gray"):
            raise DataError(f"preprocess spec: layout must be nchw|nhwc and color rgb|bgr|gray, got {spec!r}")
        if len(p.mean) != 3 or len(p.std) != 3 or any(s == 0 for s in p.std):
            raise DataError(f"preprocess spec: mean and std take 1 or 3 values, std non-zero: {spec!r}")
        return p

    def spec(self) -> str:
        d = asdict(self)
        return ",".join(f"{k}={'/'.join(f'{x:g}' for x in v) if isinstance(v, tuple) else v}"
                        for k, v in d.items() if v is not None)

    def __call__(self, path: Path) -> np.ndarray:
        from PIL import Image

        try:
            img = Image.open(path)
            img = img.convert("L" if self.color == "gray" else "RGB")
        except Exception as e:  # PIL raises many types for a bad file
            raise DataError(f"{path}: not a readable image ({e.__class__.__name__})") from None
        if self.resize:
            w, h = img.size
            s = self.resize / min(w, h)
            img = img.resize((max(self.size, round(w * s)), max(self.size, round(h * s))), Image.BILINEAR)
            w, h = img.size
            left, top = (w - self.size) // 2, (h - self.size) // 2
            img = img.crop((left, top, left + self.size, top + self.size))
        else:
            img = img.resize((self.size, self.size), Image.BILINEAR)
        x = np.asarray(img, dtype=np.float32)
        if x.ndim == 2:
            x = x[..., None]
        if self.color == "bgr":
            x = x[..., ::-1]
        c = x.shape[-1]
        x = (x - np.asarray(self.mean[:c], np.float32)) / np.asarray(self.std[:c], np.float32)
        return np.ascontiguousarray(x.transpose(2, 0, 1) if self.layout == "nchw" else x)


@dataclass
class Dataset:
    """Samples (preprocessed lazily for image folders) and optional integer labels."""

    name: str
    loader: Callable[[int], "np.ndarray | dict[str, np.ndarray]"]
    size: int
    labels: np.ndarray | None = None
    in_memory: bool = False      # arrays (.npy/.npz): every sample is cheap to check before any work

    def __len__(self) -> int:
        return self.size

    def batches(self, batch_size: int, indices: np.ndarray | None = None) -> Iterator[tuple[np.ndarray, Sample]]:
        """Stacked samples: an array, or a dict of arrays for multi-input models."""
        idx = np.arange(self.size) if indices is None else np.asarray(indices)
        for s in range(0, len(idx), batch_size):
            chunk = idx[s:s + batch_size]
            items = [self.loader(int(i)) for i in chunk]
            if isinstance(items[0], dict):
                yield chunk, {k: np.stack([it[k] for it in items]) for k in items[0]}
            else:
                yield chunk, np.stack(items)

    def feeds(self, batch_size: int, input_names: list[str],
              indices: np.ndarray | None = None) -> Iterator[tuple[np.ndarray, dict[str, np.ndarray]]]:
        """Batches as ONNX Runtime feed dicts for a model with these inputs."""
        for chunk, x in self.batches(batch_size, indices):
            yield chunk, as_feed(x, input_names)

    def subset(self, indices: np.ndarray, name: str | None = None) -> "Dataset":
        indices = np.asarray(indices, dtype=np.int64)
        base = self.loader
        return Dataset(name or self.name, lambda i: base(int(indices[i])), len(indices),
                       None if self.labels is None else self.labels[indices], self.in_memory)


PreprocessFn = Callable[[Path], np.ndarray]


def as_feed(x: "Sample", input_names: list[str]) -> dict[str, np.ndarray]:
    """An array (single-input model) or dict of arrays as a feed; floats become float32."""
    d = x if isinstance(x, dict) else {input_names[0]: x}
    return {k: (v.astype(np.float32, copy=False) if v.dtype.kind == "f" else v) for k, v in d.items()}


def load_hook(spec: str) -> PreprocessFn:
    """``file.py:function`` or ``module:function``: a callable mapping an image path to an array."""
    if ":" not in spec:
        raise DataError(f"preprocess hook {spec!r}: expected FILE.py:FUNCTION or MODULE:FUNCTION")
    mod_name, fn_name = spec.rsplit(":", 1)
    try:
        if mod_name.endswith(".py"):
            sp = importlib.util.spec_from_file_location("edgepack_user_hook", mod_name)
            if sp is None or sp.loader is None:
                raise DataError(f"preprocess hook: cannot load {mod_name}")
            mod = importlib.util.module_from_spec(sp)
            sp.loader.exec_module(mod)
        else:
            mod = importlib.import_module(mod_name)
        fn = getattr(mod, fn_name)
    except (OSError, ImportError, AttributeError) as e:
        raise DataError(f"preprocess hook {spec!r}: {e}") from None
    if not callable(fn):
        raise DataError(f"preprocess hook {spec!r} is not callable")
    return fn


def load_dataset(path: str | Path, preprocess: PreprocessFn | None = None,
                 labels_file: str | Path | None = None, limit: int | None = None) -> Dataset:
    """Open a data source.

    - a directory of images, labels from class subfolders (sorted names -> 0..K-1, or numeric
      folder names taken as the class index) or from ``labels.csv`` (``file,label``) beside them;
    - a ``.npy`` file (inputs only) or ``.npz`` with ``inputs``/``x``/``images`` and optional
      ``labels``/``y`` arrays (taken as already preprocessed).
    """
    p = Path(path)
    if not p.exists():
        raise DataError(f"data {p}: no such file or directory")
    if p.is_file() and p.suffix in (".npy", ".npz"):
        ds = _load_arrays(p)
    elif p.is_dir():
        ds = _load_image_dir(p, preprocess, labels_file)
    else:
        raise DataError(f"data {p}: expected a folder of images, .npy or .npz")
    if labels_file and p.is_file():
        ds.labels = _read_labels_file(Path(labels_file), None)
        if len(ds.labels) != len(ds):
            raise DataError(f"{labels_file}: {len(ds.labels)} labels for {len(ds)} samples")
    if len(ds) == 0:
        raise DataError(f"data {p}: contains no samples")
    if limit is not None and limit < len(ds):
        ds = ds.subset(np.arange(limit))
    return ds


def _load_arrays(p: Path) -> Dataset:
    try:
        if p.suffix == ".npy":
            x, y = np.load(p, mmap_mode="r", allow_pickle=False), None
        else:
            z = np.load(p, allow_pickle=False)
            ykey = next((k for k in ("labels", "y", "label") if k in z.files), None)
            y = None if ykey is None else np.asarray(z[ykey]).astype(np.int64).reshape(-1)
            key = next((k for k in ("inputs", "x", "images", "input") if k in z.files), None)
            others = [k for k in z.files if k != ykey]
            if key is None and len(others) == 1:
                key = others[0]
            if key is None and len(others) > 1:
                # several named arrays: one per model input (e.g. input_ids, attention_mask)
                arrs = {k: z[k] for k in others}
                n = {len(a) for a in arrs.values()}
                if len(n) != 1:
                    raise DataError(f"{p}: input arrays have different sample counts {sorted(n)}")
                if y is not None and len(y) != n.pop():
                    raise DataError(f"{p}: {len(y)} labels for {len(next(iter(arrs.values())))} samples")
                size = len(next(iter(arrs.values())))
                return Dataset(p.name, lambda i: {k: np.asarray(a[i]) for k, a in arrs.items()}, size, y, True)
            if key is None:
                raise DataError(f"{p}: no inputs array (name it 'inputs' or 'x'); found {z.files}")
            x = z[key]
    except (ValueError, OSError) as e:
        raise DataError(f"{p}: not a readable numpy file ({e})") from None
    if x.ndim == 0:
        raise DataError(f"{p}: inputs must have a sample axis, got a scalar")
    if y is not None and len(y) != len(x):
        raise DataError(f"{p}: {len(y)} labels for {len(x)} samples")
    return Dataset(p.name, lambda i: np.asarray(x[i]), len(x), y, True)


def _read_labels_file(f: Path, names: list[str] | None) -> np.ndarray:
    try:
        with open(f, newline="") as fh:
            rows = [r for r in csv.reader(fh) if r]
    except OSError as e:
        raise DataError(f"labels file {f}: {e.strerror}") from None
    if rows and not rows[0][-1].lstrip("-").isdigit():
        rows = rows[1:]  # header
    try:
        if names is None or len(rows[0]) == 1:
            return np.asarray([int(r[-1]) for r in rows], np.int64)
        table = {r[0]: int(r[1]) for r in rows}
    except (ValueError, IndexError):
        raise DataError(f"labels file {f}: expected rows 'file,label' with integer labels") from None
    missing = [n for n in names if n not in table]
    if missing:
        raise DataError(f"labels file {f}: no label for {len(missing)} image(s), e.g. {missing[0]}")
    return np.asarray([table[n] for n in names], np.int64)


def _has_images(p: Path) -> bool:
    """Images in ``p`` or in its class subfolders (one level down, as the loader reads them)."""
    for f in p.iterdir():
        if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES:
            return True
        if f.is_dir() and any(g.is_file() and g.suffix.lower() in IMAGE_SUFFIXES for g in f.iterdir()):
            return True
    return False


def _load_image_dir(p: Path, preprocess: PreprocessFn | None, labels_file) -> Dataset:
    if not _has_images(p):
        raise DataError(f"data {p}: contains no samples: the folder holds no images ({', '.join(sorted(IMAGE_SUFFIXES))}) nor class "
                        "subfolders of them; point at the folder with the images, or give a .npy/.npz file")
    if preprocess is None:
        raise DataError(f"data {p} holds images but no preprocessing is declared: pass --preprocess "
                        "'size=224,mean=127,std=128,...' or --preprocess-hook FILE.py:FUNC")
    files = sorted(f for f in p.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
    labels = None
    if files:
        lf = Path(labels_file) if labels_file else (p / "labels.csv" if (p / "labels.csv").exists() else None)
        if lf is not None:
            labels = _read_labels_file(lf, [f.name for f in files])
    else:
        classes = sorted(d for d in p.iterdir() if d.is_dir())
        numeric = all(d.name.isdigit() for d in classes)
        lab = []
        for k, d in enumerate(classes):
            fs = sorted(f for f in d.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
            files += fs
            lab += [int(d.name) if numeric else k] * len(fs)
        labels = np.asarray(lab, np.int64) if classes else None
    return Dataset(p.name, lambda i: preprocess(files[i]), len(files), labels)
