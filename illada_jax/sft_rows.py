"""SFT records -> rows `[prompt | response | EOS ... EOS]` (SPEC §4), for pairs and chats.

Two kinds of record (one file may hold both):

  pair: `{"prompt": str, "response": str}` -> one row
        `[BOS? prompt | response | EOS...]`; a pair longer than L loses the end
        of its response and gets no EOS (the text did not end there), counted
        as `responses_cut` and logged.
  chat: `{"messages": [{"role": "system" | "user" | "assistant", "content": str}, ...]}`
        -> one row per assistant turn (`DataConfig.chat_turns='all'`; `'last'`:
        the final one only), each with the conversation before it as prompt:
          prompt   = the chat prompt of the messages before the turn, ending in
                     the assistant header: the very ids `illada-sample --chat`
                     feeds the model (`PromptFormat.encode`), BOS as the
                     format gives it (`DataConfig.add_bos` is not applied);
          response = the text the format renders for the turn (its content, the
                     end-of-turn token and whatever the template puts after it,
                     e.g. `content<|eot_id|>`), tokenized on its own, as the
                     model generates it after the prompt;
        then EOS padding to L (the padding is response: masked and predicted).
        User or system turns after the last assistant turn give no row.

A chat row longer than L (`prompt + response > L`) follows `overlong`
(`DataConfig.chat_overlong`):
  'truncate' (default): the oldest prompt tokens are cut, the first one kept
      if it is BOS (so the row still starts as every prompt does); the
      response stays whole. If not even one prompt token besides BOS would
      remain, the row is dropped.
  'drop': the row is dropped.
A pair row (`prompt`/`response`) keeps its prompt and loses the end of a
response that does not fit, without an EOS (an EOS would teach the model to
stop mid-answer; the cut row still trains on the tokens it holds); a pair
whose prompt alone leaves no room for one response token is dropped. If the first `NO_ROW_LIMIT`
records give no row at all, the pipeline raises ValueError (it would
otherwise read the data forever without a batch).
Each outcome is counted (`SftCounts`): the first truncated, cut or dropped row is
logged with its file and line, then a summary each time the count doubles;
`illada_jax.data.sft_counts` returns the counts of a whole file set
without training.

Bad records raise ValueError naming the file and line: neither `messages`
nor a prompt/response pair, an empty or non-list `messages`, a message that
is not `{role, content}` with a string content, a role other than system /
user / assistant, a system message after the first, an assistant turn before
any user turn, no assistant turn at all, or a template that does not render
the conversation as its history followed by the turn.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, Sequence

import grain
import numpy as np

from illada_jax.prompts import PromptFormat

log = logging.getLogger(__name__)

ROLES = ('system', 'user', 'assistant')
OVERLONG = ('truncate', 'drop')
TURNS = ('all', 'last')


@dataclasses.dataclass
class SftCounts:
  """What the row rules did (mutable tallies; one per pipeline, in its own process).

  records: records read; rows: rows made (before drops); truncated: chat rows
  whose prompt lost its oldest tokens; prompt_tokens_cut: how many tokens in
  all; dropped: chat rows left out; responses_cut: pair rows whose response
  lost its end.
  """
  records: int = 0
  rows: int = 0
  truncated: int = 0
  prompt_tokens_cut: int = 0
  dropped: int = 0
  responses_cut: int = 0

  def summary(self) -> str:
    return (f'{self.rows} SFT rows from {self.records} records: {self.truncated} truncated '
            f'({self.prompt_tokens_cut} prompt tokens cut from the left), {self.dropped} '
            f'dropped, {self.responses_cut} pair responses cut at the end')


def sft_row(prompt_ids: Sequence[int], response_ids: Sequence[int], seq_len: int, eos_id: int,
            bos_id: int | None = None) -> dict[str, np.ndarray]:
  """`[BOS? prompt | response | EOS...]` of length L and its response mask (pair rule).

  tokens `[L]` int32; response_mask `[L]` int32, 1 on the response and its
  EOS padding. A response too long loses its end and gets no EOS (the row
  ends mid-response, as the text did not end there). Raises ValueError if
  the prompt alone does not leave room for one response token.
  """
  prompt = ([bos_id] if bos_id is not None else []) + list(prompt_ids)
  if len(prompt) >= seq_len:
    raise ValueError(f'SFT prompt of {len(prompt)} tokens does not fit seq_len={seq_len}')
  response = list(response_ids)
  response = response + [eos_id] if len(prompt) + len(response) < seq_len else \
      response[:seq_len - len(prompt)]
  return _row(prompt, response, seq_len, eos_id)


def _row(prompt: list[int], response: list[int], seq_len: int, eos_id: int):
  tokens = prompt + response
  tokens += [eos_id] * (seq_len - len(tokens))
  mask = np.zeros(seq_len, np.int32)
  mask[len(prompt):] = 1
  return {'tokens': np.asarray(tokens, np.int32), 'response_mask': mask}


def fit_chat_row(prompt: Sequence[int], response: Sequence[int], seq_len: int, eos_id: int,
                 bos_id: int | None, overlong: str = 'truncate'
                 ) -> tuple[dict[str, np.ndarray] | None, int]:
  """The row of one chat turn under the over-length rule (module docstring).

  Returns (row or None if dropped, prompt tokens cut). The row is as
  `sft_row`'s: tokens `[L]` int32, response_mask `[L]` int32.
  """
  prompt, response = list(prompt), list(response)
  cut = len(prompt) + len(response) - seq_len
  if cut <= 0:
    return _row(prompt, response, seq_len, eos_id), 0
  head = 1 if prompt[:1] == [bos_id] and bos_id is not None else 0
  if overlong == 'drop' or len(prompt) - head - cut < 1:
    return None, 0
  return _row(prompt[:head] + prompt[head + cut:], response, seq_len, eos_id), cut


def check_messages(messages: Any, where: str) -> list[dict]:
  """The messages of a chat record, checked (see the module docstring for the rules).

  Raises ValueError starting with `where` (file and line).
  """
  if not isinstance(messages, list) or not messages:
    raise ValueError(f'{where}: "messages" must be a non-empty list of '
                     f'{{"role", "content"}} objects, got {_short(messages)}')
  seen_user = seen_assistant = False
  for i, m in enumerate(messages):
    if not isinstance(m, dict) or 'role' not in m or 'content' not in m:
      raise ValueError(f'{where}: message {i} must be an object with "role" and "content", '
                       f'got {_short(m)}')
    role, content = m['role'], m['content']
    if role not in ROLES:
      raise ValueError(f'{where}: message {i} has role {role!r}; use one of {", ".join(ROLES)}')
    if not isinstance(content, str):
      raise ValueError(f'{where}: message {i} ({role}) content must be a string, '
                       f'got {type(content).__name__}')
    if role == 'system' and i > 0:
      raise ValueError(f'{where}: message {i} is a system message; only the first may be')
    if role == 'assistant' and not seen_user:
      raise ValueError(f'{where}: message {i} is an assistant turn with no user turn before it')
    seen_user |= role == 'user'
    seen_assistant |= role == 'assistant'
  if not seen_assistant:
    raise ValueError(f'{where}: the conversation has no assistant turn (nothing to train on)')
  return messages


def chat_turns(fmt: PromptFormat, tok, bos_id: int | None, messages: Sequence[dict],
               where: str = '<messages>', turns: str = 'all', eos_id: int | None = None
               ) -> list[tuple[list[int], list[int]]]:
  """(prompt ids, response ids) of each assistant turn of `messages` (module docstring).

  The prompt is `fmt.render` of the history with the generation prompt,
  encoded by `Tokenizer.encode_special`: the ids `PromptFormat.encode` gives
  the sampler for the same messages. Raises ValueError naming `where` for a
  bad conversation, or if the format does not render history + turn as the
  history's prompt followed by more text.
  """
  messages = check_messages(messages, where)
  index = [i for i, m in enumerate(messages) if m['role'] == 'assistant']
  if turns == 'last':
    index = index[-1:]
  out = []
  for i in index:
    try:
      prompt_text = fmt.render(tok, messages[:i], bos_id, eos_id)
      full_text = fmt.render(tok, messages[:i + 1], bos_id, eos_id, add_generation_prompt=False,
                             close_final_message=True)
    except ValueError as e:
      raise ValueError(f'{where}: rendering message {i}: {e}') from None
    if not full_text.startswith(prompt_text):
      raise ValueError(f'{where}: the chat template does not render message {i} as a '
                       f'continuation of the prompt before it, so its reply cannot be '
                       f'split off (prompt ends {prompt_text[-40:]!r})')
    out.append((tok.encode_special(prompt_text),
                tok.encode_special(full_text[len(prompt_text):])))
  return out


# Records read with every row dropped before the pipeline gives up (`SftRows`).
NO_ROW_LIMIT = 4096


class SftRows(grain.experimental.FlatMapTransform):
  """Located record `(where, record)` -> its SFT rows (0 or more), tallied in `counts`."""

  max_fan_out = 1 << 16  # not used by FlatMapIterDataset; required by the interface

  def __init__(self, tok, fmt: PromptFormat, *, seq_len: int, bos_id: int | None,
               eos_id: int, add_bos: bool, prompt_key: str = 'prompt',
               response_key: str = 'response', messages_key: str = 'messages',
               turns: str = 'all', overlong: str = 'truncate',
               counts: SftCounts | None = None):
    if overlong not in OVERLONG:
      raise ValueError(f'data.chat_overlong={overlong!r}; use one of {OVERLONG}')
    if turns not in TURNS:
      raise ValueError(f'data.chat_turns={turns!r}; use one of {TURNS}')
    self.tok, self.fmt, self.seq_len = tok, fmt, seq_len
    self.bos_id, self.eos_id, self.add_bos = bos_id, eos_id, add_bos
    self.keys = (prompt_key, response_key, messages_key)
    self.turns, self.overlong = turns, overlong
    self.counts = SftCounts() if counts is None else counts
    self._next_report = {'truncated': 1, 'dropped': 1, 'responses_cut': 1}

  def flat_map(self, element):
    where, record = element
    prompt_key, response_key, messages_key = self.keys
    c = self.counts
    c.records += 1
    if isinstance(record, dict) and messages_key in record:
      rows = []
      for prompt, response in chat_turns(self.fmt, self.tok, self.bos_id, record[messages_key],
                                         where, self.turns, self.eos_id):
        c.rows += 1
        row, cut = fit_chat_row(prompt, response, self.seq_len, self.eos_id, self.bos_id,
                                self.overlong)
        if row is None:
          c.dropped += 1
          self._report('dropped', where, f'{len(prompt)} + {len(response)} tokens')
          self._check_some_fit()
          continue
        if cut:
          c.truncated += 1
          c.prompt_tokens_cut += cut
          self._report('truncated', where, f'{cut} prompt tokens cut')
        rows.append(row)
      return rows
    if not (isinstance(record, dict) and prompt_key in record and response_key in record):
      raise ValueError(f'{where}: an SFT record needs "{messages_key}" or "{prompt_key}" and '
                       f'"{response_key}", got {_short(record)}')
    prompt = self.tok.encode(str(record[prompt_key]))
    response = self.tok.encode(str(record[response_key]))
    bos = self.bos_id if self.add_bos else None
    c.rows += 1
    if len(prompt) + (bos is not None) >= self.seq_len:  # not one response token fits
      c.dropped += 1
      self._report('dropped', where, f'pair prompt of {len(prompt)} tokens')
      self._check_some_fit()
      return []
    if len(prompt) + (bos is not None) + len(response) + 1 > self.seq_len:  # no room for EOS
      c.responses_cut += 1
      self._report('responses_cut', where, f'pair response of {len(response)} tokens cut '
                   f'(no EOS added)')
    return [sft_row(prompt, response, self.seq_len, self.eos_id, bos)]

  def _check_some_fit(self):
    # Every row dropped would make the pipeline loop over the data forever without a batch.
    c = self.counts
    if c.dropped == c.rows and c.records >= NO_ROW_LIMIT:
      raise ValueError(f'no SFT row fits seq_len={self.seq_len} in the first {c.records} '
                       f'records ({c.summary()}): raise seq_len or shorten the data')

  def _report(self, what: str, where: str, detail: str):
    n = getattr(self.counts, what)
    if n == 1:
      log.warning('SFT row %s (over seq_len=%d, data.chat_overlong=%r): %s, %s', what, self.seq_len,
                  self.overlong, where, detail)
    if n >= self._next_report[what]:
      self._next_report[what] = 2 * n
      log.warning('SFT rows so far: %s', self.counts.summary())


def _short(x) -> str:
  s = repr(x)
  return s if len(s) <= 80 else s[:77] + '...'
