"""Deterministic synthetic tensors, bit-identical to src/io/synth.cpp (sav::synth_tensor).

Golden tests use them so that large weights and inputs never need to be committed: a tensor is a pure
function of its name and shape. Values are drawn in float64 and rounded once to float32.
"""
import numpy as np

_M64 = (1 << 64) - 1


def fnv1a64(name: str) -> int:
    h = 0xCBF29CE484222325
    for b in name.encode():
        h ^= b
        h = (h * 0x100000001B3) & _M64
    return h


def uniform_pm1(name: str, n: int) -> np.ndarray:
    """n values in [-1, 1): 2 * (splitmix64(seed + (i+1) * golden) >> 40) / 2^24 - 1."""
    with np.errstate(over="ignore"):
        seed = np.uint64(fnv1a64(name))
        i = np.arange(1, n + 1, dtype=np.uint64)
        z = seed + i * np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    u = (z >> np.uint64(40)).astype(np.float64) / float(1 << 24)
    return 2.0 * u - 1.0


def synth_scale(name: str, shape) -> float:
    """The scale rule of synth_tensor: O(1) activations through deep random networks, non-trivial biases."""
    if name == "input":
        return 2.0
    if len(shape) == 1:
        if name.endswith(".weight"):  # norm weights: 1 + 0.2 v (offset added in synth_tensor)
            return 0.2
        return 0.1  # biases
    if name in ("cls_token", "pos_embed"):
        return 0.5
    fan_in = int(np.prod(shape[1:]))
    return float(np.sqrt(3.0 / fan_in))


def synth_tensor(name: str, shape) -> np.ndarray:
    n = int(np.prod(shape))
    v = uniform_pm1(name, n) * synth_scale(name, shape)
    if len(shape) == 1 and name.endswith(".weight"):
        v = v + 1.0
    return v.astype(np.float32).reshape(shape)
