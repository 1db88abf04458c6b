"""A checkpoint's special token ids: `config.json`, then the tokenizer files beside it (SPEC §1).

`resolve` gives mask / BOS / EOS / PAD / EOT ids in this order of sources:

1. `config.json` (`mask_token_id`, `bos_token_id`, ...);
2. the tokenizer files in the same directory: the role's token text from
   `tokenizer_config.json`, then `special_tokens_map.json` (`mask_token`,
   `bos_token`, `eos_token`, `pad_token`), or for mask and EOT a known text
   (`KNOWN_TEXTS`), looked up among the added tokens of
   `tokenizer_config.json` (`added_tokens_decoder`) and `tokenizer.json`
   (`added_tokens`, then the model vocabulary);
3. the published 8B ids (`FALLBACK_8B`), only for a checkpoint of that
   family with exactly that vocabulary: 126336, LLaDA's mask, is an
   ordinary token of iLLaDA's vocabulary.

A missing mask or EOS id raises ValueError saying where it was looked for;
a missing PAD is the EOS (as in LLaDA); a missing BOS or EOT is None.

Every EOS id a checkpoint declares ends a request (`ModelConfig.end_token_ids`):
`eos_token_id` of `config.json` (an int or a list: its first is THE EOS, used
for padding), of `generation_config.json` beside it, and the tokenizer's own
EOS token; the ones besides the EOS become `extra_eos_token_ids`.
"""

from __future__ import annotations

import json
import os
from typing import Any, Mapping

FIELDS = ('mask_token_id', 'bos_token_id', 'eos_token_id', 'pad_token_id', 'eot_token_id')
TOKENIZER_FILES = ('tokenizer_config.json', 'special_tokens_map.json', 'tokenizer.json')
GENERATION_CONFIG = 'generation_config.json'
_ROLES = {'mask_token_id': 'mask_token', 'bos_token_id': 'bos_token',
          'eos_token_id': 'eos_token', 'pad_token_id': 'pad_token'}
# Token texts that mean a role in the published tokenizers, whatever the maps say.
KNOWN_TEXTS = {'mask_token_id': ('<|mdm_mask|>', '<[MASK]>'), 'eot_token_id': ('<|eot_id|>',)}
# (family, vocabulary) -> ids of the published 8B checkpoints (SPEC §1 table).
FALLBACK_8B = {
    ('illada', 155136): {'mask_token_id': 5, 'bos_token_id': 0, 'eos_token_id': 2,
                         'pad_token_id': 1, 'eot_token_id': None},
    ('llada', 126464): {'mask_token_id': 126336, 'bos_token_id': 126080,
                        'eos_token_id': 126081, 'pad_token_id': 126081,
                        'eot_token_id': 126348},
}


def _first_id(v) -> int | None:
  """`eos_token_id` may be an int or a list of ints; the first is the EOS."""
  if isinstance(v, (list, tuple)):
    return int(v[0]) if v else None
  return None if v is None else int(v)


def _text(v) -> str | None:
  """A special-token entry: a string, or a dict with 'content' (HF's AddedToken)."""
  if isinstance(v, Mapping):
    v = v.get('content')
  return v if isinstance(v, str) else None


def _load(path: str) -> dict[str, Any] | None:
  if not os.path.isfile(path):
    return None
  try:
    with open(path) as f:
      obj = json.load(f)
  except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
    raise ValueError(f'{path}: not valid JSON ({e})') from None
  return obj if isinstance(obj, dict) else {}


def from_tokenizer_files(directory: str | os.PathLike) -> dict[str, int]:
  """`{field: id}` of the roles the tokenizer files in `directory` name (see module docstring)."""
  files = {name: _load(os.path.join(directory, name)) for name in TOKENIZER_FILES}
  ids: dict[str, int] = {}  # token text -> id
  tok_json = files['tokenizer.json'] or {}
  vocab = (tok_json.get('model') or {}).get('vocab')
  if isinstance(vocab, Mapping):
    ids.update({t: int(i) for t, i in vocab.items() if isinstance(i, int)})
  for entry in tok_json.get('added_tokens') or []:
    if isinstance(entry, Mapping) and _text(entry) is not None and 'id' in entry:
      ids[_text(entry)] = int(entry['id'])
  decoder = (files['tokenizer_config.json'] or {}).get('added_tokens_decoder') or {}
  for i, entry in decoder.items():
    if _text(entry) is not None:
      ids[_text(entry)] = int(i)
  found = {}
  for field in FIELDS:
    role = _ROLES.get(field)
    texts = [_text((files[name] or {}).get(role)) if role else None
             for name in ('tokenizer_config.json', 'special_tokens_map.json')]
    for text in [t for t in texts if t is not None] + list(KNOWN_TEXTS.get(field, ())):
      if text in ids:
        found[field] = ids[text]
        break
  return found


def _id_list(v) -> list[int]:
  if isinstance(v, (list, tuple)):
    return [int(i) for i in v]
  return [] if v is None else [int(v)]


def resolve(hf: Mapping[str, Any], family: str, vocab_size: int,
            tokenizer_dir: str | os.PathLike | None) -> dict[str, Any]:
  """The five ids of a checkpoint from its `config.json` dict `hf` and `tokenizer_dir`,
  and `extra_eos_token_ids`: every other EOS id it declares (module docstring)."""
  out = {f: _first_id(hf.get(f)) for f in FIELDS}
  eos_ids = _id_list(hf.get('eos_token_id'))
  if tokenizer_dir is not None:
    gen_path = os.path.join(tokenizer_dir, GENERATION_CONFIG)
    eos_ids += _id_list((_load(gen_path) or {}).get('eos_token_id'))
    from_files = from_tokenizer_files(tokenizer_dir)
    if 'eos_token_id' in from_files:
      eos_ids.append(from_files['eos_token_id'])
    if out['eos_token_id'] is None and eos_ids:
      out['eos_token_id'] = eos_ids[0]
    for field, value in from_files.items():
      if out[field] is None:
        out[field] = value
  fallback = FALLBACK_8B.get((family, vocab_size), {})
  for field in FIELDS:
    if out[field] is None:
      out[field] = fallback.get(field)
  if out['pad_token_id'] is None:
    out['pad_token_id'] = out['eos_token_id']
  for field in ('mask_token_id', 'eos_token_id'):
    if out[field] is None:
      raise ValueError(_not_found(field, family, vocab_size, tokenizer_dir))
  out['extra_eos_token_ids'] = tuple(dict.fromkeys(
      i for i in eos_ids if i != out['eos_token_id']))
  return out


def _not_found(field: str, family: str, vocab_size: int, tokenizer_dir) -> str:
  role = _ROLES[field]
  texts = ', '.join(KNOWN_TEXTS.get(field, ()))
  where = [f'config.json key {field!r}']
  if tokenizer_dir is None:
    where.append('no tokenizer files (none given)')
  else:
    present = [n for n in TOKENIZER_FILES if os.path.isfile(os.path.join(tokenizer_dir, n))]
    where.append(f'{role!r}{" and the tokens " + texts if texts else ""} in the tokenizer '
                 f'files of {tokenizer_dir} (found: {", ".join(present) or "none"})')
  tables = ', '.join(f'{f} vocabulary {v}' for f, v in FALLBACK_8B)
  return (f'no {field.replace("_token_id", "")} token id: looked for {"; ".join(where)}; the '
          f'published 8B ids apply only to {tables}, not to this {family} checkpoint of '
          f'vocabulary {vocab_size}')
