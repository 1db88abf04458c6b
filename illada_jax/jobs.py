"""Resumable JSONL jobs over the engine: what `illada-sample --prompts` and `illada-score` run.

A job reads one JSON object per line; a record's `id` defaults to its line
number. Each result is appended to the output and flushed as soon as its
request finishes. Killed at any moment and rerun with the same command, a job
skips the ids already written with a result (a torn last line is cut off
first; any other corrupt line stops it), runs again the ids written as
errors, and at the end the output is rewritten in input order, so it holds
every id exactly once with the same content as an uninterrupted run.

Every output line carries `input_hash`, a hash of its input record, and
`OUT.job.json` records what produced the output (`produced_by`: the
checkpoint's identity and a fingerprint of the settings). A rerun recomputes
the records whose input changed since, and refuses (JobError naming what
changed) when the checkpoint or a setting changed, unless `restart` says to
start the output over.

With several processes (`jax.distributed`), process `i` of `n` takes the
records whose index is `i mod n`, writes `OUT.part-i-of-n`, and process 0
merges all parts into `OUT` after a barrier. A bad record (invalid JSON, no
prompt, too long for the model) becomes an `{"id", "error"}` record naming
the file and line (`on_error='skip'`) or stops the job (`'stop'`).
"""

from __future__ import annotations

import codecs
import dataclasses
import glob
import json
import os
import sys
import time
from typing import Any, Callable, Iterable

from tqdm.auto import tqdm

from illada_jax import provenance
from illada_jax.provenance import (HASH_KEY, checkpoint_identity, input_hash,  # noqa: F401 (API)
                                   job_file)


class JobError(RuntimeError):
  """A bad input record under `on_error='stop'`; the message names the file and line."""


@dataclasses.dataclass
class Record:
  """One input line: `data` is the parsed object, or None with `error` set.

  `where` is `path:line`, for error messages.
  """
  where: str
  id: Any
  data: dict | None
  error: str | None = None


def read_records(path: str) -> list[Record]:
  """Parses a JSONL file; bad lines become records with an `error` naming `path:line`.

  The file is read as bytes and each line decoded on its own, so a line that
  is not UTF-8 is one bad record; a UTF-8 byte-order mark before line 1 is
  dropped. A record's id is its `id` (a string or an integer), else its line
  number; a bad line (not UTF-8, invalid JSON, not an object, an `id` of
  another type) takes its line number too, so that its error record has an
  id. Every id, explicit or implicit, of a good or a bad line, is taken by
  the first line that has it: a later line with the same id is a
  duplicate-id error naming both lines, and gets id None (its error is
  logged and counted, but written nowhere, since the id's one output record
  belongs to the earlier line). So the output holds every id exactly once.
  """
  out, seen = [], {}

  def bad(where, n, msg):
    if n in seen:  # its line number is the explicit id of an earlier line
      out.append(Record(where, None, None, f'{where}: {msg}, and its id {n} (the line number) '
                                           f'is a duplicate id (first on line {seen[n]})'))
      return
    seen[n] = n
    out.append(Record(where, n, None, f'{where}: {msg}'))

  with open(path, 'rb') as f:
    for n, raw in enumerate(f, 1):
      where = f'{path}:{n}'
      if n == 1 and raw.startswith(codecs.BOM_UTF8):
        raw = raw[len(codecs.BOM_UTF8):]
      try:
        line = raw.decode('utf-8')
      except UnicodeDecodeError as e:
        bad(where, n, f'not UTF-8 (byte 0x{raw[e.start]:02x} at byte {e.start + 1} of the line)')
        continue
      if not line.strip():
        continue
      try:
        data = json.loads(line)
      except json.JSONDecodeError as e:
        bad(where, n, f'invalid JSON ({e.msg})')
        continue
      if not isinstance(data, dict):
        bad(where, n, 'expected a JSON object')
        continue
      try:  # a lone surrogate (a valid JSON escape) cannot be written back as UTF-8
        json.dumps(data, ensure_ascii=False).encode('utf-8')
      except UnicodeEncodeError:
        bad(where, n, 'a string holds a lone UTF-16 surrogate (\\ud800-\\udfff escape)')
        continue
      rid = data.get('id', n)
      if not isinstance(rid, (str, int)) or isinstance(rid, bool):
        bad(where, n, '"id" must be a string or an integer')
        continue
      if rid in seen:
        out.append(Record(where, None, None,
                          f'{where}: duplicate id {rid!r} (first on line {seen[rid]})'))
        continue
      seen[rid] = n
      out.append(Record(where, rid, data))
  return out


# -- the output file(s) ---------------------------------------------------------

def part_path(out: str, index: int, count: int) -> str:
  return f'{out}.part-{index}-of-{count}'


def _repair(path: str) -> None:
  """Cuts a torn last line off `path`: one without a newline, else one that is not valid JSON.

  A kill can tear only the line being written, so only the last line is
  repaired; a bad line before it is left for `existing_results` to refuse.
  """
  with open(path, 'rb+') as f:
    data = f.read()
    keep = data.rfind(b'\n') + 1
    if keep == len(data) and data:  # a line cut by a crash may still have its newline
      start = data.rfind(b'\n', 0, len(data) - 1) + 1
      try:
        json.loads(data[start:])
      except ValueError:  # JSONDecodeError or UnicodeDecodeError
        keep = start
    if keep != len(data):
      f.truncate(keep)


def _is_error(line: str) -> bool:
  return 'error' in json.loads(line)


def _fresh(line: str, want: str | None) -> bool:
  """Whether result `line` was computed from the input whose hash is `want`."""
  return want is not None and json.loads(line).get(HASH_KEY) == want


def existing_results(out: str) -> dict[Any, list[str]]:
  """id -> the JSON lines written for it, oldest first, in `out` and its part files
  (repaired first; `out` holds the merged older runs, so it comes first).

  Raises JobError naming the file and line if a line other than a torn last
  one is not a JSON object with an `id`.
  """
  done: dict[Any, list[str]] = {}
  for path in [out] + sorted(glob.glob(glob.escape(out) + '.part-*-of-*')):
    if not os.path.exists(path):
      continue
    _repair(path)
    with open(path, 'rb') as f:
      for n, raw in enumerate(f, 1):
        try:
          line = raw.decode('utf-8')
          rec = json.loads(line)
        except ValueError as e:
          raise JobError(f'{path}:{n}: corrupt result line ({e}); only a torn last line is '
                         'repaired: fix or remove this line, or the file') from None
        if not (isinstance(rec, dict) and 'id' in rec):
          raise JobError(f'{path}:{n}: corrupt result line (not a JSON object with an "id"); '
                         'fix or remove this line, or the file')
        line = line if line.endswith('\n') else line + '\n'
        done.setdefault(rec['id'], []).append(line)
  return done


def _pick(lines: list[str], want: str | None) -> str | None:
  """The line to keep for a record: its newest result of this input, else its newest error
  (of this input, or a bad line's), else None (only stale lines: a changed input)."""
  fresh = [line for line in lines if _fresh(line, want) or (want is None and _is_error(line))]
  results = [line for line in fresh if not _is_error(line)]
  return (results or fresh or [None])[-1]


def merge(out: str, records: list[Record]) -> int:
  """Rewrites `out` from itself and its parts in input order (atomically); removes the parts.

  Returns the number of records written.
  """
  done = existing_results(out)
  parts = glob.glob(glob.escape(out) + '.part-*-of-*')
  tmp = out + '.merging'
  n = 0
  with open(tmp, 'w', encoding='utf-8') as f:
    for r in records:
      line = _pick(done.get(r.id, []), input_hash(r)) if r.id is not None else None
      if line is not None:
        f.write(line)
        n += 1
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, out)
  for p in parts:
    os.remove(p)
  return n


# -- what produced an output --------------------------------------------------------

def check_producer(out: str, produced_by: dict, write: bool = False) -> None:
  """Raises JobError naming the key and both values if `out` holds results written by
  another checkpoint or settings (its `job.json`); an output of error records only may be
  redone with other settings. With `write`, records `produced_by` if new."""
  want = json.loads(json.dumps(produced_by, sort_keys=True))
  path = job_file(out)
  old = None
  if os.path.exists(path):
    with open(path, encoding='utf-8') as f:
      old = json.load(f)
  if old is not None and old != want and not any(
      not _is_error(line) for lines in existing_results(out).values() for line in lines):
    old = None  # only error records (a job-wide mistake since fixed): nothing stale to keep
  if old is not None:
    what = provenance.differences(old, want)
    if what:
      raise JobError(f'{out} was written with other settings ({what}); pass --restart to '
                     'recompute it, or choose another --out')
  elif write and old != want:
    with open(path + '.tmp', 'w', encoding='utf-8') as f:
      json.dump(want, f, indent=2, sort_keys=True)
      f.write('\n')
    os.replace(path + '.tmp', path)


def restart_output(out: str) -> None:
  """Removes `out`, its part files and its `job.json`: the next run starts it over."""
  for p in [out, job_file(out)] + glob.glob(glob.escape(out) + '.part-*-of-*'):
    if os.path.exists(p):
      os.remove(p)


@dataclasses.dataclass
class JobSummary:
  total: int = 0  # records owned by this process
  skipped: int = 0  # already written (and not an error) by an earlier run
  done: int = 0  # finished in this run
  errors: int = 0  # bad records in this run (error records written, duplicate ids)
  changed: int = 0  # written by an earlier run from another input: recomputed
  output_tokens: int = 0
  generated_tokens: int = 0
  seconds: float = 0.

  def line(self, unit: str = 'requests') -> str:
    rate = lambda n: n / self.seconds if self.seconds else 0.
    changed = f', {self.changed} recomputed (input changed)' if self.changed else ''
    return (f'{self.done} {unit} in {self.seconds:.1f} s ({self.skipped} already written'
            f'{changed}, {self.errors} errors): output {rate(self.output_tokens):.1f} tok/s, '
            f'computed {rate(self.generated_tokens):.1f} tok/s')


def run(records: list[Record], out: str, prepare: Callable[[Record], Any],
        execute: Callable[[list], Iterable[tuple[Any, dict, int, int]]], *,
        on_error: str = 'skip', process_index: int = 0, process_count: int = 1,
        barrier: Callable[[], None] = lambda: None, progress: bool = True,
        unit: str = 'requests', log=None, produced_by: dict | None = None,
        restart: bool = False) -> JobSummary:
  """Runs the records this process owns and not yet written; merges at the end.

  prepare(record) -> a work item, or raises ValueError (a bad record).
  execute(items) yields `(id, result dict, output tokens, generated tokens)`
  as each item finishes. Raises JobError on a bad record with `on_error='stop'`,
  or if `out` (or a part file) has a corrupt line before its last.

  `produced_by` (JSON values: the checkpoint's identity, the settings) is
  recorded in `OUT.job.json`; a rerun whose `produced_by` differs raises
  JobError naming the key and both values, unless `restart` (the output is
  removed and started over). A record written from another input (its
  `input_hash` differs) is recomputed.

  Error records written by an earlier run are not skipped but retried: a
  job-wide mistake fixed on the command line does not stay in the output.
  The merged output keeps the retry's record (its result, or its new error).
  The returned summary's `errors` counts this process's records that are
  errors after this run (all of them were run again), so `errors > 0` means
  the output of this process's records is not all results: the CLIs exit
  non-zero then.
  """
  if on_error not in ('skip', 'stop'):
    raise ValueError(f'on_error={on_error!r}, expected skip or stop')
  log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
  mine = [r for k, r in enumerate(records) if k % process_count == process_index]
  os.makedirs(os.path.dirname(os.path.abspath(out)) or '.', exist_ok=True)
  if restart and process_index == 0:
    restart_output(out)
  if restart:
    barrier()  # no process reads the output before it is gone
  if produced_by is not None:
    check_producer(out, produced_by, write=process_index == 0)
  done = existing_results(out)
  path = out if process_count == 1 else part_path(out, process_index, process_count)
  summary = JobSummary(total=len(mine))
  start = time.perf_counter()
  with open(path, 'a', encoding='utf-8') as f:
    hashes = {r.id: input_hash(r) for r in mine}

    def write(rec: dict):
      rec[HASH_KEY] = hashes.get(rec['id'])
      f.write(json.dumps(rec, ensure_ascii=False) + '\n')
      f.flush()

    items = []
    for r in mine:
      old = _pick(done.get(r.id, []), hashes[r.id]) if r.id is not None else None
      if old is not None and not _is_error(old):
        summary.skipped += 1
        continue
      if r.id in done and old is None:
        summary.changed += 1
      error = r.error
      if error is None:
        try:
          items.append(prepare(r))
          continue
        except ValueError as e:
          error = f'{r.where}: {e}'
      if on_error == 'stop':
        raise JobError(error)
      log(f'error: {error}')
      summary.errors += 1
      if r.id is not None:
        write({'id': r.id, 'error': error})
    bar = tqdm(total=len(mine), initial=summary.skipped + summary.errors, unit=unit[:-1],
               disable=not progress, dynamic_ncols=True)
    try:
      for rid, result, out_tokens, gen_tokens in execute(items):
        write({'id': rid, **result})
        summary.done += 1
        summary.output_tokens += out_tokens
        summary.generated_tokens += gen_tokens
        elapsed = time.perf_counter() - start
        bar.set_postfix_str(f'output {summary.output_tokens / elapsed:.1f} tok/s, '
                            f'computed {summary.generated_tokens / elapsed:.1f} tok/s',
                            refresh=False)
        bar.update(1)
    finally:
      bar.close()
  summary.seconds = time.perf_counter() - start
  barrier()
  if process_index == 0:
    merge(out, records)
  barrier()
  log(summary.line(unit))
  return summary
