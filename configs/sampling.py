"""Named sampling settings: `illada-sample --preset NAME`, lm-eval `preset=NAME`,
`illada_jax.sampling_preset(NAME)`. Flags / model args given beside a preset override its fields.

`illada_instruct` is the published iLLaDA-Instruct evaluation setting (SPEC §2):
variable-length generation, one block of 32 appended at a time and denoised in
32 steps, up to 2048 tokens (GSM8K; `illada_instruct_math`: 4096), greedy,
with the end-of-thinking boost (`</think>`, boost 100, power 3). The published
runs also apply the checkpoint's chat template (`illada-sample --chat`,
lm-eval `--apply_chat_template`); that is a prompt setting, not a sampling one.
"""

from illada_jax.sampling import SamplingOptions

ILLADA_INSTRUCT = SamplingOptions(
    gen_length=2048, block_length=32, steps=32, variable_length=True, temperature=0.,
    end_think='</think>', end_think_boost=100., end_think_power=3.)

ILLADA_INSTRUCT_MATH = ILLADA_INSTRUCT.replace(gen_length=4096)

# The base model's generation tasks (BBH, GSM8K, MATH, MBPP; SPEC §6):
# gen 1024, steps = block = 32.
ILLADA_BASE = SamplingOptions(gen_length=1024, block_length=32, steps=32, variable_length=True)

PRESETS = {
    'illada_instruct': ILLADA_INSTRUCT,
    'illada_instruct_math': ILLADA_INSTRUCT_MATH,
    'illada_base': ILLADA_BASE,
}
