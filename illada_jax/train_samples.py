"""Samples of held-out prompts during training (`TrainConfig.eval_samples`).

Every `eval_every` steps the run completes the first `eval_samples` records
of `data.eval_paths` (else of `data.paths`, like the eval loss) with the
jitted sampler (`sampling.sample`: greedy, `eval_gen_length` tokens, one
token per step, low-confidence remasking) and logs prompt, completion and
reference as TensorBoard text and a `metrics.jsonl` line.

What a record gives:
* `prompt` / `response` fields (`data.prompt_key`, `data.response_key`):
  the prompt encoded as the SFT rows encode it (BOS when `data.add_bos`),
  the response as reference;
* `messages`: the turns before the last one, encoded by the checkpoint's
  prompt format (`prompts.PromptFormat.encode`, the sampler's `--chat`
  path), the last turn's content as reference;
* plain text (`data.text_key` or a string): the first half of its words as
  prompt, the rest as reference.
Prompts are cut from the left so that prompt + completion fit `max_len`.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np

from illada_jax import prompts
from illada_jax import sampling


def _split(record, cfg) -> tuple[Any, str]:
  """(prompt text or chat messages, reference text) of one record."""
  d = cfg.data
  if isinstance(record, dict) and 'messages' in record:
    msgs = list(record['messages'])
    return msgs[:-1], str(msgs[-1].get('content', ''))
  if isinstance(record, dict) and d.prompt_key in record:
    return str(record[d.prompt_key]), str(record.get(d.response_key, ''))
  text = record if isinstance(record, str) else str(record[d.text_key])
  words = text.split(' ')
  half = max(1, len(words) // 2)
  return ' '.join(words[:half]), ' '.join(words[half:])


class EvalSampler:
  """Prepared prompts of one run; `__call__(params)` samples them.

  Args:
    cfg: the run's `TrainConfig` (resolved: its tokenizer exists).
    mesh: the run's mesh; the batch is padded to a multiple of its
      data x fsdp size by repeating the last prompt (those rows are dropped).
  """

  def __init__(self, cfg, mesh):
    from illada_jax import data as data_lib
    self.cfg = cfg
    model, n = cfg.model, cfg.eval_samples
    self.tok = data_lib.text_tokenizer.load(cfg.data.tokenizer)
    fmt = data_lib.prompt_format(cfg.data)  # the format the SFT rows were rendered in
    records = data_lib.record_source(cfg.data.eval_paths or cfg.data.paths, cfg.data.format)
    self.options = sampling.SamplingOptions(gen_length=cfg.eval_gen_length,
                                            vocab_limit=self.tok.vocab_size)
    room = min(cfg.seq_len, model.max_len - cfg.eval_gen_length)
    if room <= 0:
      raise ValueError(f'eval_gen_length={cfg.eval_gen_length} leaves no room for a prompt '
                       f'before max_len={model.max_len}')
    self.prompts, self.references, rows = [], [], []
    for i in range(min(n, len(records))):
      prompt, reference = _split(records[i], cfg)
      chat = not isinstance(prompt, str)
      ids = fmt.encode(self.tok, model, prompt, chat=chat)[-room:]
      self.prompts.append(prompt if isinstance(prompt, str) else
                          fmt.render(self.tok, prompt, model.bos_token_id, model.eos_token_id))
      self.references.append(reference)
      rows.append(ids)
    shards = int(np.prod([mesh.shape[a] for a in ('data', 'fsdp') if a in mesh.shape]))
    self.ids_BP, self.mask_BP = prompts.left_pad(rows, model.pad_token_id, multiple=shards)

  def __call__(self, params) -> list[dict[str, str]]:
    """[{'prompt', 'completion', 'reference'}] of the prepared prompts under `params`."""
    out = sampling.sample(self.cfg.model, params, self.ids_BP, self.mask_BP, self.options,
                          seeds=np.arange(len(self.ids_BP)))
    tokens = out.tokens
    if jax.process_count() > 1:  # rows live on every process's devices: gather them all
      from jax.experimental import multihost_utils
      tokens = multihost_utils.process_allgather(tokens, tiled=True)
    gen = np.asarray(jax.device_get(tokens))[:, self.ids_BP.shape[1]:]
    return [{'prompt': p, 'completion': self.tok.decode(prompts.completion_ids(self.cfg.model, g)),
             'reference': r}
            for p, g, r in zip(self.prompts, gen, self.references)]


def as_markdown(sample: dict[str, str]) -> str:
  """One sample as TensorBoard text (markdown; code spans keep whitespace visible)."""
  return '\n\n'.join(f'**{k}**: `{sample[k]}`' for k in ('prompt', 'completion', 'reference'))

