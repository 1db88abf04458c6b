"""A checkpoint's tokenizer, the chat format (SPEC §5), prompt batching and text cut-off.

`load_tokenizer(ckpt_dir)` finds `tokenizer.json` (HF `tokenizers`) or a
SentencePiece `.model` next to the weights (`text_tokenizer.Tokenizer`).
`chat_ids` renders messages with the checkpoint's Jinja `chat_template` from
`tokenizer_config.json` when there is one, else with the LLaDA format:
`BOS`, per message `<|start_header_id|>{role}<|end_header_id|>\\n\\n{content}<|eot_id|>`,
then the assistant header.
"""

from __future__ import annotations

import glob
import json
import os
from typing import Sequence

import numpy as np

from illada_jax import text_tokenizer
from illada_jax.config import ModelConfig


def load_tokenizer(ckpt_dir: str, override: str | None = None) -> text_tokenizer.Tokenizer:
  """The tokenizer at `override`, else the one stored in `ckpt_dir`."""
  if override:
    return text_tokenizer.load(override)
  if os.path.exists(os.path.join(ckpt_dir, 'tokenizer.json')):
    return text_tokenizer.load(ckpt_dir)
  models = sorted(glob.glob(os.path.join(ckpt_dir, '*.model')))
  if models:
    return text_tokenizer.load(models[0])
  raise FileNotFoundError(f'{ckpt_dir}: no tokenizer.json or SentencePiece .model; '
                          'pass --tokenizer')


def _template(ckpt_dir: str | None) -> str | None:
  path = ckpt_dir and os.path.join(ckpt_dir, 'tokenizer_config.json')
  if path and os.path.exists(path):
    with open(path) as f:
      template = json.load(f).get('chat_template')
    return template if isinstance(template, str) else None
  return None


def chat_text(messages: Sequence[dict], bos_text: str = '', template: str | None = None) -> str:
  """The prompt text of `messages` (dicts with `role`, `content`), ending in the assistant header."""
  if template:
    import jinja2
    env = jinja2.Environment(trim_blocks=True, lstrip_blocks=True)
    return env.from_string(template).render(messages=list(messages), bos_token=bos_text,
                                            add_generation_prompt=True)
  parts = [bos_text]
  for m in messages:
    parts.append(f"<|start_header_id|>{m['role']}<|end_header_id|>\n\n"
                 f"{m['content'].strip()}<|eot_id|>")
  parts.append('<|start_header_id|>assistant<|end_header_id|>\n\n')
  return ''.join(parts)


def prompt_ids(tok, cfg: ModelConfig, prompt, *, chat: bool, ckpt_dir: str | None = None,
               add_bos: bool = False) -> list[int]:
  """Token ids of a prompt: a string, or a list of chat messages (implies chat)."""
  if isinstance(prompt, str) and not chat:
    return ([cfg.bos_token_id] if add_bos else []) + tok.encode(prompt)
  messages = [{'role': 'user', 'content': prompt}] if isinstance(prompt, str) else prompt
  template = _template(ckpt_dir)
  if template:
    bos_text = tok.id_to_piece(cfg.bos_token_id) if template and 'bos_token' in template else ''
    return tok.encode(chat_text(messages, bos_text, template))
  return [cfg.bos_token_id] + tok.encode(chat_text(messages))


def left_pad(rows: Sequence[Sequence[int]], pad_id: int, multiple: int = 1):
  """int32 `[B, P]` left-padded ids and `[B, P]` mask; B rounded up to `multiple` by repeating."""
  rows = list(rows)
  while len(rows) % multiple:
    rows.append(rows[-1])
  p = max(len(r) for r in rows)
  ids = np.full((len(rows), p), pad_id, np.int32)
  mask = np.zeros((len(rows), p), np.int32)
  for i, r in enumerate(rows):
    if r:
      ids[i, p - len(r):] = r
      mask[i, p - len(r):] = 1
  return ids, mask


def completion_ids(cfg: ModelConfig, gen_ids: Sequence[int]) -> list[int]:
  """Generated ids up to (excluding) the first EOS/EOT/MASK."""
  out = []
  ends = {cfg.eos_token_id, cfg.eot_token_id, cfg.mask_token_id} - {None}
  for t in gen_ids:
    if int(t) in ends:
      break
    out.append(int(t))
  return out


def cut_at_stops(text: str, stops: Sequence[str]) -> str:
  """`text` up to the earliest occurrence of any stop string."""
  cut = len(text)
  for s in stops:
    if s:
      i = text.find(s)
      if i >= 0:
        cut = min(cut, i)
  return text[:cut]
