"""Writes small JPEG/PNG files and Pillow's decoding of them (tests/data/image/) for test_dataset.cpp.

Pillow (its bundled libjpeg-turbo and zlib/libpng-compatible reader) is the reference the timm/torchvision
eval pipeline uses. For each FILE, FILE.rgb holds Pillow's convert("RGB") and FILE.l its convert("L"),
planar uint8 (C, H, W). Run: python3 python/make_image_refs.py  (any machine with Pillow and numpy).
"""
import os
import numpy as np
from PIL import Image

OUT = os.path.join(os.path.dirname(__file__), "..", "tests", "data", "image")


def photo(h, w, seed):
    r = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    base = np.stack([128 + 100 * np.sin(x / 5.0 + c) * np.cos(y / 7.0 - c) for c in range(3)], -1)
    return np.clip(base + r.normal(0, 12, (h, w, 3)), 0, 255).astype(np.uint8)


def main():
    os.makedirs(OUT, exist_ok=True)
    rgb = Image.fromarray(photo(29, 37, 1))
    rgb.save(f"{OUT}/color420.jpg", quality=90)  # 4:2:0 chroma, baseline
    rgb.save(f"{OUT}/progressive444.jpg", quality=75, progressive=True, subsampling=0)
    rgb.convert("L").save(f"{OUT}/gray.jpg", quality=85)
    rgb.convert("CMYK").save(f"{OUT}/cmyk.jpg", quality=95)
    pal = rgb.convert("P", palette=Image.ADAPTIVE, colors=16)
    pal.info["transparency"] = 3
    pal.save(f"{OUT}/palette_trns.png", transparency=3)
    rgba = np.concatenate([photo(17, 23, 2), np.random.default_rng(3).integers(0, 256, (17, 23, 1), np.uint8)], -1)
    Image.fromarray(rgba, "RGBA").save(f"{OUT}/rgba.png")
    for name in sorted(os.listdir(OUT)):
        if not name.endswith((".jpg", ".png")):
            continue
        im = Image.open(f"{OUT}/{name}")
        for mode, ext in (("RGB", "rgb"), ("L", "l")):
            a = np.asarray(im.convert(mode))
            a = a[:, :, None] if a.ndim == 2 else a
            a.transpose(2, 0, 1).tofile(f"{OUT}/{name}.{ext}")
        print(name, im.mode, im.size)


if __name__ == "__main__":
    main()
