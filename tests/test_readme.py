"""The README's two commands stay true: CI runs exactly the second one."""

import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parents[1]


def readme_commands():
  text = (ROOT / 'README.md').read_text()
  block = re.search(r'```bash\n(.*?)```', text, re.S).group(1)
  return [line for line in block.splitlines() if line.strip()]


def test_readme_begins_with_two_commands():
  text = (ROOT / 'README.md').read_text()
  assert text.index('```bash') < 200
  main, tests = readme_commands()
  assert main.startswith('pip install -e . && illada-')
  assert tests.startswith("pip install -e '.[test") and 'pytest' in tests


def test_ci_runs_the_readme_test_command():
  ci = (ROOT / '.ci' / 'run').read_text().splitlines()
  assert readme_commands()[1] in ci
