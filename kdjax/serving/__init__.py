"""Serving: sampling, the slot engine (prefill, insert, decode block) and `generate`, its host loop; `cpu/` holds the
CPU decode's own kernels behind a narrow interface. Never imports distill or evaluation."""
