"""How the teacher store (`kdjax.store`) writes token ids: as uint16, or bit-packed for larger vocabularies.

Ids are stored as uint16 when vocab_size <= 65536. Larger vocabularies are bit-packed with
ceil(log2(vocab_size)) bits per id instead of uint32: for Llama 3 (128256 ids, 17 bits) at
k=50 that is 312 instead of 408 bytes per token: for the ~1.9M response tokens of GSM8K train,
~0.58 GB instead of ~0.76 GB (~0.60 GB with prompts and response texts).
"""

from __future__ import annotations

import numpy as np


def format_for(vocab_size: int) -> str:
  """The id format of a vocabulary: uint16, or packed<bits> with the fewest bits that hold its largest id."""
  if vocab_size <= 1 << 16:
    return "uint16"
  return f"packed{(vocab_size - 1).bit_length()}"


def encode(ids: np.ndarray, id_format: str) -> np.ndarray:
  """`ids` (any shape) flattened into the stored array of `id_format`."""
  flat = np.asarray(ids).reshape(-1)
  if id_format == "uint16":
    return flat.astype(np.uint16)
  bits = int(id_format.removeprefix("packed"))
  # Little-endian bit order: the low `bits` bits of each id, packed back to back.
  as_bytes = flat.astype("<u4").view(np.uint8).reshape(-1, 4)
  id_bits = np.unpackbits(as_bytes, axis=1, bitorder="little")[:, :bits]
  return np.packbits(id_bits.reshape(-1), bitorder="little")


def decode(stored: np.ndarray, count: int, id_format: str) -> np.ndarray:
  """The first `count` ids of a stored array, as int32."""
  if id_format == "uint16":
    return stored.astype(np.int32)
  bits = int(id_format.removeprefix("packed"))
  id_bits = np.zeros((count, 32), np.uint8)
  id_bits[:, :bits] = np.unpackbits(stored, count=count * bits, bitorder="little").reshape(count, bits)
  return np.packbits(id_bits, axis=1, bitorder="little").view("<u4").reshape(count).astype(np.int32)
