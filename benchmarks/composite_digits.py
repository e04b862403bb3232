"""Many-class datasets built from the bundled digits, for measuring the laptop presets of
100- and 200-class datasets on a machine that holds no CIFAR-100 or Tiny-ImageNet.

- `numbers`: two-digit numbers 00..99 (100 classes). The tens digit and the units digit
  are two different bundled 8x8 digit images, each resized to half the width, side by
  side, replicated over 3 channels: 32x32x3, CIFAR-100's shape.
- `tinted`: the same numbers at 64x64x3, each drawn in one of two tints (warm or cool):
  200 classes, Tiny-ImageNet's shape.

Train images are composed only from the digits' train split and test images only from
its test split, so no digit image is shared between them. These are real handwritten
strokes with a known label structure, but they are not CIFAR-100 or Tiny-ImageNet: a
figure measured on them says what the preset costs at that shape and class count, and
whether it learns a 100/200-way task at all, not what it reaches on the real data.

    python -m benchmarks.composite_digits --kind numbers --out /tmp/numbers32.npz
    python -m benchmarks.composite_digits --kind tinted --out /tmp/tinted64.npz
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

TINTS = ((1.0, 0.55, 0.35), (0.35, 0.65, 1.0))  # warm, cool (multipliers per RGB channel)


def _resize(x: np.ndarray, h: int, w: int) -> np.ndarray:
    """Bilinear resize of (N, H, W, 1) images in [0, 1]."""
    import jax

    return np.asarray(jax.image.resize(x, (x.shape[0], h, w, x.shape[3]), method="bilinear"))


def _compose(x: np.ndarray, y: np.ndarray, per_class: int, size: int, tints: int,
             rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """`per_class` images of each of 100 * tints classes from digit images x (N, 8, 8, 1)."""
    by_digit = [np.flatnonzero(y == d) for d in range(10)]
    halves = _resize(x, size, size // 2)  # each digit fills half the width
    images, labels = [], []
    for tint in range(tints):
        mult = np.asarray(TINTS[tint] if tints > 1 else (1.0, 1.0, 1.0), np.float32)
        for number in range(100):
            tens, units = divmod(number, 10)
            for _ in range(per_class):
                a = halves[rng.choice(by_digit[tens])]
                b = halves[rng.choice(by_digit[units])]
                gray = np.concatenate([a, b], axis=1)  # (size, size, 1)
                images.append(np.clip(gray * mult, 0.0, 1.0))
                labels.append(tint * 100 + number)
    x_out = np.round(np.stack(images) * 255).astype(np.uint8)
    return x_out, np.asarray(labels, np.int32)


def composite_npz(path: Path, kind: str = "numbers", train_per_class: int | None = None,
                  test_per_class: int | None = None, seed: int = 0) -> Path:
    """Write the `numbers` (32x32x3, 100 classes) or `tinted` (64x64x3, 200) dataset."""
    from rcig.data.digits import load_digits_split

    size, tints = {"numbers": (32, 1), "tinted": (64, 2)}[kind]
    train_per_class = train_per_class or (50 if tints == 1 else 25)
    test_per_class = test_per_class or (10 if tints == 1 else 5)
    xtr, ytr, xte, yte, _ = load_digits_split()
    rng = np.random.default_rng(seed)
    x_train, y_train = _compose(np.asarray(xtr), np.asarray(ytr), train_per_class, size, tints, rng)
    x_test, y_test = _compose(np.asarray(xte), np.asarray(yte), test_per_class, size, tints, rng)
    names = np.array([f"{'warm ' if tints > 1 and c < 100 else 'cool ' if tints > 1 else ''}{c % 100:02d}"
                      for c in range(100 * tints)])
    np.savez(path, x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test, class_names=names)
    return path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--kind", choices=("numbers", "tinted"), default="numbers")
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=int, default=0)
    opts = p.parse_args()
    out = composite_npz(Path(opts.out), opts.kind, seed=opts.seed)
    with np.load(out) as z:
        print(f"{out}: train {z['x_train'].shape}, test {z['x_test'].shape}, "
              f"{len(z['class_names'])} classes")


if __name__ == "__main__":
    main()
