"""Prompts as the model was trained: the checkpoint's tokenizer and prompt format (SPEC §5).

A checkpoint directory records its prompt convention in `tokenizer_config.json`
(the Hugging Face keys): `add_bos_token` (BOS before a plain prompt) and
`chat_template` (Jinja). Converted checkpoints carry the file of their source;
checkpoints written by the training loop get one from `PromptFormat.write`.
Without a template, chat prompts use the LLaDA format: `BOS`, then per
message `<|start_header_id|>{role}<|end_header_id|>\\n\\n{content}<|eot_id|>`,
then the assistant header.
"""

from __future__ import annotations

import dataclasses
import functools
import glob
import json
import os
import shutil
from typing import Sequence

import numpy as np

from illada_jax import text_tokenizer
from illada_jax.config import ModelConfig

TOKENIZER_CONFIG = 'tokenizer_config.json'


def load_tokenizer(ckpt_dir: str, override: str | None = None) -> text_tokenizer.Tokenizer:
  """The tokenizer at `override`, else the one stored in `ckpt_dir`.

  Raises FileNotFoundError naming the directory if it holds none.
  """
  if override:
    return text_tokenizer.load(override)
  if os.path.exists(os.path.join(ckpt_dir, 'tokenizer.json')):
    return text_tokenizer.load(ckpt_dir)
  models = sorted(glob.glob(os.path.join(ckpt_dir, '*.model')))
  if models:
    return text_tokenizer.load(models[0])
  raise FileNotFoundError(f'{ckpt_dir}: no tokenizer.json or SentencePiece .model; '
                          'pass --tokenizer')


@dataclasses.dataclass(frozen=True)
class PromptFormat:
  """How prompt text becomes model input.

  add_bos: BOS before a plain (non-chat) prompt, as in training.
  chat_template: a Jinja chat template, or None for the LLaDA format.
  """
  add_bos: bool = False
  chat_template: str | None = None

  @classmethod
  def from_checkpoint(cls, ckpt_dir: str | None) -> 'PromptFormat':
    """Reads `tokenizer_config.json` in `ckpt_dir`; defaults where it is absent.

    Raises ValueError naming the file if it is not a JSON object.
    """
    path = ckpt_dir and os.path.join(ckpt_dir, TOKENIZER_CONFIG)
    if not path or not os.path.exists(path):
      return cls()
    with open(path) as f:
      try:
        conf = json.load(f)
      except json.JSONDecodeError as e:
        raise ValueError(f'{path}: not valid JSON ({e})') from None
    if not isinstance(conf, dict):
      raise ValueError(f'{path}: expected a JSON object')
    template = conf.get('chat_template')
    return cls(add_bos=bool(conf.get('add_bos_token', False)),
               chat_template=template if isinstance(template, str) else None)

  def write(self, ckpt_dir: str, tokenizer_path: str | None = None) -> None:
    """Records this format (and copies the tokenizer file) into `ckpt_dir`.

    An existing `tokenizer_config.json` keeps its other keys.
    """
    path = os.path.join(ckpt_dir, TOKENIZER_CONFIG)
    conf = {}
    if os.path.exists(path):
      with open(path) as f:
        conf = json.load(f)
    conf['add_bos_token'] = self.add_bos
    if self.chat_template is not None:
      conf['chat_template'] = self.chat_template
    with open(path + '.tmp', 'w') as f:
      json.dump(conf, f, indent=2)
    os.replace(path + '.tmp', path)
    if tokenizer_path:
      src = os.path.join(tokenizer_path, 'tokenizer.json') if os.path.isdir(tokenizer_path) \
          else tokenizer_path
      shutil.copy2(src, os.path.join(ckpt_dir, os.path.basename(src)))

  def encode(self, tok, cfg: ModelConfig, prompt, *, chat: bool = False) -> list[int]:
    """Token ids of a prompt: a string, or a list of chat messages (implies chat)."""
    if isinstance(prompt, str) and not chat:
      ids = tok.encode(prompt)
      if self.add_bos and cfg.bos_token_id is not None and ids[:1] != [cfg.bos_token_id]:
        ids = [cfg.bos_token_id] + ids  # (text already rendered with BOS keeps one)
      return ids
    messages = [{'role': 'user', 'content': prompt}] if isinstance(prompt, str) else prompt
    return self.chat_ids(tok, cfg.bos_token_id, messages)

  def render_chat(self, tok, bos_id: int | None, messages: Sequence[dict], *,
                  add_generation_prompt: bool = True) -> tuple[list[int], str]:
    """(ids before the text, text) of `messages` in this format; ids + encode(text) is the input.

    With a template, BOS is the template's (its `bos_token`, as text) and the
    ids are empty; the LLaDA format puts the BOS id first instead (a
    SentencePiece BOS has no text that encodes to it).
    """
    if self.chat_template:
      bos_text = ''
      if 'bos_token' in self.chat_template and bos_id is not None:
        bos_text = tok.id_to_piece(bos_id)
      return [], chat_text(messages, bos_text, self.chat_template, add_generation_prompt)
    bos = [] if bos_id is None else [bos_id]
    return bos, chat_text(messages, add_generation_prompt=add_generation_prompt)

  def chat_ids(self, tok, bos_id: int | None, messages: Sequence[dict]) -> list[int]:
    """Token ids of the chat prompt of `messages`, ending in the assistant header.

    The one rendering shared by the sampler's `--chat` and chat SFT rows
    (`illada_jax.chat_data`), so a model is prompted as it was trained.
    """
    ids, text = self.render_chat(tok, bos_id, messages)
    return ids + tok.encode(text)


def chat_text(messages: Sequence[dict], bos_text: str = '', template: str | None = None,
              add_generation_prompt: bool = True) -> str:
  """The text of `messages` (dicts with `role`, `content`).

  With `add_generation_prompt` it ends in the assistant header (a prompt);
  without, it ends after the last message (a finished conversation).
  """
  if template:
    return _jinja(template).render(messages=list(messages), bos_token=bos_text,
                                   add_generation_prompt=add_generation_prompt)
  parts = [bos_text]
  for m in messages:
    parts.append(f"<|start_header_id|>{m['role']}<|end_header_id|>\n\n"
                 f"{m['content'].strip()}<|eot_id|>")
  if add_generation_prompt:
    parts.append('<|start_header_id|>assistant<|end_header_id|>\n\n')
  return ''.join(parts)


@functools.lru_cache(maxsize=8)
def _jinja(template: str):
  """The compiled template (compiled once: SFT renders it for every row).

  The environment is Hugging Face's for chat templates (trimmed blocks, and
  `raise_exception`, which many templates call on a conversation they refuse).
  """
  import jinja2
  env = jinja2.Environment(trim_blocks=True, lstrip_blocks=True)
  env.globals['raise_exception'] = _raise_template_error
  return env.from_string(template)


def _raise_template_error(message):
  raise ValueError(f'chat template: {message}')


def encode_pair(tok, context: str, continuation: str) -> tuple[list[int], list[int]]:
  """Context and continuation ids, split as lm-eval's reference models split them (SPEC §3).

  Trailing whitespace of the context moves to the start of the continuation;
  the whole string is encoded, and the continuation is what follows the
  context's own tokens (a token merged across the boundary counts as context).
  No BOS is added here (the scorers' `add_bos` does that).
  """
  n = len(context) - len(context.rstrip())
  if n:
    context, continuation = context[:-n], context[-n:] + continuation
  ctx = tok.encode(context) if context else []
  whole = tok.encode(context + continuation)
  return ctx, whole[len(ctx):]


def left_pad(rows: Sequence[Sequence[int]], pad_id: int, width: int | None = None,
             multiple: int = 1):
  """int32 `[B, P]` left-padded ids and bool `[B, P]` mask (True: real token).

  `P` is `width` or the longest row; `B` is rounded up to `multiple` by
  repeating the last row.
  """
  rows = list(rows)
  while len(rows) % multiple:
    rows.append(rows[-1])
  p = max(len(r) for r in rows) if width is None else width
  ids = np.full((len(rows), p), pad_id, np.int32)
  mask = np.zeros((len(rows), p), bool)
  for i, r in enumerate(rows):
    if len(r):
      ids[i, p - len(r):] = r
      mask[i, p - len(r):] = True
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
