"""What produced a job's output: the input hash of each record, the checkpoint, the settings.

Every output line of a job (`illada_jax.jobs`) carries `input_hash`, a hash
of the input record it was computed from; `OUT.job.json` (`job_file`) holds
the checkpoint's identity (`checkpoint_identity`) and the settings. A rerun
compares them with its own (`differences`): a changed record is recomputed,
a changed checkpoint or setting is refused.
"""

from __future__ import annotations

import hashlib
import json
import os

HASH_KEY = 'input_hash'


def input_hash(r) -> str | None:
  """A short hash of a `jobs.Record`'s input object (None for a line that is not one)."""
  if r.data is None:
    return None
  text = json.dumps(r.data, sort_keys=True, ensure_ascii=False)
  return hashlib.sha256(text.encode('utf-8')).hexdigest()[:16]


def job_file(out: str) -> str:
  return out + '.job.json'


def checkpoint_identity(path: str) -> str:
  """`realpath#hash` of checkpoint directory `path`: its `model_config.json` bytes and the
  names, sizes and modification times of the files of its parameters (no weight is read)."""
  real = os.path.realpath(path)
  h = hashlib.sha256()
  cfg = os.path.join(real, 'model_config.json')
  if os.path.isfile(cfg):
    with open(cfg, 'rb') as f:
      h.update(f.read())
  for root, dirs, files in os.walk(os.path.join(real, 'params')):
    dirs.sort()
    for name in sorted(files):
      st = os.stat(os.path.join(root, name))
      h.update(f'{os.path.relpath(os.path.join(root, name), real)}:{st.st_size}:'
               f'{st.st_mtime_ns}\n'.encode())
  return f'{real}#{h.hexdigest()[:16]}'


def differences(old: dict, new: dict) -> str:
  """'key was A, now B' for every differing key ('settings.gen_length ...' one level down);
  '' when equal."""
  what = []
  for key in sorted(set(old) | set(new)):
    a, b = old.get(key), new.get(key)
    if a == b:
      continue
    if isinstance(a, dict) and isinstance(b, dict):
      what += [f'{key}.{k} was {a.get(k)!r}, now {b.get(k)!r}'
               for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
    else:
      what.append(f'{key} was {a!r}, now {b!r}')
  return ', '.join(what)
