"""Benchmark of `illada-convert` on a synthetic full-size checkpoint.

  python tools/bench_convert.py [--preset illada_8b] [--workdir /work/tmp] [--keep]

Writes a fake Hugging Face directory of the preset (random bfloat16, real
names and shapes, 5 GB shards), then for each direction:

* raw read: every input file read once sequentially (64 MB `readinto`);
* raw read with O_DIRECT: the same around the page cache (the device speed);
* raw copy: the same, each block also written to a scratch file, then
  `sync`: buffered I/O's floor for a conversion that writes to disk;
* conversion: `python -m illada_jax.cli.convert ...` in a subprocess; wall
  time and peak RSS from `os.wait4`'s rusage of that child.

Before each measurement the inputs are flushed and evicted from the page
cache with `posix_fadvise(DONTNEED)` (no root needed), so all start cold
the same way. Reports one line per figure and the ratio to the raw read.

Measured (illada_8b, 15.23 GB bf16, 2 cores, no accelerator; wall times are
noisy, CPU time = user+sys of the converter process):

  before 05b2572, idle machine:
    hf-to-orbax  raw read 11.7 s, conversion 62.6 s (5.36x), CPU 58.2 s
    orbax-to-hf  raw read 11.8 s, conversion 85.1 s (7.22x), CPU 69.4 s
  05b2572 (strip transpose before TensorStore, read-ahead), load average 4-5:
    hf-to-orbax  raw read 12.9 s, conversion 40.6 s (3.15x), CPU 36.4 s
    orbax-to-hf  raw read 17.0 s, conversion 56.5 s (3.32x), CPU 50.3 s
  1295318 (buffer pool, 16-byte-word transpose, O_DIRECT reads and
  safetensors writes), idle:
    hf-to-orbax  raw read 10.7 s, conversion 21.2 s (1.98x), CPU 29.4 s
    orbax-to-hf  raw read  9.0 s, conversion 24.0 s (2.66x), CPU 29.6 s
  800b071 (zarr3 shard files read and written with O_DIRECT), idle, two runs:
    hf-to-orbax  raw read 26.2 / 25.0 s (O_DIRECT 5.3 / 5.6 s), conversion
                 19.4 / 16.1 s (0.74x / 0.64x), CPU 17.7 / 14.8 s, RSS 1.33 GiB
    orbax-to-hf  raw read 25.0 / 21.9 s (O_DIRECT 5.9 / 5.1 s), conversion
                 15.9 / 17.3 s (0.64x / 0.79x), CPU 14.1 / 16.0 s, RSS 0.92 GiB

  5b76a2f on a fresh machine of the same kind, slower (CPU time 2.2x,
  O_DIRECT read 1.8x the 11-24 figures):
    hf-to-orbax  raw read 26.9 s (O_DIRECT 9.7 s), conversion 47.6 s (1.77x),
                 CPU 34.5 s, RSS 1.36 GiB
    orbax-to-hf  raw read 30.6 s (O_DIRECT 10.4 s), conversion 41.2 s (1.35x),
                 CPU 33.3 s, RSS 0.96 GiB

The buffered raw read is the noisiest figure on this VM (9-31 s across
sessions); against its fastest value the conversions are 1.5-1.9x.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..'))

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import make_fake_hf_checkpoint  # noqa: E402


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


def raw_read(root: str) -> tuple[float, int]:
  """Seconds to read every file under `root` once, and the bytes read."""
  evict(root)
  buf = bytearray(64 << 20)
  total = 0
  t = time.perf_counter()
  for path in _files(root):
    with open(path, 'rb', buffering=0) as f:
      while n := f.readinto(buf):
        total += n
  return time.perf_counter() - t, total


def raw_read_direct(root: str) -> float:
  """Seconds to read every file under `root` with O_DIRECT (the device, without the page cache)."""
  evict(root)
  raw = np.empty((64 << 20) + 4096, np.uint8)
  start = -raw.ctypes.data % 4096
  buf = raw[start:start + (64 << 20)]
  t = time.perf_counter()
  for path in _files(root):
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    try:
      offset = 0
      while n := os.preadv(fd, [buf], offset):
        offset += n
    finally:
      os.close(fd)
  return time.perf_counter() - t


def raw_copy(root: str, scratch: str) -> float:
  """Seconds to copy every file under `root` into `scratch` and `sync`."""
  evict(root)
  os.makedirs(scratch)
  buf = bytearray(64 << 20)
  t = time.perf_counter()
  for k, path in enumerate(_files(root)):
    with open(path, 'rb', buffering=0) as f, open(os.path.join(scratch, str(k)), 'wb') as g:
      while n := f.readinto(buf):
        g.write(memoryview(buf)[:n])
  os.sync()
  seconds = time.perf_counter() - t
  shutil.rmtree(scratch)
  os.sync()
  return seconds


def run(cmd: list[str], evict_root: str) -> tuple[float, float, int, float]:
  """(wall s, final `sync` s, peak RSS bytes, CPU s) of `cmd` run cold."""
  evict(evict_root)
  t = time.perf_counter()
  proc = subprocess.Popen(cmd, env={**os.environ, 'JAX_PLATFORMS': 'cpu'})
  _, status, usage = os.wait4(proc.pid, 0)
  wall = time.perf_counter() - t
  if os.waitstatus_to_exitcode(status) != 0:
    raise SystemExit(f'{cmd} failed with status {status}')
  t = time.perf_counter()
  os.sync()
  return wall, time.perf_counter() - t, usage.ru_maxrss * 1024, usage.ru_utime + usage.ru_stime


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  p.add_argument('--preset', default='illada_8b')
  p.add_argument('--workdir', default=None, help='where the ~3x15 GB go (default: a temp dir)')
  p.add_argument('--keep', action='store_true')
  p.add_argument('--src', default=None,
                 help='an existing HF directory to convert instead of a new fake one (kept)')
  args = p.parse_args(argv)
  work = tempfile.mkdtemp(prefix='bench_convert.', dir=args.workdir)
  hf, orbax, back = (os.path.join(work, d) for d in ('hf', 'orbax', 'hf_back'))
  hf = os.path.abspath(args.src) if args.src else hf
  convert_cmd = [sys.executable, '-m', 'illada_jax.cli.convert']
  lines = []

  def report(line):
    lines.append(line)
    print(line, flush=True)

  try:
    if args.src:
      report(f'converting {hf}')
    else:
      t = time.perf_counter()
      make_fake_hf_checkpoint.make(args.preset, hf, '5GB')
      os.sync()
      report(f'{args.preset}: fake HF checkpoint written in {time.perf_counter() - t:.1f}s')
    for name, src, dst, extra in (('hf-to-orbax', hf, orbax, []),
                                  ('orbax-to-hf', orbax, back, ['--shard-size', '5GB'])):
      read_s, nbytes = raw_read(src)
      copy_s = raw_copy(src, os.path.join(work, 'copy'))
      direct_s = raw_read_direct(src) if hasattr(os, 'O_DIRECT') else float('nan')
      load0 = os.getloadavg()[0]
      wall, sync_s, rss, cpu = run(convert_cmd + [name, src, dst, '--quiet'] + extra, src)
      gb = nbytes / 1e9
      report(f'{name}: raw read of {gb:.2f} GB: {read_s:.1f}s ({gb / read_s:.2f} GB/s)  ratio 1.00')
      report(f'{name}: raw read with O_DIRECT: {direct_s:.1f}s ({gb / direct_s:.2f} GB/s)  '
             f'ratio {direct_s / read_s:.2f}x raw read')
      report(f'{name}: raw copy + sync: {copy_s:.1f}s ({gb / copy_s:.2f} GB/s)  '
             f'ratio {copy_s / read_s:.2f}x raw read')
      report(f'{name}: conversion wall time: {wall:.1f}s  ratio {wall / read_s:.2f}x raw read, '
             f'{wall / copy_s:.2f}x raw copy')
      report(f'{name}: conversion + final sync: {wall + sync_s:.1f}s  '
             f'ratio {(wall + sync_s) / read_s:.2f}x raw read, '
             f'{(wall + sync_s) / copy_s:.2f}x raw copy')
      report(f'{name}: peak RSS of the converter: {rss / 2**30:.2f} GiB  '
             f'ratio {rss / nbytes:.3f} of the checkpoint size')
      report(f'{name}: CPU time of the converter (user+sys): {cpu:.1f}s  '
             f'ratio {cpu / wall:.2f} of its wall time (load average {load0:.1f} at start, '
             f'{os.getloadavg()[0]:.1f} at end, {os.cpu_count()} cores)')
      if name == 'hf-to-orbax' and not args.keep and not args.src:
        shutil.rmtree(hf)
  finally:
    if not args.keep:
      shutil.rmtree(work, ignore_errors=True)
  print('\n'.join(['', 'summary:'] + lines))
  return 0


if __name__ == '__main__':
  sys.exit(main())
