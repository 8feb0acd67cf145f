#!/usr/bin/env python3
"""Writes the safetensors seed corpus next to this script (tests/data/safetensors/).

Standard library only, an independent writer for tests/test_safetensors.cpp (SafeTensorsCorpus):
  valid_*.safetensors    must open, and every tensor must read;
  invalid_*.safetensors  must be refused with sav::Error.
The values of valid_all_dtypes.safetensors are checked one by one by the C++ test. Rerun after editing:
  python3 tests/data/safetensors/make_corpus.py
"""
import json
import os
import struct

HERE = os.path.dirname(os.path.abspath(__file__))


def bf16(x):
    """float -> bfloat16 bits; only used on values bf16 holds exactly."""
    bits = struct.unpack("<I", struct.pack("<f", x))[0]
    assert bits & 0xFFFF == 0, x
    return bits >> 16


def file_bytes(header, data=b"", pad=True, raw_header=None):
    text = raw_header if raw_header is not None else json.dumps(header, separators=(",", ":")).encode()
    if pad:
        text += b" " * ((8 - len(text) % 8) % 8)
    return struct.pack("<Q", len(text)) + text + data


def tensors_file(items, metadata=None, pad=True):
    """items: (name, dtype, shape, bytes) in data order."""
    header, data = {}, b""
    if metadata:
        header["__metadata__"] = metadata
    for name, dtype, shape, raw in items:
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [len(data), len(data) + len(raw)]}
        data += raw
    return file_bytes(header, data, pad)


def main():
    files = {}
    f32 = [i * 0.5 - 1.0 for i in range(6)]
    files["valid_all_dtypes"] = tensors_file([
        ("a.f32", "F32", [2, 3], struct.pack("<6f", *f32)),
        ("b.f16", "F16", [3], struct.pack("<3e", 1.0, -2.5, 65504.0)),
        ("c.bf16", "BF16", [2], struct.pack("<2H", bf16(1.0), bf16(-3.0))),
        ("d.i32", "I32", [2, 2], struct.pack("<4i", -1, 2, -3, 4)),
        ("e.i64", "I64", [2], struct.pack("<2q", -(2 ** 40), 7)),
        ("f.u8", "U8", [3], bytes([0, 127, 255])),
    ], metadata={"format": "pt", "source": "make_corpus.py"})
    files["valid_empty"] = file_bytes({})
    files["valid_zero_sized"] = tensors_file([
        ("empty", "F32", [0, 4], b""),
        ("scalar", "F32", [], struct.pack("<f", 3.25)),
    ])
    # Unpadded odd-length header: the F32 data sits at an odd file offset (read by copying).
    files["valid_unpadded_misaligned"] = tensors_file(
        [("w", "F32", [2], struct.pack("<2f", 1.5, -0.25))], metadata={"x": "y"}, pad=False)

    ok = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}
    eight = b"\0" * 8
    files["invalid_short"] = b"\x05\0\0\0"
    files["invalid_header_len_past_end"] = struct.pack("<Q", 4096) + b"{}      "
    files["invalid_header_len_over_100mb"] = struct.pack("<Q", 200_000_000) + b"{}      "
    files["invalid_not_json"] = file_bytes(None, raw_header=b'{"w": {"dtype": ')
    files["invalid_not_object"] = file_bytes([1, 2, 3])
    files["invalid_missing_dtype"] = file_bytes({"w": {"shape": [2], "data_offsets": [0, 8]}}, eight)
    files["invalid_missing_shape"] = file_bytes({"w": {"dtype": "F32", "data_offsets": [0, 8]}}, eight)
    files["invalid_missing_offsets"] = file_bytes({"w": {"dtype": "F32", "shape": [2]}}, eight)
    files["invalid_unknown_dtype"] = file_bytes({"w": dict(ok, dtype="Q4")}, eight)
    files["invalid_negative_shape"] = file_bytes({"w": dict(ok, shape=[-2])}, eight)
    files["invalid_float_shape"] = file_bytes({"w": dict(ok, shape=[2.0])}, eight)
    files["invalid_offsets_past_data"] = file_bytes({"w": dict(ok, data_offsets=[0, 8])}, b"\0" * 4)
    files["invalid_begin_after_end"] = file_bytes({"w": dict(ok, shape=[0], data_offsets=[8, 4])}, eight)
    files["invalid_overlap"] = file_bytes({"w": dict(ok, data_offsets=[0, 8]),
                                           "v": dict(ok, data_offsets=[4, 12])}, b"\0" * 12)
    files["invalid_size_mismatch"] = file_bytes({"w": dict(ok, shape=[3])}, eight)
    files["invalid_numel_overflow"] = file_bytes({"w": dict(ok, shape=[2 ** 32, 2 ** 32])}, eight)
    files["invalid_duplicate_key"] = file_bytes(
        None, eight, raw_header=b'{"w":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},'
                                b'"w":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}')
    files["invalid_metadata_not_string"] = file_bytes({"__metadata__": {"step": 3}, "w": ok}, eight)

    for name in sorted(os.listdir(HERE)):
        if name.endswith(".safetensors"):
            os.remove(os.path.join(HERE, name))
    for name, data in files.items():
        with open(os.path.join(HERE, name + ".safetensors"), "wb") as f:
            f.write(data)
    print(f"wrote {len(files)} files, {sum(len(d) for d in files.values())} bytes, to {HERE}")


if __name__ == "__main__":
    main()
