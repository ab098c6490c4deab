"""The options each codec is tested with: small blocks and a top-k fraction that exercise their edge cases
(``sparse``: blocks of 64 keeping 4, so the test lengths cover several blocks and a short tail)."""

from __future__ import annotations

CODEC_OPTS = {
    "none": {},
    "fp16": {},
    "bf16": {},
    "int8": {"block": 256},
    "int4": {"block": 128},
    "topk": {"fraction": 0.05},
    "sparse": {"density": 0.05, "bits": 2, "block": 64},
}
