"""FLOPs of the model per token, and the bf16 peak of known accelerators (for MFU).

Counted as in the PaLM paper's MFU (appendix B): 2 FLOPs per multiply-add
of every weight matmul, plus the attention score and value matmuls; norms,
RoPE, softmax and the embedding lookup are not counted.
"""

from __future__ import annotations

from illada_jax.config import ModelConfig

# bf16 dense peak per chip, FLOP/s, by `device.device_kind` prefix (datasheets; the SXM
# parts for GPUs).
PEAK_BF16_FLOPS = {
    'TPU v4': 275e12, 'TPU v5 lite': 197e12, 'TPU v5e': 197e12, 'TPU v5p': 459e12,
    'TPU v5': 459e12, 'TPU v6 lite': 918e12, 'TPU v6e': 918e12,
    'NVIDIA H100 80GB HBM3': 989e12, 'NVIDIA H200': 989e12,
}


def forward_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
  """FLOPs of one forward pass per token of a length-`seq_len` sequence.

  Weight matmuls: q, k, v, o, gate, up and down of every layer and the LM
  head (`2 * weights`). Attention: `QK^T` and `PV`, each `2 * L * H * Dh` per
  token and layer, over all `L` keys (no causal mask).
  """
  d, h, k, dh, f, v = (cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim,
                       cfg.mlp_hidden, cfg.vocab_size)
  weights = cfg.num_layers * (2 * d * h * dh + 2 * d * k * dh + 3 * d * f) + d * v
  return 2.0 * weights + 4.0 * cfg.num_layers * seq_len * h * dh


def train_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
  """Forward + backward FLOPs per token: 3x the forward (rematerialisation not counted)."""
  return 3.0 * forward_flops_per_token(cfg, seq_len)


def peak_flops(device, dtype='bfloat16') -> float | None:
  """Datasheet dense matmul peak (FLOP/s) of `device` in `dtype`; None where not known.

  Only the bf16 peaks in `PEAK_BF16_FLOPS` are known; a CPU has no datasheet
  peak (`tools/bench_forward.py` measures its matmul rate instead), and MFU
  against a guessed peak would mean nothing.
  """
  if str(dtype) != 'bfloat16':
    return None
  kind = getattr(device, 'device_kind', '')
  for name, f in PEAK_BF16_FLOPS.items():
    if kind.startswith(name):
      return f
  return None
