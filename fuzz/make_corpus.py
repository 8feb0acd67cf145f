#!/usr/bin/env python3
"""Writes the fuzz seed corpus: fuzz/corpus/<target>/ (a few KB per target).

  python3 fuzz/make_corpus.py        # Python 3 standard library; Pillow for the JPEG/GIF/TGA image seeds

Input layouts are the ones fuzz/targets.h documents (parts split at b"#SAVSPLIT#"). The safetensors
seeds are copies of tests/data/safetensors/*.safetensors (valid and invalid) plus a few more. Rerunning
rewrites the same files; files added by a fuzzer run (merged corpora) are left alone.
"""
import gzip
import io
import json
import os
import struct
import zlib

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
SPLIT = b"#SAVSPLIT#"


def out(target, name, data):
    d = os.path.join(HERE, "corpus", target)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, name), "wb") as f:
        f.write(data)


def safetensors(tensors, metadata=None):
    """tensors: list of (name, dtype, shape, raw bytes); header padded to 8 bytes."""
    header, data = {}, b""
    if metadata:
        header["__metadata__"] = metadata
    for name, dtype, shape, raw in tensors:
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [len(data), len(data) + len(raw)]}
        data += raw
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * ((8 - len(text) % 8) % 8)
    return struct.pack("<Q", len(text)) + text + data


def f32(*xs):
    return struct.pack("<%df" % len(xs), *xs)


# ---- safetensors
src = os.path.join(ROOT, "tests", "data", "safetensors")
for name in sorted(os.listdir(src)):
    if name.endswith(".safetensors"):
        with open(os.path.join(src, name), "rb") as f:
            out("safetensors", name, f.read())
out("safetensors", "seed_f16_bf16_i64.safetensors",
    safetensors([("a", "F16", [2], struct.pack("<2H", 0x3C00, 0x7C00)),
                 ("b", "BF16", [1, 2], struct.pack("<2H", 0x3F80, 0xFFC0)),
                 ("c", "I64", [], struct.pack("<q", -(2 ** 62)))], {"format": "pt"}))
out("safetensors", "seed_empty_name.safetensors", safetensors([("", "U8", [3], b"\x01\x02\x03")]))
out("safetensors", "seed_scalar_f32.safetensors", safetensors([("s", "F32", [], f32(1.5))]))

# ---- checkpoint_index: INDEX_JSON #SAVSPLIT# SHARD_A [#SAVSPLIT# SHARD_B]
shard_a = safetensors([("w", "F32", [2, 2], f32(1, 2, 3, 4)), ("b", "F32", [2], f32(0.5, -0.5))])
shard_b = safetensors([("head.weight", "BF16", [1, 2], struct.pack("<2H", 0x3F80, 0x4000))], {"format": "pt"})
index1 = json.dumps({"metadata": {"total_size": 24}, "weight_map": {"w": "a.safetensors", "b": "a.safetensors"}})
index2 = json.dumps({"metadata": {"total_size": 28, "note": "two shards"},
                     "weight_map": {"w": "a.safetensors", "b": "a.safetensors", "head.weight": "b.safetensors"}})
out("checkpoint_index", "one_shard", index1.encode() + SPLIT + shard_a)
out("checkpoint_index", "two_shards", index2.encode() + SPLIT + shard_a + SPLIT + shard_b)
out("checkpoint_index", "missing_tensor", json.dumps({"weight_map": {"w": "a.safetensors"}}).encode() + SPLIT + shard_a)
out("checkpoint_index", "escaping_path",
    json.dumps({"weight_map": {"w": "../a.safetensors", "b": "/a.safetensors"}}).encode() + SPLIT + shard_a)
out("checkpoint_index", "wrong_shard",
    json.dumps({"weight_map": {"w": "b.safetensors", "b": "a.safetensors", "head.weight": "a.safetensors"}}).encode()
    + SPLIT + shard_a + SPLIT + shard_b)

# ---- idx: IMAGES_IDX3 #SAVSPLIT# LABELS_IDX1 (plain or gzipped)
def idx3(n, rows, cols, pixels):
    return struct.pack(">IIII", 0x803, n, rows, cols) + bytes(pixels)


def idx1(labels):
    return struct.pack(">II", 0x801, len(labels)) + bytes(labels)


imgs = idx3(3, 4, 5, [(i * 17) % 256 for i in range(60)])
labs = idx1([0, 9, 3])
out("idx", "plain", imgs + SPLIT + labs)
out("idx", "gzip", gzip.compress(imgs, mtime=0) + SPLIT + gzip.compress(labs, mtime=0))
out("idx", "one_image_1x1", idx3(1, 1, 1, [255]) + SPLIT + idx1([255]))
out("idx", "truncated", imgs[:40] + SPLIT + labs)
out("idx", "swapped", labs + SPLIT + imgs)
out("idx", "count_mismatch", imgs + SPLIT + idx1([1, 2]))
out("idx", "gzip_truncated", gzip.compress(imgs, mtime=0)[:30] + SPLIT + labs)

# ---- image: byte 0 picks the sizes, then the image file
def png(width, height, color_type, bit_depth, rows):
    """Minimal PNG writer (filter 0 on every row)."""
    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    raw = b"".join(b"\x00" + r for r in rows)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


out("image", "gray_png", b"\x21" + png(5, 3, 0, 8, [bytes(range(r * 5, r * 5 + 5)) for r in range(3)]))
out("image", "rgb_png", b"\x87" + png(4, 6, 2, 8, [bytes(v for x in range(4) for v in (x * 60, r * 40, 100))
                                                    for r in range(6)]))
out("image", "rgba16_png", b"\xf3" + png(3, 2, 6, 16, [bytes(range(24)) for _ in range(2)]))
out("image", "tall_png", b"\x05" + png(1, 40, 0, 8, [bytes([r * 6]) for r in range(40)]))
out("image", "pgm", b"\x30" + b"P5\n4 3\n255\n" + bytes(range(0, 240, 20)))
out("image", "ppm", b"\x99" + b"P6\n2 2\n255\n" + bytes(range(12)))


def bmp(width, height, pixels_bgr):
    row = (width * 3 + 3) // 4 * 4
    body = b"".join(bytes(pixels_bgr[y * width * 3:(y + 1) * width * 3]).ljust(row, b"\0") for y in range(height))
    return (b"BM" + struct.pack("<IHHI", 54 + len(body), 0, 0, 54)
            + struct.pack("<IiiHHIIiiII", 40, width, height, 1, 24, 0, len(body), 2835, 2835, 0, 0) + body)


out("image", "bmp", b"\x44" + bmp(3, 2, list(range(18))))
try:
    from PIL import Image

    def pil(im, fmt, **kw):
        b = io.BytesIO()
        im.save(b, fmt, **kw)
        return b.getvalue()

    rgb = Image.new("RGB", (9, 7))
    rgb.putdata([((x * 28) % 256, (y * 36) % 256, (x * y * 5) % 256) for y in range(7) for x in range(9)])
    out("image", "jpeg_baseline", b"\x6b" + pil(rgb, "JPEG", quality=80))
    out("image", "jpeg_progressive", b"\xc2" + pil(rgb, "JPEG", quality=70, progressive=True))
    out("image", "jpeg_gray", b"\x17" + pil(rgb.convert("L"), "JPEG", quality=90))
    out("image", "jpeg_420", b"\x5e" + pil(rgb.resize((17, 11)), "JPEG", quality=60, subsampling=2))
    out("image", "gif", b"\x3c" + pil(rgb.convert("P"), "GIF"))
    out("image", "tga_rle", b"\x81" + pil(rgb, "TGA", compression="tga_rle"))
except ImportError:
    print("Pillow not found: JPEG/GIF/TGA image seeds not written")

# ---- cli_values: the text as one value, and split at newlines into an argv
for name, text in [("batch_list", "1,64"), ("alpha", "1,0.6"),
                   ("bench", "bench\n--batch\n1,7,64\n--iters\n3\n--train"),
                   ("train", "train\n--epochs\n2\n--batch\n128\n--lr\n1.5e-3\n--pad-crop\n2\n--hflip\n--seed\n7"),
                   ("convert", "convert\n--alpha\n1,0.55\n--gate\nprob\n--hash-bits\n16\n--lb-coef\n0.01"),
                   ("threads_eq", "--threads=2\ntrain\n--data-format=fmnist"),
                   ("help", "bench\n--help")]:
    out("cli_values", name, text.encode())
print("wrote", os.path.join(HERE, "corpus"))
