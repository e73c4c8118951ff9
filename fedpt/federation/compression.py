"""Compressed client updates: what a client sends in place of its float32 weights, and how the server reads it.

Formats (`federation.update_format`):
- float32: the trained weights themselves, as before (4 bytes a weight);
- float16: the update (trained minus global weights) in half precision (2 bytes);
- int8 / int4: the update quantised per block of 64 values, each block scaled by its largest magnitude
  (absmax, as QLoRA's blockwise quantisation), with one float32 scale per block: 1.06 and 0.56 bytes a weight.

Error feedback (Seide et al. 2014; Karimireddy et al. 2019): the client keeps what rounding lost and adds it to
its next update, so no part of an update is lost for good, only delayed. Torch- and Flower-free: the client and
server apps call it.
"""

from __future__ import annotations

import numpy as np

from fedpt.errors import FedptError

FORMATS = ("float32", "float16", "int8", "int4")
BLOCK = 64  # values sharing one scale
LEVELS = {"int8": 127, "int4": 7}  # largest quantised magnitude: symmetric, so 0 stays exactly 0
SCALE = "::scale"  # suffix of a block-scale array's key


def compress(update: dict[str, np.ndarray], fmt: str,
             residual: dict[str, np.ndarray] | None = None) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """(arrays to send, the new residual): `update` plus the old residual, encoded; the residual is what the
    encoding lost."""
    if fmt not in FORMATS:
        raise FedptError(f"unknown update format '{fmt}'; choose one of {', '.join(FORMATS)}")
    if residual:
        update = {k: v + residual[k] for k, v in update.items()}
    encoded = encode(update, fmt)
    decoded = decode(encoded, {k: v.shape for k, v in update.items()}, fmt)
    return encoded, {k: (update[k] - decoded[k]).astype(np.float32) for k in update}


def encode(update: dict[str, np.ndarray], fmt: str) -> dict[str, np.ndarray]:
    if fmt == "float32":
        return {k: np.asarray(v, dtype=np.float32) for k, v in update.items()}
    if fmt == "float16":
        return {k: np.asarray(v, dtype=np.float16) for k, v in update.items()}
    out = {}
    levels = LEVELS[fmt]
    for key, value in update.items():
        blocks = _blocks(np.asarray(value, dtype=np.float32))  # (n_blocks, BLOCK), zero-padded
        scale = np.abs(blocks).max(axis=1) / levels  # the largest magnitude of each block maps to +-levels
        safe = np.where(scale > 0, scale, 1.0)[:, None]
        q = np.clip(np.rint(blocks / safe), -levels, levels).astype(np.int8).ravel()[: value.size]
        out[key] = q if fmt == "int8" else _pack4(q)
        out[key + SCALE] = scale.astype(np.float32)
    return out


def decode(arrays: dict[str, np.ndarray], shapes: dict[str, tuple[int, ...]], fmt: str) -> dict[str, np.ndarray]:
    """The float32 values `arrays` encode, one per name in `shapes`; a malformed message is a one-line FedptError."""
    expected = set(shapes) if fmt in ("float32", "float16") else {k for s in shapes for k in (s, s + SCALE)}
    if set(arrays) != expected:
        unknown, missing = sorted(set(arrays) - expected), sorted(expected - set(arrays))
        raise FedptError(f"{fmt} update: unknown array(s) {unknown[:3]}, missing {missing[:3]}")
    out = {}
    for key, shape in shapes.items():
        size = int(np.prod(shape))
        value = arrays[key]
        if fmt in ("float32", "float16"):
            if value.dtype != np.dtype(fmt) or tuple(value.shape) != tuple(shape):
                raise FedptError(f"{fmt} update: {key} is {value.dtype} {tuple(value.shape)}, expected {fmt} "
                                 f"{tuple(shape)}")
            out[key] = value.astype(np.float32)
            continue
        n_blocks = -(-size // BLOCK)
        want = (size if fmt == "int8" else -(-size // 2),)
        want_dtype = np.int8 if fmt == "int8" else np.uint8
        scale = arrays[key + SCALE]
        if value.dtype != want_dtype or tuple(value.shape) != want:
            raise FedptError(f"{fmt} update: {key} is {value.dtype} {tuple(value.shape)}, expected "
                             f"{np.dtype(want_dtype)} {want}")
        if scale.dtype != np.float32 or tuple(scale.shape) != (n_blocks,) or not np.isfinite(scale).all():
            raise FedptError(f"{fmt} update: {key}'s scales are not {n_blocks} finite float32 values")
        q = value if fmt == "int8" else _unpack4(value, size)
        if np.abs(q.astype(np.int16)).max(initial=0) > LEVELS[fmt]:
            raise FedptError(f"{fmt} update: {key} holds values beyond +-{LEVELS[fmt]}")
        padded = np.zeros(n_blocks * BLOCK, dtype=np.float32)
        padded[:size] = q
        out[key] = (padded.reshape(n_blocks, BLOCK) * scale[:, None]).ravel()[:size].reshape(shape)
    return out


def _blocks(value: np.ndarray) -> np.ndarray:
    flat = value.ravel()
    padded = np.zeros(-(-flat.size // BLOCK) * BLOCK, dtype=np.float32)
    padded[: flat.size] = flat
    return padded.reshape(-1, BLOCK)


def _pack4(q: np.ndarray) -> np.ndarray:
    """Two values in -7..7 per byte: (value + 8) in the low nibble, then the high one."""
    nibbles = (q.astype(np.int16) + 8).astype(np.uint8)
    if nibbles.size % 2:
        nibbles = np.append(nibbles, np.uint8(8))  # a padding zero
    return nibbles[0::2] | (nibbles[1::2] << 4)


def _unpack4(packed: np.ndarray, size: int) -> np.ndarray:
    nibbles = np.empty(packed.size * 2, dtype=np.int8)
    nibbles[0::2] = (packed & 0x0F).astype(np.int8) - 8
    nibbles[1::2] = (packed >> 4).astype(np.int8) - 8
    return nibbles[:size]
