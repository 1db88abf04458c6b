"""Model presets. `illada_jax.get_preset(name)` returns one of `PRESETS`.

The 8B presets are the published checkpoints' architectures (SPEC §1); the
small ones exist for tests, demos and CPU benchmarks and keep the iLLaDA
shape (GQA, tied head) unless named otherwise.
"""

from illada_jax.config import ModelConfig

ILLADA_8B = ModelConfig(
    family='illada', num_layers=32, d_model=4096, num_heads=32, num_kv_heads=8,
    head_dim=128, mlp_hidden=14336, vocab_size=155136, max_len=8192,
    tie_embeddings=True, rope_theta=500000.0, norm_eps=1e-6,
    mask_token_id=5, bos_token_id=0, eos_token_id=2, pad_token_id=1, eot_token_id=None)

LLADA_8B = ModelConfig(
    family='llada', num_layers=32, d_model=4096, num_heads=32, num_kv_heads=32,
    head_dim=128, mlp_hidden=12288, vocab_size=126464, max_len=4096,
    tie_embeddings=False, rope_theta=500000.0, norm_eps=1e-5,
    mask_token_id=126336, bos_token_id=126080, eos_token_id=126081,
    pad_token_id=126081, eot_token_id=126348)

# ~100M parameters: the CPU benchmark size (12 x 768, GQA 12/4, 32k vocab).
ILLADA_100M = ILLADA_8B.replace(
    num_layers=12, d_model=768, num_heads=12, num_kv_heads=4, head_dim=64,
    mlp_hidden=2048, vocab_size=32768, max_len=2048)

# A few million parameters: demos and fast tests.
ILLADA_TINY = ILLADA_8B.replace(
    num_layers=4, d_model=256, num_heads=8, num_kv_heads=2, head_dim=32,
    mlp_hidden=704, vocab_size=1024, max_len=512)

# The LLaDA layout (MHA, untied head, OLMo ids) at the tiny size.
LLADA_TINY = LLADA_8B.replace(
    num_layers=4, d_model=256, num_heads=8, num_kv_heads=8, head_dim=32,
    mlp_hidden=704, vocab_size=1024, max_len=512, mask_token_id=1000,
    bos_token_id=1001, eos_token_id=1002, pad_token_id=1002, eot_token_id=1003)

PRESETS = {
    'illada_8b': ILLADA_8B,
    'llada_8b': LLADA_8B,
    'illada_100m': ILLADA_100M,
    'illada_tiny': ILLADA_TINY,
    'llada_tiny': LLADA_TINY,
}
