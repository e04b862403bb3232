"""The distilled set as data: the arrays of `distilled.npz` and the image grid of `distilled.png`
(both files are written by `rcig.run_folder.write_distilled`)."""

from __future__ import annotations

import io

import numpy as np


def distilled_arrays(ema_average: dict, dataset, cfg, step: int) -> dict[str, np.ndarray]:
    """Arrays of distilled.npz from the EMA parameters (what evaluation uses, docs/algorithm.md §6.2)."""
    x = np.asarray(ema_average["x"], np.float32)
    y = np.asarray(ema_average["y"], np.float32)
    return {
        "x_proto": x,
        "x_pixels": np.asarray(dataset.to_pixels(x), np.float32),
        "y_proto": y,
        "log_temp": np.asarray(ema_average["log_temp"], np.float32),
        "y_class": np.repeat(np.arange(dataset.num_classes, dtype=np.int32), cfg.ipc),
        "dataset": np.asarray(cfg.dataset),
        "ipc": np.asarray(cfg.ipc),
        "use_flip": np.asarray(cfg.outer.use_flip),
        "step": np.asarray(step),
        "config_json": np.asarray(cfg.to_json()),
        "class_names": np.asarray(list(dataset.class_names or [str(i) for i in range(dataset.num_classes)])),
    }


def image_grid_png(x_pixels: np.ndarray, rows: int, scale: int | None = None) -> bytes:
    """PNG bytes of an image grid: `rows` rows (one per class), images min-max scaled."""
    from PIL import Image

    n, h, w, c = x_pixels.shape
    cols = int(np.ceil(n / rows))
    if scale is None:
        scale = max(1, 64 // max(h, w))
    pad = 1
    grid = np.ones((rows * (h + pad) + pad, cols * (w + pad) + pad, c), np.float32)
    for i in range(n):
        r, col = divmod(i, cols)
        img = x_pixels[i]
        lo, hi = np.percentile(img, 1), np.percentile(img, 99)
        img = np.clip((img - lo) / max(hi - lo, 1e-8), 0, 1)
        grid[pad + r * (h + pad): pad + r * (h + pad) + h, pad + col * (w + pad): pad + col * (w + pad) + w] = img
    arr = (grid * 255).round().astype(np.uint8)
    if c == 1:
        arr = arr[..., 0]
    im = Image.fromarray(arr)
    im = im.resize((im.width * scale, im.height * scale), Image.NEAREST)
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()
