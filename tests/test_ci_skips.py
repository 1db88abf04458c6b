"""Under CI=true a skip fails the run unless conftest's CI_ALLOWED_SKIPS lists its reason."""

import pathlib

import pytest

pytest_plugins = ('pytester',)

CONFTEST = (pathlib.Path(__file__).parent / 'conftest.py').read_text()

TESTS = '''
import pytest

def test_runs():
  pass

def test_skipped():
  pytest.skip('needs a flux capacitor')
'''


@pytest.mark.parametrize('ci,allowed,fails', [
    ('true', (), True),
    ('true', ('flux capacitor',), False),
    (None, (), False),
], ids=['ci-unlisted', 'ci-listed', 'not-ci'])
def test_a_skip_fails_only_under_ci_and_only_if_unlisted(pytester, monkeypatch, ci, allowed,
                                                         fails):
  # The real conftest with its list replaced, so the listed case needs no real entry.
  pytester.makeconftest(CONFTEST + f'\nCI_ALLOWED_SKIPS = {allowed!r}\n')
  pytester.makepyfile(TESTS)
  if ci is None:
    monkeypatch.delenv('CI', raising=False)
  else:
    monkeypatch.setenv('CI', ci)
  result = pytester.runpytest('-p', 'no:cacheprovider')
  result.assert_outcomes(passed=1, skipped=1)
  assert result.ret == (1 if fails else 0)
  listed = '*test_skipped: needs a flux capacitor*'
  if fails:
    result.stdout.fnmatch_lines([listed])
  else:
    result.stdout.no_fnmatch_line(listed)


def test_a_module_level_skip_fails_under_ci(pytester, monkeypatch):
  pytester.makeconftest(CONFTEST)
  pytester.makepyfile("import pytest\npytest.importorskip('no_such_module_here')\n"
                      "def test_x():\n  pass\n")
  monkeypatch.setenv('CI', 'true')
  result = pytester.runpytest('-p', 'no:cacheprovider')
  assert result.ret == 1
  result.stdout.fnmatch_lines(["*could not import 'no_such_module_here'*"])
