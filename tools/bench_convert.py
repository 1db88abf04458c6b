"""Benchmark of `illada-convert` against an O_DIRECT copy of the same bytes, in the same run.

  python tools/bench_convert.py [--preset illada_8b] [--workdir /big/disk] [--keep]
      [--steps hf-to-orbax,orbax-to-hf,quantize]

Writes a fake Hugging Face directory of the preset (random bfloat16, real
names and shapes, 5 GB shards), then for each direction (hf-to-orbax, then
orbax-to-hf on its output) measures:

* O_DIRECT copy (the baseline, the I/O floor of a conversion that reads and
  writes every byte once around the page cache, as the converter does):
  every input file read with O_DIRECT and written to a scratch file with
  O_DIRECT, a reader thread one 64 MB block ahead of the writer, each file
  fsynced. Measured before and after the conversion; the faster run is the
  baseline;
* O_DIRECT read alone (the device's read speed), for context;
* conversion: `python -m illada_jax.cli.convert ...` in a subprocess (it
  fsyncs what it writes); wall time, and peak RSS and CPU time from
  `os.wait4`'s rusage of that child.

`quantize` (`illada-convert quantize ORBAX DST --int8`, on the hf-to-orbax
output) is measured the same way against the copy of its input, and reports
the bytes it wrote against the bytes it read (int8 weights: about half).

Before each measurement the inputs are flushed and evicted from the page
cache with `posix_fadvise(DONTNEED)` (no root needed). Prints one line per
figure with its ratio to the O_DIRECT copy, and whether the targets
(conversion <= 1.5x the copy, peak RSS < 2 GiB) are met. Where the
filesystem refuses O_DIRECT (tmpfs) the copy and read are buffered, and say
so. Dated results: docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import os
import queue
import shutil
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..'))

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import make_fake_hf_checkpoint  # noqa: E402

BLOCK = 64 << 20
ALIGN = 4096
TARGET_RATIO = 1.5
TARGET_RSS = 2 << 30


def _files(root: str) -> list[str]:
  return sorted(os.path.join(d, f) for d, _, fs in os.walk(root) for f in fs)


def evict(root: str) -> None:
  os.sync()
  for path in _files(root):
    fd = os.open(path, os.O_RDONLY)
    try:
      os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
      os.close(fd)


def _aligned(nbytes: int) -> np.ndarray:
  raw = np.empty(nbytes + ALIGN, np.uint8)
  start = -raw.ctypes.data % ALIGN
  return raw[start:start + nbytes]


def _open(path: str, flags: int) -> tuple[int, bool]:
  """(fd, direct): `path` opened with O_DIRECT where the filesystem allows it."""
  try:
    return os.open(path, flags | os.O_DIRECT, 0o644), True
  except (OSError, AttributeError):
    return os.open(path, flags, 0o644), False


def direct_read(root: str) -> tuple[float, int, bool]:
  """(seconds, bytes, direct) to read every file under `root` once with O_DIRECT."""
  evict(root)
  buf = _aligned(BLOCK)
  total, direct = 0, True
  t = time.perf_counter()
  for path in _files(root):
    fd, ok = _open(path, os.O_RDONLY)
    direct &= ok
    try:
      offset = 0
      while n := os.preadv(fd, [buf], offset):
        offset += n
    finally:
      os.close(fd)
    total += offset
  return time.perf_counter() - t, total, direct


def direct_copy(root: str, scratch: str) -> tuple[float, bool]:
  """(seconds, direct) to copy every file under `root` into `scratch` with O_DIRECT, fsynced."""
  evict(root)
  os.makedirs(scratch)
  bufs: queue.Queue = queue.Queue()
  for _ in range(3):
    bufs.put(_aligned(BLOCK))
  full: queue.Queue = queue.Queue()
  direct = True

  def read_all():
    for k, path in enumerate(_files(root)):
      fd, _ = _open(path, os.O_RDONLY)
      try:
        offset = 0
        while True:
          buf = bufs.get()
          n = os.preadv(fd, [buf], offset)
          if not n:
            bufs.put(buf)
            break
          full.put((k, buf, n, offset))
          offset += n
      finally:
        os.close(fd)
      full.put((k, None, 0, offset))  # end of file k
    full.put(None)

  t = time.perf_counter()
  reader = threading.Thread(target=read_all)
  reader.start()
  out: dict[int, tuple[int, bool]] = {}
  while (item := full.get()) is not None:
    k, buf, n, offset = item
    if k not in out:
      out[k] = _open(os.path.join(scratch, str(k)), os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
      direct &= out[k][1]
    fd, fd_direct = out[k]
    if buf is None:  # file done: drop the block padding, flush
      os.ftruncate(fd, offset)
      os.fsync(fd)
      os.close(fd)
      continue
    size = n + (-n % ALIGN if fd_direct else 0)  # O_DIRECT writes whole blocks
    os.pwrite(fd, memoryview(buf)[:size], offset)
    bufs.put(buf)
  reader.join()
  seconds = time.perf_counter() - t
  shutil.rmtree(scratch)
  os.sync()
  return seconds, direct


def run(cmd: list[str], evict_root: str) -> tuple[float, int, float]:
  """(wall s, peak RSS bytes, CPU s) of `cmd` run with its inputs evicted."""
  evict(evict_root)
  t = time.perf_counter()
  proc = subprocess.Popen(cmd, env={**os.environ, 'JAX_PLATFORMS': 'cpu'})
  _, status, usage = os.wait4(proc.pid, 0)
  wall = time.perf_counter() - t
  if os.waitstatus_to_exitcode(status) != 0:
    raise SystemExit(f'{cmd} failed with status {status}')
  return wall, usage.ru_maxrss * 1024, usage.ru_utime + usage.ru_stime


def measure(name: str, src: str, dst: str, extra: list[str], work: str, report) -> None:
  """The figures of one direction, `src` -> `dst`, one line each."""
  cmd = [sys.executable, '-m', 'illada_jax.cli.convert', name, src, dst, '--quiet'] + extra
  scratch = os.path.join(work, 'copy')
  copy_before, direct = direct_copy(src, scratch)
  read_s, nbytes, _ = direct_read(src)
  load0 = os.getloadavg()[0]
  wall, rss, cpu = run(cmd, src)
  load1 = os.getloadavg()[0]
  copy_after, _ = direct_copy(src, scratch)
  copy_s = min(copy_before, copy_after)
  gb = nbytes / 1e9
  how = 'O_DIRECT' if direct else 'buffered (O_DIRECT refused here)'
  met = lambda ok: 'met' if ok else 'NOT met'
  report(f'{name}: {how} copy (read + write + fsync) of {gb:.2f} GB: {copy_s:.1f}s '
         f'({gb / copy_s:.2f} GB/s; runs {copy_before:.1f}s before, {copy_after:.1f}s after)  '
         f'ratio 1.00')
  report(f'{name}: {how} read: {read_s:.1f}s ({gb / read_s:.2f} GB/s)  '
         f'ratio {read_s / copy_s:.2f}x copy')
  report(f'{name}: conversion wall time: {wall:.1f}s  ratio {wall / copy_s:.2f}x copy '
         f'(target <= {TARGET_RATIO}x: {met(wall / copy_s <= TARGET_RATIO)})')
  report(f'{name}: peak RSS of the converter: {rss / 2**30:.2f} GiB  '
         f'ratio {rss / nbytes:.3f} of the checkpoint (target < {TARGET_RSS / 2**30:.0f} GiB: '
         f'{met(rss < TARGET_RSS)})')
  report(f'{name}: CPU time of the converter (user+sys): {cpu:.1f}s  ratio {cpu / wall:.2f} '
         f'of its wall time (load average {load0:.1f} at start, {load1:.1f} at end, '
         f'{os.cpu_count()} cores)')
  if name == 'quantize':
    out = sum(os.path.getsize(f) for f in _files(dst))
    report(f'{name}: bytes written {out / 1e9:.2f} GB  ratio {out / nbytes:.3f} of the bytes read')


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  p.add_argument('--preset', default='illada_8b')
  p.add_argument('--num-layers', type=int, default=None, help='fewer layers than the preset')
  p.add_argument('--workdir', default=None, help='where the ~3x15 GB go (default: a temp dir)')
  p.add_argument('--keep', action='store_true')
  p.add_argument('--src', default=None,
                 help='an existing HF directory to convert instead of a new fake one (kept)')
  p.add_argument('--steps', default='hf-to-orbax,orbax-to-hf',
                 help='what to measure, in order (quantize reads the hf-to-orbax output)')
  args = p.parse_args(argv)
  steps = args.steps.split(',')
  work = tempfile.mkdtemp(prefix='bench_convert.', dir=args.workdir)
  hf, orbax, back, q8 = (os.path.join(work, d) for d in ('hf', 'orbax', 'hf_back', 'int8'))
  hf = os.path.abspath(args.src) if args.src else hf
  lines = []

  def report(line):
    lines.append(line)
    print(line, flush=True)

  try:
    if args.src:
      report(f'converting {hf}')
    else:
      t = time.perf_counter()
      overrides = {} if args.num_layers is None else {'num_layers': args.num_layers}
      make_fake_hf_checkpoint.make(args.preset, hf, '5GB', **overrides)
      os.sync()
      report(f'{args.preset}: fake HF checkpoint written in {time.perf_counter() - t:.1f}s')
    measure('hf-to-orbax', hf, orbax, [], work, report)
    if not args.keep and not args.src:
      shutil.rmtree(hf)
    if 'orbax-to-hf' in steps:
      measure('orbax-to-hf', orbax, back, ['--shard-size', '5GB'], work, report)
      if not args.keep:  # room for the next step on the disk
        shutil.rmtree(back)
    if 'quantize' in steps:
      measure('quantize', orbax, q8, ['--int8'], work, report)
  finally:
    if not args.keep:
      shutil.rmtree(work, ignore_errors=True)
  print('\n'.join(['', 'summary:'] + lines))
  return 0


if __name__ == '__main__':
  sys.exit(main())
