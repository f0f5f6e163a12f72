"""Build assets/demo/fashion_mnist: a class-balanced Fashion-MNIST subset as PNG class folders.

Run once by a maintainer (needs Debian's `dataset-fashion-mnist`); the result is committed so the
app has real photos offline on any OS.
"""
import gzip
import shutil
import sys
from pathlib import Path

import numpy as np
from PIL import Image

SRC = Path("/usr/share/datasets/fashion-mnist")
CLASSES = ["t-shirt_top", "trouser", "pullover", "dress", "coat",
           "sandal", "shirt", "sneaker", "bag", "ankle_boot"]


def read_idx(path, offset):
    with gzip.open(path, "rb") as f:
        return np.frombuffer(f.read(), np.uint8, offset=offset)


def main(per_class=100, seed=0):
    out = Path(__file__).resolve().parents[1] / "assets" / "demo" / "fashion_mnist"
    shutil.rmtree(out, ignore_errors=True)
    images = read_idx(SRC / "t10k-images-idx3-ubyte.gz", 16).reshape(-1, 28, 28)
    labels = read_idx(SRC / "t10k-labels-idx1-ubyte.gz", 8)
    rng = np.random.default_rng(seed)
    for c, name in enumerate(CLASSES):
        (out / name).mkdir(parents=True)
        for i in sorted(rng.choice(np.flatnonzero(labels == c), per_class, replace=False)):
            Image.fromarray(images[i]).save(out / name / f"{i:05d}.png", optimize=True)
    shutil.copy("/usr/share/doc/dataset-fashion-mnist/copyright", out / "LICENSE")


if __name__ == "__main__":
    main(*map(int, sys.argv[1:]))
