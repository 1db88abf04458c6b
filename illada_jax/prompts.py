"""Prompts as the model was trained: the checkpoint's tokenizer and prompt format (SPEC §5).

A checkpoint directory records its prompt convention in the Hugging Face
tokenizer files: `add_bos_token` in `tokenizer_config.json` (BOS before a
plain prompt) and a chat template wherever transformers saves one
(`illada_jax.chat_template`). Converted checkpoints carry the files of their
source; checkpoints written by the training loop get them from
`PromptFormat.write`. Without a template, chat prompts use the LLaDA format:
`BOS`, then per message `<|start_header_id|>{role}<|end_header_id|>\\n\\n{content}<|eot_id|>`,
then the assistant header.

`PromptFormat.encode` is the one path from a prompt or chat to ids: the
sampler's `--chat`, chat SFT rows, the lm-eval adapter and the server all
call it (or `render` + `Tokenizer.encode_special`, which is what it does), so
the same messages give the same ids everywhere.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
import shutil
from typing import Sequence

import numpy as np

from illada_jax import chat_template, text_tokenizer
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
  """How prompt text and chat messages become model input (the one path for both).

  add_bos: BOS before a plain (non-chat) prompt, as in training.
  chat_template: a Jinja chat template, or None for the LLaDA format
    (`chat_template.LLADA_TEMPLATE`).
  special_tokens: `(name, text)` pairs the template sees as variables
    (`bos_token`, `eos_token`, ...), from the tokenizer files; a BOS / EOS the
    files do not name is the piece of the model's id.
  source: the file the template was read from (errors name it).
  """
  add_bos: bool = False
  chat_template: str | None = None
  special_tokens: tuple[tuple[str, str], ...] = ()
  source: str = dataclasses.field(default='', compare=False)

  @classmethod
  def from_checkpoint(cls, ckpt_dir: str | None, template_name: str | None = None
                      ) -> 'PromptFormat':
    """The format recorded in `ckpt_dir`'s tokenizer files; defaults where absent.

    The template is found as transformers finds it (`chat_template.find`:
    `chat_template.jinja`, `additional_chat_templates/`, `tokenizer_config.json`
    as a string or named list; `template_name` picks one, default 'default').
    Raises ValueError naming the file if one is not valid JSON / UTF-8 or the
    named template is missing.
    """
    if not ckpt_dir or not os.path.isdir(ckpt_dir):
      return cls()
    path = os.path.join(ckpt_dir, TOKENIZER_CONFIG)
    conf = chat_template.json_file(path) if os.path.isfile(path) else {}
    if not isinstance(conf, dict):
      raise ValueError(f'{path}: expected a JSON object')
    template, where = chat_template.find(ckpt_dir, template_name)
    return cls(add_bos=bool(conf.get('add_bos_token', False)), chat_template=template,
               special_tokens=tuple(sorted(chat_template.special_tokens(ckpt_dir).items())),
               source=where or '')

  def write(self, ckpt_dir: str, tokenizer_path: str | None = None) -> None:
    """Records this format (and copies the tokenizer file) into `ckpt_dir`.

    `add_bos_token` goes into `tokenizer_config.json` (its other keys kept);
    the template into `chat_template.jinja`, where transformers 5 saves it and
    where it takes precedence over a template in `tokenizer_config.json`.
    """
    path = os.path.join(ckpt_dir, TOKENIZER_CONFIG)
    conf = {}
    if os.path.exists(path):
      with open(path) as f:
        conf = json.load(f)
    conf['add_bos_token'] = self.add_bos
    with open(path + '.tmp', 'w') as f:
      json.dump(conf, f, indent=2)
    os.replace(path + '.tmp', path)
    if self.chat_template is not None:
      jinja = os.path.join(ckpt_dir, chat_template.TEMPLATE_FILE)
      with open(jinja + '.tmp', 'w', encoding='utf-8') as f:
        f.write(self.chat_template)
      os.replace(jinja + '.tmp', jinja)
    if tokenizer_path:
      src = os.path.join(tokenizer_path, 'tokenizer.json') if os.path.isdir(tokenizer_path) \
          else tokenizer_path
      shutil.copy2(src, os.path.join(ckpt_dir, os.path.basename(src)))

  def encode(self, tok, cfg: ModelConfig, prompt, *, chat: bool = False,
             add_generation_prompt: bool = True) -> list[int]:
    """Token ids of a prompt: a string, or a list of chat messages (implies chat).

    The one function every client calls (sampler, jobs, lm-eval adapter,
    server). A plain prompt: its text with special tokens written in it as
    their ids (`Tokenizer.encode_special`), BOS first if `add_bos` and the
    text did not already start with it. A chat: the rendered template
    (`render`) encoded the same way, BOS only where the template writes it.
    `add_generation_prompt=False` with a final assistant message continues
    that message (transformers' `continue_final_message`). Raises ValueError
    naming the template's file if it cannot render the messages.
    """
    if isinstance(prompt, str) and not chat:
      ids = tok.encode_special(prompt)
      if self.add_bos and cfg.bos_token_id is not None and ids[:1] != [cfg.bos_token_id]:
        ids = [cfg.bos_token_id] + ids
      return ids
    messages = [{'role': 'user', 'content': prompt}] if isinstance(prompt, str) else prompt
    return tok.encode_special(self.render(tok, messages, cfg.bos_token_id, cfg.eos_token_id,
                                          add_generation_prompt=add_generation_prompt))

  def render(self, tok, messages: Sequence[dict], bos_id: int | None = None,
             eos_id: int | None = None, *, add_generation_prompt: bool = True,
             close_final_message: bool = False) -> str:
    """The text of `messages` in this format (`encode_special` of it is the input).

    Without `add_generation_prompt`, a final assistant message is left open
    (continued) unless `close_final_message` (a finished conversation, as SFT
    rows render it); any other final message is closed.
    """
    cont = (not add_generation_prompt and not close_final_message and bool(messages)
            and messages[-1].get('role') == 'assistant')
    return chat_template.render(
        self.chat_template or chat_template.LLADA_TEMPLATE, messages,
        self.variables(tok, bos_id, eos_id), add_generation_prompt=add_generation_prompt,
        continue_final_message=cont, where=self.source or '<template>')

  def variables(self, tok, bos_id: int | None, eos_id: int | None) -> dict[str, str]:
    """The special-token variables of the template (class docstring)."""
    out = dict(self.special_tokens)
    for name, i in (('bos_token', bos_id), ('eos_token', eos_id)):
      if name not in out and i is not None:
        out[name] = tok.id_to_piece(i)
    return out


def chat_text(messages: Sequence[dict], bos_text: str = '', template: str | None = None,
              add_generation_prompt: bool = True) -> str:
  """The text of `messages` under `template` (None: the LLaDA format), BOS given as text."""
  return chat_template.render(template or chat_template.LLADA_TEMPLATE, messages,
                              {'bos_token': bos_text} if bos_text else {},
                              add_generation_prompt=add_generation_prompt)


def encode_pair(tok, context: str, continuation: str) -> tuple[list[int], list[int]]:
  """Context and continuation ids, split as lm-eval's reference models split them (SPEC §3).

  Trailing whitespace of the context moves to the start of the continuation;
  the whole string is encoded, and the continuation is what follows the
  context's own tokens (a token merged across the boundary counts as context).
  If that leaves the continuation empty (its text merged into the context's
  last token), the continuation is encoded alone. Special tokens written in
  the text are their ids (`encode_special`). No BOS is added here (the
  scorers' `add_bos` does that).
  """
  encode = getattr(tok, 'encode_special', tok.encode)
  n = len(context) - len(context.rstrip())
  if n:
    context, continuation = context[:-n], context[-n:] + continuation
  ctx = encode(context) if context else []
  whole = encode(context + continuation)
  cont = whole[len(ctx):]
  if not cont and continuation:
    cont = encode(continuation)
  return ctx, cont


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
  """Generated ids up to (excluding) the first end id (`cfg.end_token_ids`) or MASK."""
  out = []
  ends = {*cfg.end_token_ids, cfg.mask_token_id}
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
