"""Named scoring settings: `illada-score --preset NAME`, lm-eval `score_preset=NAME`,
`illada_jax.scoring_preset(NAME)`. Flags / model args given beside a preset override its fields.

The published iLLaDA-8B-Base runs (SPEC §3, §6) pass `add_bos_token=True,
padd_eos=True` for every scored task: ARC-C and HellaSwag by confidence
scoring (`illada_confidence`), MMLU by one Monte-Carlo sample (`illada_mc1`).
"""

from illada_jax.scoring import ScoringOptions

ILLADA_CONFIDENCE = ScoringOptions(method='confidence', add_bos=True, padd_eos=True)

ILLADA_MC1 = ScoringOptions(method='mc', mc_num=1, mc_batch=1, add_bos=True, padd_eos=True)

PRESETS = {
    'illada_confidence': ILLADA_CONFIDENCE,
    'illada_mc1': ILLADA_MC1,
}
