"""Test setup: 8 simulated CPU devices, CPU backend only, float32 matmuls exact.

Under `CI=true` (set by `.ci/run`) a skipped test fails the run unless its
reason is listed in `CI_ALLOWED_SKIPS`: a skip checks nothing, and CI
installs every extra (`.[test,tpu,eval,serve]`), so a missing package there is a
broken install, not a reason.
"""

import os
import re

import pytest

os.environ.setdefault('JAX_PLATFORMS', 'cpu')
_flags = os.environ.get('XLA_FLAGS', '')
if '--xla_force_host_platform_device_count' not in _flags:
  os.environ['XLA_FLAGS'] = (_flags + ' --xla_force_host_platform_device_count=8').strip()

import jax  # noqa: E402

jax.config.update('jax_default_matmul_precision', 'highest')

# The demo's short setting, trained once per session: the default model on the
# sum and one EOS as its answer canvas (7 + 4 positions), 800 steps, the
# cheapest setting that learned under every seed tried (the loss plateaus
# until a sudden breakthrough at step 250-500; 600 steps left seed 2 at 34%,
# 400 seed 0 at 1.4%). Runs and times: docs/benchmarks.md, "Demo accuracy".
SHORT_DEMO = dict(gen_length=4, steps=800)


@pytest.fixture(scope='session')
def short_demo(tmp_path_factory):
  """(DemoConfig, demo.run summary) of the short demo setting, trained once."""
  from illada_jax import demo
  cfg = demo.DemoConfig(out=str(tmp_path_factory.mktemp('demo')), **SHORT_DEMO)
  return cfg, demo.run(cfg, progress_bar=False, log=lambda *a: None)


# The one list of skips CI accepts: regular expressions searched in the skip
# reason. Only reasons that hold on a CPU-only machine with every extra
# installed belong here (e.g. a test that needs a GPU or a TPU to run on).
CI_ALLOWED_SKIPS: tuple[str, ...] = ()

_ci_skips: list[str] = []


def _skip_reason(report) -> str:
  longrepr = report.longrepr
  if isinstance(longrepr, tuple):  # (path, line, 'Skipped: reason')
    return str(longrepr[2]).removeprefix('Skipped: ')
  return str(longrepr)


def _record_ci_skip(report) -> None:
  if os.environ.get('CI', '').lower() != 'true' or not report.skipped:
    return
  if hasattr(report, 'wasxfail'):  # an expected failure is not a skip
    return
  reason = _skip_reason(report)
  if not any(re.search(pattern, reason) for pattern in CI_ALLOWED_SKIPS):
    _ci_skips.append(f'{report.nodeid}: {reason}')


def pytest_runtest_logreport(report):
  _record_ci_skip(report)


def pytest_collectreport(report):  # module-level importorskip / skip
  _record_ci_skip(report)


def pytest_terminal_summary(terminalreporter):
  if _ci_skips:
    terminalreporter.section('CI=true: skips not in CI_ALLOWED_SKIPS (tests/conftest.py)',
                             red=True)
    for line in _ci_skips:
      terminalreporter.line(line)


def pytest_sessionfinish(session):
  if _ci_skips and session.exitstatus in (0, 5):  # 5: nothing ran but skips
    session.exitstatus = 1
