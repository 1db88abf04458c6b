"""lm-evaluation-harness (0.4.x) model `illada_jax` (install the `eval` extra).

  python -m illada_jax.lm_eval_adapter --model illada_jax \\
      --model_args ckpt=DIR,method=confidence --tasks arc_challenge

(`python -m` registers the model, then runs lm-eval's own CLI.) Model args:
  ckpt             checkpoint directory (required); tokenizer read from it
  method           loglikelihood scorer: `mc` (default) or `confidence` (SPEC §3)
  mc_num, mc_batch Monte-Carlo samples and rows per round (128, 16); cfg_scale
  gen_length, block_length, steps, threshold, cache, variable_length,
  temperature  generate_until settings (max_gen_toks caps gen_length)
  batch_size       requests per compiled call; mesh  e.g. `data=2,fsdp=2,tensor=2`
"""

from __future__ import annotations

from lm_eval.api.model import LM
from lm_eval.api.registry import register_model

import illada_jax
from illada_jax import chat, sharding
from illada_jax.cli import sample as sample_cli
from illada_jax.cli import score as score_cli


def _bool(v) -> bool:
  return v if isinstance(v, bool) else str(v).lower() in ('1', 'true', 'yes')


@register_model('illada_jax')
class ILLaDAJax(LM):
  """`loglikelihood` by MC or confidence scoring; `generate_until` by the diffusion sampler."""

  def __init__(self, ckpt: str, method: str = 'mc', mc_num: int = 128, mc_batch: int = 16,
               cfg_scale: float = 0., gen_length: int = 256, block_length: int = 32,
               steps: int | None = None, threshold: float | None = None, cache: str | None = None,
               variable_length: bool = False, temperature: float = 0., batch_size: int = 8,
               mesh: str | None = None, tokenizer: str | None = None, seed: int = 0,
               params=None, cfg=None, **_):
    super().__init__()
    if method not in ('mc', 'confidence'):
      raise ValueError(f'illada_jax: method={method!r}, expected mc or confidence')
    if params is None:
      mesh_obj = sharding.make_mesh(mesh) if mesh else None
      cfg, params = illada_jax.load_checkpoint(ckpt, mesh=mesh_obj)
    self.cfg, self.params, self.ckpt = cfg, params, ckpt
    self.tok = chat.load_tokenizer(ckpt, tokenizer)
    self.method, self.mc_num, self.mc_batch = method, int(mc_num), int(mc_batch)
    self.cfg_scale, self.temperature = float(cfg_scale), float(temperature)
    self.gen_length, self.block_length = int(gen_length), int(block_length)
    self.steps = None if steps in (None, '', 'None') else int(steps)
    self.threshold = None if threshold in (None, '', 'None') else float(threshold)
    self.cache = None if cache in (None, '', 'None') else cache
    self.variable_length = _bool(variable_length)
    self.batch_size, self.seed = int(batch_size), int(seed)

  # -- scoring -------------------------------------------------------------------
  def _pairs(self, requests):
    pairs = []
    for req in requests:
      context, continuation = req.args[:2]
      # Whitespace belongs to the continuation in lm-eval; keep the split at the text boundary.
      ctx_ids = self.tok.encode(context) if context else []
      pairs.append((ctx_ids, self.tok.encode(continuation)))
    return pairs

  def loglikelihood(self, requests, disable_tqdm: bool = False):
    scores = score_cli.score_pairs(self.cfg, self.params, self._pairs(requests),
                                   method=self.method, mc_num=self.mc_num,
                                   batch_size=self.mc_batch, cfg_scale=self.cfg_scale,
                                   chunk=self.batch_size, seed=self.seed)
    # Diffusion scores give no greedy-match signal; `is_greedy` is reported as False.
    return [(float(s), False) for s in scores]

  def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
    raise NotImplementedError('illada_jax: rolling perplexity is not defined for this model')

  # -- generation ----------------------------------------------------------------
  def generate_until(self, requests, disable_tqdm: bool = False):
    out = []
    groups: dict = {}
    for i, req in enumerate(requests):  # one compiled program per generation setting
      context, gen_kwargs = req.args[:2]
      until = gen_kwargs.get('until', [])
      until = [until] if isinstance(until, str) else list(until)
      max_toks = int(gen_kwargs.get('max_gen_toks', self.gen_length))
      gen = min(self.gen_length, -(-max_toks // self.block_length) * self.block_length)
      groups.setdefault(gen, []).append((i, context, until))
    texts = [None] * len(requests)
    for gen, items in groups.items():
      block = min(self.block_length, gen)
      steps = self.steps or (block if self.variable_length else gen)
      if not self.variable_length:
        steps = max(gen // block, steps - steps % (gen // block))
      for lo in range(0, len(items), self.batch_size):
        part = items[lo:lo + self.batch_size]
        stops = sorted({s for _, _, until in part for s in until})
        records = sample_cli.sample_texts(
            self.cfg, self.params, self.tok, [c for _, c, _ in part], chat_mode=False,
            batch_size=len(part), stops=(), seed=self.seed, gen_length=gen,
            block_length=block, steps=steps, temperature=self.temperature,
            cfg_scale=self.cfg_scale, threshold=self.threshold, cache=self.cache,
            variable_length=self.variable_length,
            stop_ids=[self.tok.encode(s) for s in stops if s] if self.variable_length else [])
        for (i, _, until), rec in zip(part, records):
          texts[i] = chat.cut_at_stops(rec['completion'], until)
    out.extend(texts)
    return out

  def apply_chat_template(self, chat_history, add_generation_prompt: bool = True) -> str:
    bos = self.tok.id_to_piece(self.cfg.bos_token_id)
    return chat.chat_text(chat_history, bos, chat._template(self.ckpt))

  @property
  def tokenizer_name(self) -> str:
    return self.ckpt.rstrip('/').replace('/', '__')


def main():
  from lm_eval.__main__ import cli_evaluate
  cli_evaluate()


if __name__ == '__main__':
  main()
