"""Training and evaluation transforms (torchvision.transforms.v2), augmentation options and their previews."""
from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch
from torchvision.transforms import v2

from core.data import folders
from core.data import images as imaging

# ---------------------------------------------------------------- datasets and transforms

AUGMENTATIONS = {
    "hflip": "Horizontal flip",
    "vflip": "Vertical flip",
    "rotation": "Rotation (± degrees)",
    "affine": "Random affine (translate fraction)",
    "random_resized_crop": "Random resized crop (min scale)",
    "color_jitter": "Colour jitter (strength)",
    "hue": "Hue jitter (0-0.5)",
    "grayscale": "Grayscale (probability)",
    "invert": "Invert (probability)",
    "blur": "Gaussian blur (kernel px)",
    "auto": "RandAugment / TrivialAugment",
}
AUGMENT_RANGES = {   # augmentation -> (min, max, default) of its strength, as the Train page offers it
    "rotation": (1.0, 180.0, 30.0), "affine": (0.02, 0.4, 0.1),
    "random_resized_crop": (0.05, 0.95, 0.5), "color_jitter": (0.05, 0.9, 0.2),
    "hue": (0.01, 0.5, 0.1), "grayscale": (0.05, 1.0, 0.2), "invert": (0.05, 1.0, 0.2),
    "blur": (3.0, 15.0, 5.0)}
AUTO_AUGMENTS = ("trivialaugment", "randaugment")

# Named sets of augmentations: the presets sweeps vary and the seed reports used.
PRESETS = {
    "none": {},
    "flips": {"hflip": True},
    "flips + colour jitter": {"hflip": True, "color_jitter": 0.3},   # report 004's colour ablation
    "light": {"hflip": True, "random_resized_crop": 0.8},
    "report 003": {"rotation": 30.0, "random_resized_crop": 0.5, "hflip": True, "vflip": True,
                   "color_jitter": 0.2},
    "photos": {"hflip": True, "random_resized_crop": 0.5, "color_jitter": 0.2, "rotation": 15.0},
    "trivialaugment": {"hflip": True, "auto": "trivialaugment"},
    "randaugment": {"hflip": True, "auto": "randaugment"},
}


def build_transform(image_size: int, mean, std, augment: dict | None = None):
    """Eval transform when `augment` is empty; otherwise the chosen augmentations first.
    Works on uint8 CHW tensors; output is float, normalised."""
    augment = {k: v for k, v in (augment or {}).items() if v}
    steps = []
    if "random_resized_crop" in augment:
        steps.append(v2.RandomResizedCrop(image_size, scale=(float(augment["random_resized_crop"]), 1.0),
                                          antialias=True))
    else:
        steps += [v2.Resize(image_size, antialias=True), v2.CenterCrop(image_size)]
    if augment.get("auto") == "randaugment":
        steps.append(v2.RandAugment())
    elif augment.get("auto"):
        steps.append(v2.TrivialAugmentWide())
    if "hflip" in augment:
        steps.append(v2.RandomHorizontalFlip())
    if "vflip" in augment:
        steps.append(v2.RandomVerticalFlip())
    if "rotation" in augment:
        steps.append(v2.RandomRotation(float(augment["rotation"])))
    if "affine" in augment:
        t = float(augment["affine"])
        steps.append(v2.RandomAffine(degrees=0, translate=(t, t), scale=(1 - t, 1 + t)))
    if "color_jitter" in augment or "hue" in augment:
        s = float(augment.get("color_jitter", 0))
        steps.append(v2.ColorJitter(brightness=s, contrast=s, saturation=s,
                                    hue=min(0.5, float(augment.get("hue", 0)))))
    if "grayscale" in augment:
        steps.append(v2.RandomGrayscale(float(augment["grayscale"])))
    if "invert" in augment:
        steps.append(v2.RandomInvert(float(augment["invert"])))
    if "blur" in augment:
        k = int(augment["blur"]) // 2 * 2 + 1      # odd kernel
        steps.append(v2.GaussianBlur(k))
    steps += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(mean), list(std))]
    return v2.Compose(steps)


def preview_augmentations(images, image_size: int, augment: dict, seed: int, copies: int = 4) -> list[np.ndarray]:
    """`copies` augmented versions of each decoded image, as uint8 HWC arrays. Drawn from a
    private random stream, so a run training meanwhile gets the same numbers as without it."""
    from core import rng
    tf = build_transform(image_size, (0, 0, 0), (1, 1, 1), augment)
    with rng.Stream(seed).active():
        return [(tf(img).clamp(0, 1).permute(1, 2, 0).numpy() * 255).astype("uint8")
                for img in images if img is not None for _ in range(copies)]


def dataset_stats(images) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of uint8 CHW images, in one streaming pass: each image's
    (count, mean, M2) is merged into the running totals with the pairwise formula
    (Chan et al.), so nothing but three numbers per channel is kept."""
    n = 0
    mean = torch.zeros(3, dtype=torch.float64)
    m2 = torch.zeros(3, dtype=torch.float64)
    for img in images:
        x = img.reshape(img.shape[0], -1).to(torch.float64) / 255.0
        nb = x.shape[1]
        mb = x.mean(1)
        m2b = ((x - mb[:, None]) ** 2).sum(1)
        delta = mb - mean
        total = n + nb
        mean = mean + delta * nb / total
        m2 = m2 + m2b + delta ** 2 * n * nb / total
        n = total
    std = (m2 / max(n, 1)).sqrt()
    return mean.tolist(), std.tolist()


class TensorDataset(torch.utils.data.Dataset):
    """Pre-decoded uint8 images plus labels; the transform runs per access."""

    def __init__(self, images: list[torch.Tensor], labels: list[int], transform):
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return self.transform(self.images[i]), self.labels[i]


# ---------------------------------------------------------------- a data set folder, for the Train page

def folder_stats(root: str | Path, image_size: int) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of every readable image below `root` at `image_size`: what
    normalize="dataset" normalises with. DataError when `root` is no data set."""
    scan = folders.scan_folder(root, check=False)
    images, _failures = imaging.decode_images(scan.root, scan.items, image_size)
    return dataset_stats(img for img in images if img is not None)


def folder_preview(root: str | Path, image_size: int, augment: dict, seed: int,
                   picks: int = 4, copies: int = 4) -> list[np.ndarray]:
    """`copies` augmented versions of `picks` images drawn (by `seed`) from the data set at
    `root`: a new seed shows other images and other augmentations. DataError when `root` is no
    data set."""
    scan = folders.scan_folder(root, check=False)
    chosen = random.Random(seed).sample(scan.items, min(picks, len(scan.items)))
    images, _failures = imaging.decode_images(scan.root, chosen, image_size)
    return preview_augmentations(images, image_size, augment, seed, copies)
