"""lm-evaluation-harness (0.4.x) model `illada_jax` (install the `eval` extra).

  python -m illada_jax.lm_eval_adapter --model illada_jax \\
      --model_args ckpt=DIR,score_preset=illada_confidence --tasks arc_challenge
  python -m illada_jax.lm_eval_adapter --model illada_jax --apply_chat_template \\
      --model_args ckpt=DIR,preset=illada_instruct --tasks gsm8k

(`python -m` registers the model, then runs lm-eval's own CLI.) Model args:
  ckpt             checkpoint directory (required: a missing one is a one-line error);
                   tokenizer and prompt format read from it
  any field of `illada_jax.ScoringOptions`: loglikelihood settings. method `mc` (default)
                   or `confidence`; mc_num, mc_batch (128, 16); add_bos (default: the
                   checkpoint's add_bos_token), padd_eos; check_greedy (default here: true,
                   lm-eval's is_greedy by suffix greedy prediction, `l` more passes per
                   request; false reports False); rolling_window (loglikelihood_rolling)
  score_preset     named ScoringOptions from configs/scoring.py, e.g. `illada_confidence`
  any field of `illada_jax.SamplingOptions` (gen_length, block_length, steps, threshold,
                   cache, variable_length, temperature, end_think, end_think_boost,
                   end_think_power, ...): generate_until settings (defaults here:
                   gen_length=256 in blocks of 32, both halved until two blocks fit
                   max_len: `default_lengths`)
  preset           named SamplingOptions from configs/sampling.py, e.g. `illada_instruct`
  cfg_scale        classifier-free guidance, for scoring and generation
  mesh             e.g. `fsdp=4`
  quantize         `int8` (or `int8_head`): int8 weights through qwix (illada_jax.quant),
                   quantized at load unless the checkpoint holds them already
lm-eval's own `--batch_size N` sets the engine's slots (requests denoised or scored at once).
Args given beside a preset override its fields. Every request type runs through
the engine (`illada_jax.engine`): results do not depend on the batch size, and
each generation request keeps its own `until` strings and `max_gen_toks`.

`generate_until` follows lm-eval's HF model (`lm_eval.models.huggingface`):
  - a task's `do_sample` / `temperature` set the request's temperature (the
    engine's per-request temperature; `request_temperature`);
  - `repeats: k` copies draw independently: copy j seeds from the request's
    content and j (`repeat_seed`; copy 0 as without repeats), so reruns repeat;
  - `max_gen_toks` is honoured up to the model's window: the canvas is
    `gen_length` or the task's length rounded up to whole blocks, whichever is
    larger (`fit_generation`), and the completion is cut to `max_gen_toks`;
  - a context that does not fit beside the canvas loses its oldest tokens,
    with a warning (never a failed call); loglikelihood requests likewise;
  - `--apply_chat_template` renders the checkpoint's template as transformers
    does, a final assistant message continued when lm-eval asks for no
    generation prompt; the rendered context gets the ids `PromptFormat.encode`
    gives the messages (`apply_chat_template`).
`loglikelihood` splits context and continuation as lm-eval does
(`prompts.encode_pair`), encoding the continuation alone where the joint
encoding leaves it empty.

`loglikelihood_rolling` (perplexity tasks) sums, over windows of at most
`max_len` tokens, the Monte-Carlo estimate of each window's log-likelihood with
an empty prompt (SPEC §3). That estimate is an ELBO: the NLL it implies, and
so the word/byte perplexities lm-eval reports, are UPPER BOUNDS on the model's.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import logging
import os
import zlib
from typing import Mapping

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
log = logging.getLogger(__name__)


def content_seed(seed: int, *parts) -> int:
  """A request's random stream from its own content: the same request, the same draws."""
  return zlib.crc32(json.dumps([seed, *parts]).encode())


def repeat_seed(seed: int, context: str, repeat: int) -> int:
  """The seed of the `repeat`-th copy of a generation request (lm-eval's `repeats`).

  Copy 0 keeps the request's content seed, so a task without repeats draws as
  before; copy k > 0 adds k to the content, so the copies draw independently
  and a rerun draws the same again.
  """
  return content_seed(seed, context) if repeat == 0 else content_seed(seed, context, repeat)


def request_temperature(default: float, gen_kwargs: Mapping) -> float:
  """The temperature of one request as lm-eval's HF model reads `generation_kwargs`.

  `do_sample: false` is greedy (0) whatever the temperature; `temperature: 0`
  is greedy; `do_sample: true` without a temperature samples at 1.0 (the HF
  default) unless the model args set one; neither given: the model args'.
  """
  do_sample = gen_kwargs.get('do_sample')
  temp = float(gen_kwargs['temperature']) if gen_kwargs.get('temperature') is not None \
      else default
  if do_sample is False or str(do_sample).lower() == 'false':
    return 0.
  if do_sample in (True, 'true', 'True') and gen_kwargs.get('temperature') is None and temp == 0:
    return 1.
  return temp


def default_lengths(max_len: int) -> dict:
  """Generation defaults without a preset: 256 tokens in blocks of 32, fitted to `max_len`
  (whole blocks, at least one prompt token)."""
  block = 32
  while block > 1 and 2 * block > max_len - 1:  # room for two blocks, when there is any
    block //= 2
  return {'gen_length': max(block, min(256, max_len - 1) // block * block),
          'block_length': block}


def fit_generation(options: SamplingOptions, max_len: int, prompt_len: int,
                   max_gen_toks: int | None) -> tuple[SamplingOptions, int]:
  """(options for one request, prompt tokens to keep from the end).

  The canvas is `options.gen_length` or, if larger, `max_gen_toks` rounded up
  to whole blocks: `gen_length` is a default, not a cap. It never exceeds the
  model's window less one prompt token; a prompt that does not fit beside it
  shrinks the canvas toward what the task asks (`max_gen_toks`, else
  `gen_length`, in whole blocks),
  then loses its oldest tokens, as lm-eval's HF model left-truncates. Fixed-
  length sampling keeps its steps per block. Raises ValueError if one block
  does not fit `max_len`.
  """
  w = options.block_length
  room = (max_len - 1) // w * w
  if room <= 0:
    raise ValueError(f'illada_jax: block_length={w} leaves no room for a prompt in '
                     f'max_len {max_len}')
  want = min(-(-(max_gen_toks or options.gen_length) // w) * w, room)
  gen = min(max(options.gen_length, want), room)
  if prompt_len + gen > max_len:
    gen = max(want, w, (max_len - prompt_len) // w * w)
  steps = options.steps
  if not options.variable_length:
    steps = options.steps // options.num_blocks * (gen // w)
  return options.replace(gen_length=gen, steps=steps), min(prompt_len, max_len - gen)


def _fields(options) -> dict:
  return {f.name: getattr(options, f.name) for f in dataclasses.fields(options)}


@register_model('illada_jax')
class ILLaDAJax(LM):
  """`loglikelihood` by MC or confidence scoring (with `is_greedy`), `loglikelihood_rolling`
  by the windowed MC bound, `generate_until` by the diffusion sampler."""

  def __init__(self, ckpt: str | None = None, batch_size: int | str = 32, mesh: str | None = None,
               tokenizer: str | None = None, seed: int = 0, preset: str | None = None,
               score_preset: str | None = None, params=None, cfg=None,
               quantize: str | None = None, **kwargs):
    super().__init__()
    unknown = sorted(set(kwargs) - _SAMPLING - _SCORING - _LM_EVAL_ARGS)
    if unknown:
      raise ValueError(f'illada_jax: unknown model args {unknown}')
    if params is None and not ckpt:
      raise ValueError('illada_jax: model_args needs ckpt=DIR (a checkpoint directory, e.g. '
                       'one written by illada-convert hf-to-orbax)')
    if params is None and not os.path.isdir(ckpt):
      raise ValueError(f'illada_jax: ckpt={ckpt} is not a directory')
    if params is None:
      mesh_obj = sharding.make_mesh(mesh) if mesh else None
      cfg, params = illada_jax.load_checkpoint(ckpt, mesh=mesh_obj, quantize=quantize)
    sampling_args = (_fields(illada_jax.sampling_preset(preset)) if preset
                     else default_lengths(cfg.max_len))
    sampling_args.update({k: v for k, v in kwargs.items() if k in _SAMPLING})
    self.options = from_strings(SamplingOptions, sampling_args)
    # is_greedy is computed unless the model args turn it off, with or without a preset.
    scoring_args = dict(_fields(illada_jax.scoring_preset(score_preset)) if score_preset else {},
                        check_greedy=True)
    scoring_args.update({k: v for k, v in kwargs.items() if k in _SCORING})
    scoring_opts = from_strings(ScoringOptions, scoring_args)
    self.cfg, self.params, self.ckpt, self.seed = cfg, params, ckpt, int(seed)
    self.tok = prompts.load_tokenizer(ckpt, tokenizer)
    self.fmt = prompts.PromptFormat.from_checkpoint(ckpt)
    self._chat_texts: set[str] = set()  # contexts apply_chat_template rendered
    if scoring_opts.add_bos is None:  # as the harness's tokenizer call: the checkpoint decides
      scoring_opts = scoring_opts.replace(add_bos=self.fmt.add_bos)
    self.scoring = scoring_opts
    slots = 32 if str(batch_size).startswith('auto') else int(batch_size)
    self.engine = engine_lib.Engine(cfg, params, tokenizer=self.tok, slots=slots)

  # -- scoring -------------------------------------------------------------------
  def loglikelihood(self, requests, disable_tqdm: bool = False):
    """`(log-likelihood estimate, is_greedy)` per `(context, continuation)` request."""
    reqs = []
    prefix, suffix = scoring.affixes(self.cfg, self.scoring.add_bos, self.scoring.padd_eos)
    room = self.cfg.max_len - len(prefix) - len(suffix)
    for i, req in enumerate(requests):
      context, continuation = req.args[:2]
      ctx, cont = prompts.encode_pair(self.tok, context, continuation)
      if len(ctx) + len(cont) > room:  # lm-eval's HF model keeps the last tokens too
        log.warning('illada_jax: loglikelihood request %d: %d + %d tokens cut to the last %d',
                    i, len(ctx), len(cont), room)
        cont = cont[-room:]
        ctx = ctx[len(ctx) - (room - len(cont)):] if room > len(cont) else []
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
    """Texts of `(context, gen_kwargs)` requests with lm-eval's HF-model semantics (module
    docstring): `until`, `max_gen_toks`, `do_sample` / `temperature`, repeats, truncation."""
    reqs, seen = [], collections.Counter()
    for i, req in enumerate(requests):
      context, gen_kwargs = req.args[:2]
      gen_kwargs = dict(gen_kwargs or {})
      until = gen_kwargs.get('until') or []
      until = (until,) if isinstance(until, str) else tuple(until)
      max_toks = gen_kwargs.get('max_gen_toks')
      max_toks = None if max_toks is None else int(max_toks)
      ids = self._context_ids(context)
      options, keep = fit_generation(self.options, self.cfg.max_len, len(ids), max_toks)
      if keep < len(ids):
        log.warning('illada_jax: request %d: context of %d tokens cut to its last %d '
                    '(max_len %d less %d generated)', i, len(ids), keep, self.cfg.max_len,
                    options.gen_length)
        ids = ids[len(ids) - keep:]
      options = options.replace(temperature=request_temperature(options.temperature, gen_kwargs))
      key = (context, json.dumps(gen_kwargs, sort_keys=True, default=str))
      repeat, seen[key] = seen[key], seen[key] + 1
      reqs.append(engine_lib.Request(
          id=i, prompt_ids=tuple(ids), options=options, stop=until, max_new_tokens=max_toks,
          seed=repeat_seed(self.seed, context, repeat)))
    texts = {c.id: c.text for c in self.engine.generate(reqs)}
    return [texts[i] for i in range(len(reqs))]

  def apply_chat_template(self, chat_history, add_generation_prompt: bool = True) -> str:
    """The checkpoint's template rendered as transformers renders it (`PromptFormat.render`).

    Without `add_generation_prompt` a final assistant message is continued
    (lm-eval's HF model passes `continue_final_message` so). The text is
    remembered: a request whose context is this text gets the very ids
    `PromptFormat.encode` gives the messages (no BOS added beside the template's).
    """
    text = self.fmt.render(self.tok, chat_history, self.cfg.bos_token_id,
                           self.cfg.eos_token_id, add_generation_prompt=add_generation_prompt)
    self._chat_texts.add(text)
    return text

  def _context_ids(self, context: str) -> list[int]:
    if context in self._chat_texts:
      return self.tok.encode_special(context)
    return self.fmt.encode(self.tok, self.cfg, context)

  @property
  def tokenizer_name(self) -> str:
    return self.ckpt.rstrip('/').replace('/', '__')


def main():
  from lm_eval.__main__ import cli_evaluate
  cli_evaluate()


if __name__ == '__main__':
  main()
