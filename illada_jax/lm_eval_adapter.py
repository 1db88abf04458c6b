"""lm-evaluation-harness (0.4.x) model `illada_jax` (install the `eval` extra).

  python -m illada_jax.lm_eval_adapter --model illada_jax \\
      --model_args ckpt=DIR,method=confidence --tasks arc_challenge

(`python -m` registers the model, then runs lm-eval's own CLI.) Model args:
  ckpt             checkpoint directory (required); tokenizer and prompt format read from it
  method           loglikelihood scorer: `mc` (default) or `confidence` (SPEC §3)
  mc_num, mc_batch Monte-Carlo samples and rows per round (128, 16)
  cfg_scale        classifier-free guidance, for scoring and generation
  any field of `illada_jax.SamplingOptions` (gen_length, block_length, steps, threshold,
                   cache, variable_length, temperature, ...): generate_until settings
                   (defaults here: gen_length=256, block_length=32)
  batch_size       engine slots (requests denoised or scored at once); mesh e.g. `fsdp=4`
Both request types run through the engine (`illada_jax.engine`): results do not
depend on the batch size, and each generation request keeps its own `until`
strings and `max_gen_toks` (the completion is cut to that many tokens).
"""

from __future__ import annotations

import json
import zlib

from lm_eval.api.model import LM
from lm_eval.api.registry import register_model

import illada_jax
from illada_jax import engine as engine_lib
from illada_jax import prompts, sharding
from illada_jax.config import from_strings
from illada_jax.sampling import SamplingOptions
from illada_jax.scoring import ScoringOptions

_SAMPLING = {f for f in SamplingOptions.__dataclass_fields__}


def content_seed(seed: int, *parts) -> int:
  """A request's random stream from its own content: the same request, the same draws."""
  return zlib.crc32(json.dumps([seed, *parts]).encode())


@register_model('illada_jax')
class ILLaDAJax(LM):
  """`loglikelihood` by MC or confidence scoring; `generate_until` by the diffusion sampler."""

  def __init__(self, ckpt: str, method: str = 'mc', mc_num: int = 128, mc_batch: int = 16,
               batch_size: int | str = 32, mesh: str | None = None,
               tokenizer: str | None = None, seed: int = 0, params=None, cfg=None, **kwargs):
    super().__init__()
    sampling_args = {'gen_length': 256, 'block_length': 32}
    sampling_args.update({k: v for k, v in kwargs.items() if k in _SAMPLING})
    self.options = from_strings(SamplingOptions, sampling_args)
    self.scoring = ScoringOptions(method, int(mc_num), int(mc_batch), self.options.cfg_scale)
    if params is None:
      mesh_obj = sharding.make_mesh(mesh) if mesh else None
      cfg, params = illada_jax.load_checkpoint(ckpt, mesh=mesh_obj)
    self.cfg, self.params, self.ckpt, self.seed = cfg, params, ckpt, int(seed)
    self.tok = prompts.load_tokenizer(ckpt, tokenizer)
    self.fmt = prompts.PromptFormat.from_checkpoint(ckpt)
    slots = 32 if str(batch_size).startswith('auto') else int(batch_size)
    self.engine = engine_lib.Engine(cfg, params, tokenizer=self.tok, slots=slots)

  # -- scoring -------------------------------------------------------------------
  def _pair(self, context: str, continuation: str):
    # Whitespace belongs to the continuation in lm-eval; keep the split at the text boundary.
    if self.scoring.method == 'confidence':  # the scorer puts BOS before the context itself
      ctx = self.tok.encode(context) if context else []
    else:
      ctx = self.fmt.encode(self.tok, self.cfg, context) if context else []
    return tuple(ctx), tuple(self.tok.encode(continuation))

  def loglikelihood(self, requests, disable_tqdm: bool = False):
    reqs = []
    for i, req in enumerate(requests):
      context, continuation = req.args[:2]
      ctx, cont = self._pair(context, continuation)
      reqs.append(engine_lib.ScoreRequest(i, ctx, cont, self.scoring,
                                          content_seed(self.seed, context, continuation)))
    scores = {s.id: s.score for s in self.engine.score(reqs)}
    # Diffusion scores give no greedy-match signal; `is_greedy` is reported as False.
    return [(scores[i], False) for i in range(len(reqs))]

  def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
    raise NotImplementedError('illada_jax: rolling perplexity is not defined for this model')

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
