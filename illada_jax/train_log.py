"""A training run's metrics: TensorBoard event files (process 0) and `metrics.jsonl`.

`metrics.jsonl` holds one JSON object per logged step (`{"step", "loss", ...}`)
and one per eval-sample set; a resumed run first removes the lines past the
step it resumes from, so the file never holds a step twice.
"""

from __future__ import annotations

import json
import os

import jax


def _drop_metrics_after(path: str, step: int) -> None:
  """Removes the lines of `metrics.jsonl` past `step` (logged after the checkpoint a run
  resumes from; the resumed run logs those steps again), atomically."""
  if not os.path.exists(path):
    return
  with open(path, encoding='utf-8') as f:
    lines = f.readlines()
  keep = []
  for line in lines:
    try:
      if json.loads(line).get('step', 0) > step:
        continue
    except ValueError:  # a line torn by a kill
      continue
    keep.append(line)
  if len(keep) != len(lines):
    with open(path + '.tmp', 'w', encoding='utf-8') as f:
      f.writelines(keep)
    os.replace(path + '.tmp', path)


class Writer:
  """TensorBoard (process 0 only) + metrics.jsonl (no step twice after a resume)."""

  def __init__(self, workdir: str, start: int = 0):
    self.enabled = jax.process_index() == 0
    self.tb = None
    self.jsonl = None
    if self.enabled:
      os.makedirs(workdir, exist_ok=True)
      _drop_metrics_after(os.path.join(workdir, 'metrics.jsonl'), start)
      try:
        from tensorboardX import SummaryWriter
        self.tb = SummaryWriter(os.path.join(workdir, 'tb'))
      except ImportError:  # TensorBoard is optional
        self.tb = None
      self.jsonl = open(os.path.join(workdir, 'metrics.jsonl'), 'a')

  def write(self, step: int, metrics: dict[str, float]):
    if not self.enabled:
      return
    if self.tb is not None:
      for k, v in metrics.items():
        self.tb.add_scalar(k, v, step)
    self.jsonl.write(json.dumps({'step': step, **metrics}) + '\n')
    self.jsonl.flush()

  def write_samples(self, step: int, samples: list[dict[str, str]]):
    """Eval samples as TensorBoard text (one tag per prompt) and one metrics.jsonl line."""
    if not self.enabled:
      return
    if self.tb is not None:
      from illada_jax.train_samples import as_markdown
      for i, sample in enumerate(samples):
        self.tb.add_text(f'eval_samples/{i}', as_markdown(sample), step)
    self.jsonl.write(json.dumps({'step': step, 'eval_samples': samples}) + '\n')
    self.jsonl.flush()

  def close(self):
    if self.enabled:
      if self.tb is not None:
        self.tb.close()
      self.jsonl.close()
