"""lm-evaluation-harness (0.4.x) model `illada_jax` (install the `eval` extra).

  python -m illada_jax.lm_eval_adapter --model illada_jax \\
      --model_args ckpt=DIR,score_preset=illada_confidence --tasks arc_challenge
  python -m illada_jax.lm_eval_adapter --model illada_jax --apply_chat_template \\
      --model_args ckpt=DIR,preset=illada_instruct --tasks gsm8k

(`python -m` registers the model, then runs lm-eval's own CLI.) Model args:
  ckpt             checkpoint directory (required); tokenizer and prompt format read from it
  any field of `illada_jax.ScoringOptions`: loglikelihood settings. method `mc` (default)
                   or `confidence`; mc_num, mc_batch (128, 16); add_bos (default: the
                   checkpoint's add_bos_token), padd_eos; check_greedy (default here: true,
                   lm-eval's is_greedy by suffix greedy prediction, `l` more passes per
                   request; false reports False); rolling_window (loglikelihood_rolling)
  score_preset     named ScoringOptions from configs/scoring.py, e.g. `illada_confidence`
  any field of `illada_jax.SamplingOptions` (gen_length, block_length, steps, threshold,
                   cache, variable_length, temperature, end_think, end_think_boost,
                   end_think_power, ...): generate_until settings (defaults here:
                   gen_length=256, block_length=32)
  preset           named SamplingOptions from configs/sampling.py, e.g. `illada_instruct`
  cfg_scale        classifier-free guidance, for scoring and generation
  mesh             e.g. `fsdp=4`
  quantize         `int8` (or `int8_head`): int8 weights through qwix (illada_jax.quant),
                   quantized at load unless the checkpoint holds them already
lm-eval's own `--batch_size N` sets the engine's slots (requests denoised or scored at once).
Args given beside a preset override its fields. Every request type runs through
the engine (`illada_jax.engine`): results do not depend on the batch size, and
each generation request keeps its own `until` strings and `max_gen_toks`.

`loglikelihood_rolling` (perplexity tasks) sums, over windows of at most
`max_len` tokens, the Monte-Carlo estimate of each window's log-likelihood with
an empty prompt (SPEC §3). That estimate is an ELBO: the NLL it implies, and
so the word/byte perplexities lm-eval reports, are UPPER BOUNDS on the model's.
"""

from __future__ import annotations

import dataclasses
import json
import zlib

from lm_eval.api.model import LM
from lm_eval.api.registry import register_model

import illada_jax
from illada_jax import engine as engine_lib
from illada_jax import prompts, scoring, sharding
from illada_jax.config import from_strings
from illada_jax.sampling import SamplingOptions
from illada_jax.scoring import ScoringOptions

_SAMPLING = {f.name for f in dataclasses.fields(SamplingOptions)}
_SCORING = {f.name for f in dataclasses.fields(ScoringOptions)}
_LM_EVAL_ARGS = {'max_batch_size', 'device'}  # given by lm-eval's CLI; not used here


def content_seed(seed: int, *parts) -> int:
  """A request's random stream from its own content: the same request, the same draws."""
  return zlib.crc32(json.dumps([seed, *parts]).encode())


def _fields(options) -> dict:
  return {f.name: getattr(options, f.name) for f in dataclasses.fields(options)}


@register_model('illada_jax')
class ILLaDAJax(LM):
  """`loglikelihood` by MC or confidence scoring (with `is_greedy`), `loglikelihood_rolling`
  by the windowed MC bound, `generate_until` by the diffusion sampler."""

  def __init__(self, ckpt: str, batch_size: int | str = 32, mesh: str | None = None,
               tokenizer: str | None = None, seed: int = 0, preset: str | None = None,
               score_preset: str | None = None, params=None, cfg=None,
               quantize: str | None = None, **kwargs):
    super().__init__()
    unknown = sorted(set(kwargs) - _SAMPLING - _SCORING - _LM_EVAL_ARGS)
    if unknown:
      raise ValueError(f'illada_jax: unknown model args {unknown}')
    sampling_args = (_fields(illada_jax.sampling_preset(preset)) if preset
                     else {'gen_length': 256, 'block_length': 32})
    sampling_args.update({k: v for k, v in kwargs.items() if k in _SAMPLING})
    self.options = from_strings(SamplingOptions, sampling_args)
    # is_greedy is computed unless the model args turn it off, with or without a preset.
    scoring_args = dict(_fields(illada_jax.scoring_preset(score_preset)) if score_preset else {},
                        check_greedy=True)
    scoring_args.update({k: v for k, v in kwargs.items() if k in _SCORING})
    scoring_opts = from_strings(ScoringOptions, scoring_args)
    if params is None:
      mesh_obj = sharding.make_mesh(mesh) if mesh else None
      cfg, params = illada_jax.load_checkpoint(ckpt, mesh=mesh_obj, quantize=quantize)
    self.cfg, self.params, self.ckpt, self.seed = cfg, params, ckpt, int(seed)
    self.tok = prompts.load_tokenizer(ckpt, tokenizer)
    self.fmt = prompts.PromptFormat.from_checkpoint(ckpt)
    if scoring_opts.add_bos is None:  # as the harness's tokenizer call: the checkpoint decides
      scoring_opts = scoring_opts.replace(add_bos=self.fmt.add_bos)
    self.scoring = scoring_opts
    slots = 32 if str(batch_size).startswith('auto') else int(batch_size)
    self.engine = engine_lib.Engine(cfg, params, tokenizer=self.tok, slots=slots)

  # -- scoring -------------------------------------------------------------------
  def loglikelihood(self, requests, disable_tqdm: bool = False):
    """`(log-likelihood estimate, is_greedy)` per `(context, continuation)` request."""
    reqs = []
    for i, req in enumerate(requests):
      context, continuation = req.args[:2]
      ctx, cont = prompts.encode_pair(self.tok, context, continuation)
      reqs.append(engine_lib.ScoreRequest(i, tuple(ctx), tuple(cont), self.scoring,
                                          content_seed(self.seed, context, continuation)))
    scored = {s.id: s for s in self.engine.score(reqs)}
    return [(scored[i].score, bool(scored[i].is_greedy)) for i in range(len(reqs))]

  def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
    """Per text, the summed MC estimate over its windows (an ELBO: -it bounds the NLL above)."""
    o = self.scoring.replace(method='mc', check_greedy=False)
    size = scoring.window_size(self.cfg, o)
    reqs, count = [], []
    for i, req in enumerate(requests):
      text = req.args[0]
      windows = scoring.rolling_windows(self.tok.encode(text), size)
      count.append(len(windows))
      seed = content_seed(self.seed, text)
      reqs += [engine_lib.ScoreRequest((i, w), (), window, o, scoring.window_seed(seed, w))
               for w, window in enumerate(windows)]
    totals = [0.] * len(count)
    for s in self.engine.score(reqs):
      totals[s.id[0]] += s.score
    return totals

  # -- generation ----------------------------------------------------------------
  def generate_until(self, requests, disable_tqdm: bool = False):
    reqs = []
    for i, req in enumerate(requests):
      context, gen_kwargs = req.args[:2]
      until = gen_kwargs.get('until', [])
      until = (until,) if isinstance(until, str) else tuple(until)
      max_toks = gen_kwargs.get('max_gen_toks')
      reqs.append(engine_lib.Request(
          id=i, prompt_ids=tuple(self.fmt.encode(self.tok, self.cfg, context)),
          options=self.options, stop=until,
          max_new_tokens=None if max_toks is None else int(max_toks),
          seed=content_seed(self.seed, context)))
    texts = {c.id: c.text for c in self.engine.generate(reqs)}
    return [texts[i] for i in range(len(reqs))]

  def apply_chat_template(self, chat_history, add_generation_prompt: bool = True) -> str:
    bos = '' if self.cfg.bos_token_id is None else self.tok.id_to_piece(self.cfg.bos_token_id)
    return prompts.chat_text(chat_history, bos, self.fmt.chat_template)

  @property
  def tokenizer_name(self) -> str:
    return self.ckpt.rstrip('/').replace('/', '__')


def main():
  from lm_eval.__main__ import cli_evaluate
  cli_evaluate()


if __name__ == '__main__':
  main()
