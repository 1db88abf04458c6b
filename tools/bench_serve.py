"""Serving: `illada-serve` under concurrent clients against the offline engine, same requests.

One run: the server is started as a subprocess on 127.0.0.1 (a free port)
with the settings given here, and the same N completion requests (greedy,
`stream: true`, one client connection each) are replayed

  - at saturation: all N sent at once (after one untimed pass of the same
    requests, as (a) has, so that neither measures compilation);
  - at Poisson arrival rates (`--rates` requests/s; default a quarter, half
    and three quarters of the request throughput measured at saturation);

against two baselines measured in the same run:

  (a) the offline engine (`Engine.generate`, this process, the same
      checkpoint, settings, slots and buckets) on the same requests, before
      the server starts (target: the server at saturation >= 0.9x its output
      tokens/s);
  (b) the same server with one request at a time (one client, the next
      request sent when the previous one ended; the first `--sequential`
      requests), as the batch-less LLaDA servers work (target: saturation
      >= 4x its output tokens/s at 64 slots).

One line per figure: request throughput, output tokens/s, time to first block
(the first chunk that carries text or the finish) and end-to-end latency
p50 / p99, each with its ratio to the baselines that have it ((a) has no
first block: `Engine.generate` hands out whole completions). Every streamed
text is checked against (a)'s text for the same prompt (temperature 0: they
must be equal), and every request must succeed: the run exits 1 otherwise.

By default the checkpoint is `tools/bench_engine.py`'s task model
(trained once under `--workdir`) and the prompts its held-out problems, with
its settings (fixed length 24, block 4, buckets 16/24/32/40).
Any checkpoint: `--ckpt DIR --prompts FILE.jsonl` (a `prompt` per line) and
the sampling flags of `illada-serve`.

  python tools/bench_serve.py [--requests 512] [--slots 64] [--workdir /tmp/illada_bench_engine]
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import gc
import json
import os
import socket
import subprocess
import sys
import time

import numpy as np

TOOLS = os.path.dirname(os.path.abspath(__file__))
TASK_SERVER_FLAGS = ('--gen-length', '24', '--block-length', '4',
                     '--temperature', '0')
TASK_BUCKETS = '16,24,32,40'


@dataclasses.dataclass
class Result:
  """One request as a client saw it (seconds from its send)."""
  text: str = ''
  tokens: int = 0
  first: float | None = None  # first chunk with text or a finish_reason
  latency: float | None = None
  error: str | None = None


def free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def process_cpu(pid: int) -> float | None:
  """CPU seconds (user + system) a process has used, from /proc; None where there is none."""
  try:
    with open(f'/proc/{pid}/stat') as f:
      fields = f.read().rsplit(')', 1)[1].split()
  except OSError:
    return None
  return (int(fields[11]) + int(fields[12])) / os.sysconf('SC_CLK_TCK')


def cores() -> int:
  return len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count()


def cpu_lines(name: str, f_seconds: float, server_cpu: float | None, client_cpu: float,
              a_seconds: float, a_cpu: float, n_cores: int) -> list[str]:
  """The CPU a server run took and the ceiling it puts on the run where the server, its
  clients and the model share the host's cores (CPU backends): the pass cannot be shorter
  than (server + client CPU) / cores, so its output tokens/s cannot exceed (a)'s by more
  than (a)'s seconds over that. On an accelerator the model's work leaves the host."""
  if server_cpu is None:
    return []
  total = server_cpu + client_cpu
  floor = total / n_cores
  return [f'{name}: CPU {server_cpu:.2f} s server + {client_cpu:.2f} s client = {total:.2f} s '
          f'((a): {a_cpu:.2f} s); on {n_cores} cores no pass using it takes less than '
          f'{floor:.3f} s, this one took {f_seconds:.3f} s ({floor / f_seconds:.0%} of that speed)',
          f'{name}: output tokens/s ceiling set by that CPU: {a_seconds / floor:.2f}x (a)']


def percentile(xs, q) -> float:
  return float(np.percentile(np.asarray(xs, float), q)) if xs else float('nan')


# -- the offline baseline ------------------------------------------------------------------------
def offline(ckpt: str, server_argv: list[str], prompts: list[str]):
  """(a): `Engine.generate` on the server's settings. Returns (seconds, texts, output tokens,
  per-request latencies from the start); the first pass compiles and is not timed."""
  from illada_jax import checkpoint, engine, prompts as prompts_lib, usage
  from illada_jax.cli import serve as serve_cli
  args = serve_cli.build_parser().parse_args(['--ckpt', ckpt] + server_argv)
  options, _ = serve_cli.settings_from(args)
  buckets = usage.int_list('--buckets', args.buckets)
  cfg, params = checkpoint.load_checkpoint(ckpt)
  tok = prompts_lib.load_tokenizer(ckpt)
  fmt = prompts_lib.PromptFormat.from_checkpoint(ckpt)
  eng = engine.Engine(cfg, params, tokenizer=tok, slots=args.slots, buckets=buckets)
  reqs = [engine.Request(i, tuple(fmt.encode(tok, cfg, p)), options) for i, p in enumerate(prompts)]
  list(eng.generate(reqs))  # compiles every program the run needs
  eng.stats = engine.EngineStats(compiles=eng.stats.compiles)
  cpu0 = time.process_time()
  start, done, latency = time.perf_counter(), {}, {}
  for c in eng.generate(reqs):
    latency[c.id] = time.perf_counter() - start
    done[c.id] = c
  seconds, cpu = time.perf_counter() - start, time.process_time() - cpu0
  texts = [done[i].text for i in range(len(reqs))]
  return (seconds, texts, sum(len(c.token_ids) for c in done.values()),
          [latency[i] for i in range(len(reqs))], eng.stats.host_share, cpu)


# -- the server and its clients ------------------------------------------------------------------
def start_server(ckpt: str, server_argv: list[str], port: int, log_path: str,
                 timeout: float = 600.):
  """`illada-serve` as a subprocess; returns it once `/health` answers 200 (compiled)."""
  import httpx
  cmd = [sys.executable, '-m', 'illada_jax.cli.serve', '--ckpt', ckpt, '--port', str(port),
         '--log-level', 'warning'] + server_argv
  log = open(log_path, 'w')
  proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
  deadline = time.monotonic() + timeout
  while time.monotonic() < deadline:
    if proc.poll() is not None:
      raise RuntimeError(f'illada-serve exited with {proc.returncode}; its log: {log_path}')
    try:
      if httpx.get(f'http://127.0.0.1:{port}/health', timeout=2).status_code == 200:
        return proc
    except httpx.HTTPError:
      pass
    time.sleep(0.5)
  stop_server(proc)
  raise RuntimeError(f'illada-serve not ready after {timeout:.0f} s; its log: {log_path}')


def stop_server(proc) -> None:
  proc.terminate()  # SIGTERM: drains (nothing is in flight) and exits 0
  try:
    proc.wait(60)
  except subprocess.TimeoutExpired:
    proc.kill()
    proc.wait()


async def one_request(session, url: str, model: str, prompt: str) -> Result:
  """A streamed greedy completion; its text is the concatenated deltas."""
  r, parts = Result(), []
  body = {'model': model, 'prompt': prompt, 'temperature': 0, 'stream': True,
          'stream_options': {'include_usage': True}}
  start = time.perf_counter()
  try:
    async with session.post(url, json=body) as resp:
      if resp.status != 200:
        r.error = f'HTTP {resp.status}: {(await resp.text())[:200]}'
        return r
      async for raw in resp.content:  # one SSE line at a time
        line = raw.decode().strip()
        if not line.startswith('data: ') or line == 'data: [DONE]':
          continue
        chunk = json.loads(line[6:])
        if 'error' in chunk:
          r.error = chunk['error'].get('message', 'error')
          return r
        for choice in chunk['choices']:
          if choice['text'] or choice['finish_reason']:
            if r.first is None:
              r.first = time.perf_counter() - start
            parts.append(choice['text'])
        if chunk.get('usage'):
          r.tokens = chunk['usage']['completion_tokens']
  except Exception as e:  # noqa: BLE001 (counted and reported as an error)
    r.error = f'{type(e).__name__}: {e}'
    return r
  r.latency, r.text = time.perf_counter() - start, ''.join(parts)
  return r


async def replay(port: int, model: str, prompts: list[str], arrivals: list[float] | None,
                 sequential: bool = False) -> tuple[list[Result], float]:
  """Sends every prompt: at `arrivals` (seconds from the start), all at once (None), or
  one after another (`sequential`). Returns (results in prompt order, wall seconds).

  The client is aiohttp (C HTTP parser), as vLLM's benchmark_serving: clients share
  the server's cores here, and httpx's pure-Python streaming took more CPU than the server.
  """
  import aiohttp
  url = f'http://127.0.0.1:{port}/v1/completions'
  connector = aiohttp.TCPConnector(limit=0)  # one connection per request in flight
  async with aiohttp.ClientSession(connector=connector,
                                   timeout=aiohttp.ClientTimeout(total=600.)) as session:
    start = time.perf_counter()
    if sequential:
      out = [await one_request(session, url, model, p) for p in prompts]
      return out, time.perf_counter() - start

    async def at(t, p):
      await asyncio.sleep(max(0., start + t - time.perf_counter()))
      return await one_request(session, url, model, p)
    times = arrivals or [0.] * len(prompts)
    out = await asyncio.gather(*(at(t, p) for t, p in zip(times, prompts)))
    return list(out), time.perf_counter() - start


def poisson_arrivals(n: int, rate: float, seed: int) -> list[float]:
  return list(np.cumsum(np.random.default_rng(seed).exponential(1. / rate, n)))


# -- the report ----------------------------------------------------------------------------------
@dataclasses.dataclass
class Figures:
  requests: int
  seconds: float
  tokens: int
  first: list  # seconds, per request ([] when not measured)
  latency: list

  @property
  def rps(self):
    return self.requests / self.seconds

  @property
  def tps(self):
    return self.tokens / self.seconds


def figures_of(results: list[Result], seconds: float) -> Figures:
  ok = [r for r in results if r.error is None]
  return Figures(len(results), seconds, sum(r.tokens for r in ok),
                 [r.first for r in ok if r.first is not None], [r.latency for r in ok])


def ratio(x, base, lower_is_better=False) -> str:
  if base is None or not np.isfinite(base) or base <= 0:
    return ''
  return f'{(base / x if lower_is_better else x / base):.2f}x'


def lines_for(name: str, f: Figures, a: Figures, b: Figures) -> list[str]:
  """One line per figure of a server run, each with its ratio to (a) and (b) (for latencies:
  baseline / this, so > 1 is better)."""
  def vs(value, fa, fb, lower=False):
    parts = [f'{ratio(value, base, lower)} {tag}' for tag, base in (('(a)', fa), ('(b)', fb))
             if ratio(value, base, lower)]
    return f' ({", ".join(parts)})' if parts else ''
  out = [f'{name}: request throughput {f.rps:.2f} req/s{vs(f.rps, a.rps, b.rps)}',
         f'{name}: output tokens/s {f.tps:.0f}{vs(f.tps, a.tps, b.tps)}']
  for label, xs, xa, xb in (('time to first block', f.first, None, b.first),
                            ('end-to-end latency', f.latency, a.latency, b.latency)):
    for q in (50, 99):
      v = percentile(xs, q)
      base_a = percentile(xa, q) if xa else None
      base_b = percentile(xb, q) if xb else None
      out.append(f'{name}: {label} p{q} {v:.3f} s{vs(v, base_a, base_b, lower=True)}')
  return out


def task_prompts(workdir: str, n: int, train_steps: int | None) -> tuple[str, list[str]]:
  """The bench_engine task model's checkpoint (trained once) and held-out prompts."""
  sys.path.insert(0, TOOLS)
  import bench_engine
  training = bench_engine.Training(**({} if train_steps is None else {'steps': train_steps}))
  _, _, _, test, ckpt = bench_engine.prepare(workdir, training)
  return ckpt, [p['prompt'] for p in test[:n]]


def read_prompts(path: str, n: int) -> list[str]:
  out = []
  with open(path) as f:
    for k, line in enumerate(f, 1):
      if line.strip():
        rec = json.loads(line)
        if not isinstance(rec.get('prompt'), str):
          raise ValueError(f'--prompts {path}:{k}: no "prompt" string')
        out.append(rec['prompt'])
  return out[:n]


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument('--ckpt', default=None, help="default: bench_engine's trained task model")
  ap.add_argument('--prompts', default=None, help='JSONL with a "prompt" per line (with --ckpt)')
  ap.add_argument('--workdir', default='/tmp/illada_bench_engine')
  ap.add_argument('--train-steps', type=int, default=None,
                  help="bench_engine's training steps (default: its default)")
  ap.add_argument('--requests', type=int, default=512)
  ap.add_argument('--sequential', type=int, default=64,
                  help='requests of baseline (b), one at a time (default: %(default)s)')
  ap.add_argument('--slots', type=int, default=64)
  ap.add_argument('--rates', default=None,
                  help='Poisson arrival rates, requests/s, e.g. 2,4,8 (default: 0.25, 0.5 and '
                       "0.75 of saturation's request throughput)")
  ap.add_argument('--seed', type=int, default=0, help='of the Poisson arrivals')
  args, server_flags = ap.parse_known_args(argv)
  if (args.ckpt is None) != (args.prompts is None):
    print('bench_serve: --ckpt and --prompts go together', file=sys.stderr)
    return 2
  rates = None
  if args.rates:
    try:
      rates = [float(r) for r in args.rates.split(',')]
    except ValueError:
      print(f'bench_serve: --rates {args.rates!r}: expected numbers like 2,4,8', file=sys.stderr)
      return 2
  if args.ckpt is None:
    ckpt, prompts = task_prompts(args.workdir, args.requests, args.train_steps)
    server_flags = list(TASK_SERVER_FLAGS) + ['--buckets', TASK_BUCKETS] + server_flags
  else:
    ckpt, prompts = args.ckpt, read_prompts(args.prompts, args.requests)
  server_argv = ['--slots', str(args.slots)] + server_flags
  n = len(prompts)

  print(f'# {n} requests, server flags: {" ".join(server_argv)}; checkpoint {ckpt}; '
        f'load average {os.getloadavg()[0]:.1f}', flush=True)
  secs, want, tokens, lat, host, a_cpu = offline(ckpt, server_argv, prompts)
  a = Figures(n, secs, tokens, [], lat)
  print(f'(a) offline engine: {n} requests in {secs:.3f} s, {a.rps:.2f} req/s, output tokens/s '
        f'{a.tps:.0f}, end-to-end latency p50 {percentile(lat, 50):.3f} s p99 '
        f'{percentile(lat, 99):.3f} s, host share {host:.1%}, CPU {a_cpu:.2f} s on {cores()} '
        f'cores', flush=True)

  # The client shares the server's cores: keep (a)'s heap (jax, the engine) out of its
  # full collections, as the server keeps its own (`serve.app`).
  gc.collect()
  gc.freeze()
  port = free_port()
  log_path = os.path.join(args.workdir, f'bench_serve_server_{port}.log')
  os.makedirs(args.workdir, exist_ok=True)
  t0 = time.perf_counter()
  proc = start_server(ckpt, server_argv, port, log_path)
  print(f'# server ready on 127.0.0.1:{port} after {time.perf_counter() - t0:.1f} s '
        f'(load, compile); log {log_path}', flush=True)
  model = os.path.basename(os.path.normpath(ckpt))
  errors, unequal, total, cpu = 0, 0, 0, {}
  try:
    def run(name, arrivals=None, sequential=False, subset=None):
      nonlocal errors, unequal, total
      ps = prompts if subset is None else prompts[:subset]
      server0, client0 = process_cpu(proc.pid), time.process_time()
      results, wall = asyncio.run(replay(port, model, ps, arrivals, sequential))
      server1, client1 = process_cpu(proc.pid), time.process_time()
      cpu[name] = (None if server0 is None or server1 is None else server1 - server0,
                   client1 - client0)
      total += len(results)
      bad = [r.error for r in results if r.error is not None]
      errors += len(bad)
      unequal += sum(r.error is None and r.text != want[i] for i, r in enumerate(results))
      for e in bad[:3]:
        print(f'# {name}: error: {e}', flush=True)
      return figures_of(results, wall)

    # As (a) had: one untimed pass of every request first, at saturation (it also compiles
    # what only a busy pool uses, e.g. widening the canvas to a larger prompt bucket).
    warm = run('warm-up')
    print(f'# warm-up pass at saturation (untimed, compiles what it meets): '
          f'{warm.seconds:.3f} s, {warm.tps:.0f} output tokens/s', flush=True)
    m = min(args.sequential, n)
    b = run('(b)', sequential=True, subset=m)
    print(f'(b) one request at a time: {m} requests in {b.seconds:.3f} s, {b.rps:.2f} req/s, '
          f'output tokens/s {b.tps:.0f}, time to first block p50 {percentile(b.first, 50):.3f} s '
          f'p99 {percentile(b.first, 99):.3f} s, end-to-end latency p50 '
          f'{percentile(b.latency, 50):.3f} s p99 {percentile(b.latency, 99):.3f} s', flush=True)
    sat = run('saturation')
    for line in lines_for('saturation', sat, a, b) + cpu_lines(
        'saturation', sat.seconds, *cpu['saturation'], secs, a_cpu, cores()):
      print(line, flush=True)
    for k, rate in enumerate(rates or [f * sat.rps for f in (0.25, 0.5, 0.75)]):
      name = f'Poisson {rate:.2f} req/s'
      f = run(name, arrivals=poisson_arrivals(n, rate, args.seed + k))
      for line in lines_for(name, f, a, b):
        print(line, flush=True)
  finally:
    stop_server(proc)
  print(f'server exit status {proc.returncode}', flush=True)
  print(f'saturation vs (a) offline engine: {sat.tps / a.tps:.2f}x output tokens/s '
        f'(target >= 0.9x); vs (b) one at a time: {sat.tps / b.tps:.2f}x (target >= 4x at 64 '
        f'slots, here {args.slots})', flush=True)
  print(f'errors: {errors} of {total} requests', flush=True)
  print(f'outputs at temperature 0 equal to the offline engine\'s: {total - errors - unequal}/'
        f'{total - errors}', flush=True)
  return 1 if errors or unequal else 0


if __name__ == '__main__':
  sys.exit(main())
