"""Tokenizers for training: SentencePiece `.model` files and HF `tokenizer.json`.

`train_sentencepiece` builds a small model whose special ids follow the
iLLaDA layout (BOS 0, PAD 1, EOS 2, UNK 3, EOT 4, MASK 5), so small models
trained here share the 8B checkpoint's token-id conventions.
"""

from __future__ import annotations

import functools
import io
import os
import re
from typing import Iterable, Sequence

MASK_PIECE = '<|mdm_mask|>'
EOT_PIECE = '<|eot_id|>'


class Tokenizer:
  """`encode(str) -> list[int]`, `decode(ids) -> str` and the special ids."""

  def __init__(self, path: str):
    self.path = os.fspath(path)
    if self.path.endswith('.model'):
      import sentencepiece as spm
      self._sp = spm.SentencePieceProcessor(model_file=self.path)
      self._hf = None
      self.vocab_size = self._sp.get_piece_size()
      self.bos_id, self.eos_id, self.pad_id = self._sp.bos_id(), self._sp.eos_id(), self._sp.pad_id()
      self.mask_id = self._sp.piece_to_id(MASK_PIECE)
      if self.mask_id == self._sp.unk_id():
        self.mask_id = None
    else:
      from tokenizers import Tokenizer as HfTokenizer
      file = os.path.join(self.path, 'tokenizer.json') if os.path.isdir(self.path) else self.path
      self._hf = HfTokenizer.from_file(file)
      self._sp = None
      self.vocab_size = self._hf.get_vocab_size()
      tid = self._hf.token_to_id
      self.bos_id = _first(tid, ('<|begin_of_text|>', '<|startoftext|>', '<s>', '<bos>'))
      self.eos_id = _first(tid, ('<|endoftext|>', '<|end_of_text|>', '</s>', '<eos>', '<|eot_id|>'))
      self.pad_id = _first(tid, ('<pad>', '<|pad|>'))
      self.mask_id = _first(tid, ('<|mdm_mask|>', '<[MASK]>', '<mask>'))

  def encode(self, text: str) -> list[int]:
    """Ids of `text`. A `tokenizer.json` turns its added tokens written in the text into
    their ids; SentencePiece does so for user-defined pieces only (see `encode_special`)."""
    if self._sp is not None:
      return list(self._sp.encode(text))
    return list(self._hf.encode(text, add_special_tokens=False).ids)

  def encode_special(self, text: str) -> list[int]:
    """Ids of text that may spell special tokens (a rendered chat template, a prompt).

    Every special token written in the text becomes its id, as transformers'
    tokenizers do: for `tokenizer.json` this is `encode`; SentencePiece's
    control pieces (`<s>`, `</s>`, ...), which it would otherwise split into
    ordinary pieces, are cut out and the text between them encoded alone.
    """
    if self._sp is None or not self._control:
      return self.encode(text)
    ids, start = [], 0
    for m in self._control.finditer(text):
      if m.start() > start:
        ids += self._sp.encode(text[start:m.start()])
      ids.append(self._sp.piece_to_id(m.group()))
      start = m.end()
    if start < len(text):
      ids += self._sp.encode(text[start:])
    return ids

  @functools.cached_property
  def _control(self):
    """A regex of the SentencePiece control pieces (longest first), or None."""
    pieces = [self._sp.id_to_piece(i) for i in range(self.vocab_size) if self._sp.is_control(i)]
    pieces = sorted({p for p in pieces if p}, key=len, reverse=True)
    return re.compile('|'.join(map(re.escape, pieces))) if pieces else None

  def decode(self, ids: Sequence[int]) -> str:
    """Text of `ids`; ids the tokenizer does not know (padded embedding rows) are dropped."""
    ids = [int(i) for i in ids if 0 <= int(i) < self.vocab_size]
    if self._sp is not None:
      return self._sp.decode(ids)
    return self._hf.decode(ids, skip_special_tokens=False)

  def id_to_piece(self, i: int) -> str:
    if self._sp is not None:
      return self._sp.id_to_piece(int(i))
    return self._hf.id_to_token(int(i))

  def __getstate__(self):  # picklable for Grain worker processes: reload by path
    return {'path': self.path}

  def __setstate__(self, state):
    self.__init__(state['path'])


def _first(lookup, names):
  for n in names:
    i = lookup(n)
    if i is not None:
      return i
  return None


def load(path: str) -> Tokenizer:
  """A `.model` SentencePiece file, a `tokenizer.json`, or a directory holding one."""
  return Tokenizer(path)


def train_sentencepiece(texts: Iterable[str], model_prefix: str, vocab_size: int, *,
                        model_type: str = 'unigram', split_digits: bool = True,
                        add_dummy_prefix: bool = True,
                        user_symbols: Sequence[str] = ()) -> Tokenizer:
  """Trains a SentencePiece model on `texts`; writes `{model_prefix}.model`.

  Ids: BOS 0, PAD 1, EOS 2, UNK 3, EOT 4, MASK 5, then `user_symbols`, then
  learned pieces. Digits are split so numbers tokenize one digit per piece.
  Without `add_dummy_prefix` no '▁' is prepended to every encoded string
  (better for short structured strings such as `12+34=`).
  """
  import sentencepiece as spm
  os.makedirs(os.path.dirname(os.path.abspath(model_prefix)), exist_ok=True)
  model = io.BytesIO()
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(texts), model_writer=model, vocab_size=vocab_size,
      model_type=model_type, bos_id=0, pad_id=1, eos_id=2, unk_id=3,
      user_defined_symbols=[EOT_PIECE, MASK_PIECE, *user_symbols],
      split_digits=split_digits, add_dummy_prefix=add_dummy_prefix, character_coverage=1.0, hard_vocab_limit=False,
      minloglevel=2, num_threads=1)
  with open(model_prefix + '.model', 'wb') as f:
    f.write(model.getvalue())
  return Tokenizer(model_prefix + '.model')
