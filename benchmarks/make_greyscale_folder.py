"""Export a real greyscale image set, shipped inside a PyPI wheel, as an ImageFolder for ``folder:``.

    python benchmarks/make_greyscale_folder.py OUT [--val-fraction 0.2] [--seed 0]

The set is scikit-learn's bundled handwritten digits (``sklearn.datasets.load_digits``: 1797
scans of digits written by 43 people, NIST preprocessing, 8 x 8 pixels of 17 grey levels, 10
classes; the copy of the UCI "Optical Recognition of Handwritten Digits" test set that ships in
the wheel, so nothing is downloaded). Needs ``pip install scikit-learn``; mimkit and its tests do
not. Each image is written as an 8-bit greyscale PNG at its own size (levels 0..16 scaled to
0..255), ``OUT/train/<digit>/<index>.png`` and ``OUT/val/<digit>/<index>.png``, with a seeded
split stratified by class, and ``OUT/.source.json`` (hidden, so ``folder:`` skips it) records where
the images came from. Then, e.g.::

    python tools/benchmark.py quality recipes/demo/mae_vit_tiny.yaml data.source=folder:OUT \\
        method.backbone.img_size=32 method.backbone.patch_size=4 data.channels=1 data.mean=auto data.std=auto
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np
from PIL import Image


def export_folder(
    images: np.ndarray,
    labels: np.ndarray,
    class_names: list[str],
    out: Path,
    val_fraction: float = 0.2,
    seed: int = 0,
) -> dict[str, int]:
    """Write uint8 greyscale ``images`` (N, H, W) as PNGs in ImageFolder layout; images per split.

    Within every class, a permutation seeded by ``seed`` sends the first ``ceil(val_fraction * n)``
    images to ``val`` and the rest to ``train``; file names are the images' indices in ``images``.
    """
    if images.dtype != np.uint8 or images.ndim != 3:
        raise ValueError(f"images must be uint8 (N, H, W), got {images.dtype} {images.shape}")
    if not 0 < val_fraction < 1:
        raise ValueError(f"--val-fraction={val_fraction} must be between 0 and 1")
    if out.exists() and any(out.iterdir()):
        raise ValueError(f"{out} exists and is not empty; give a new folder")
    rng = np.random.default_rng(seed)
    counts = {"train": 0, "val": 0}
    for label, name in enumerate(class_names):
        members = np.flatnonzero(labels == label)
        members = members[rng.permutation(len(members))]
        n_val = math.ceil(val_fraction * len(members))
        for rank, index in enumerate(members):
            split = "val" if rank < n_val else "train"
            folder = out / split / name
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(images[index], mode="L").save(folder / f"{index:05d}.png")
            counts[split] += 1
    return counts


def load_digits_uint8() -> tuple[np.ndarray, np.ndarray, list[str]]:
    """scikit-learn's bundled digits as uint8 (1797, 8, 8), labels and class names."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise SystemExit("this script needs scikit-learn (pip install scikit-learn); nothing else") from None
    digits = load_digits()
    images = np.rint(digits.images * (255.0 / 16.0)).astype(np.uint8)
    return images, digits.target.astype(np.int64), [str(c) for c in digits.target_names]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="the folder to create (must be new or empty)")
    parser.add_argument("--val-fraction", type=float, default=0.2, help="share of each class in val (0.2)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the split (0)")
    args = parser.parse_args(argv)
    images, labels, names = load_digits_uint8()
    try:
        counts = export_folder(images, labels, names, args.out, args.val_fraction, args.seed)
    except ValueError as err:
        print(f"make_greyscale_folder: {err}", file=sys.stderr)
        return 2
    import sklearn

    info = {
        "set": "sklearn.datasets.load_digits (UCI optical recognition of handwritten digits, test set copy)",
        "scikit_learn": sklearn.__version__,
        "images": int(len(images)),
        "size": list(images.shape[1:]),
        "levels": "0..16 scaled to 0..255 (rounded)",
        "classes": names,
        "val_fraction": args.val_fraction,
        "seed": args.seed,
        "counts": counts,
    }
    (args.out / ".source.json").write_text(json.dumps(info, indent=1) + "\n")
    print(f"{args.out}: {counts['train']} train / {counts['val']} val greyscale PNGs, {len(names)} classes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
