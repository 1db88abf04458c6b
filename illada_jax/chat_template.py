"""Chat templates where transformers finds them, rendered as transformers renders them (SPEC §5).

Finding (`find`), in transformers' order: `chat_template.jinja` (the default)
and `additional_chat_templates/<name>.jinja` beside the tokenizer, else the
`chat_template` of `tokenizer_config.json`, a string or a list of
`{"name", "template"}`. A name picks one template; without, it is
`default` (several templates and none named so is an error, as in transformers).

Rendering (`render`) goes through transformers' own renderer,
`transformers.utils.chat_template_utils.render_jinja_template`, when
transformers is installed (it imports without torch): its sandboxed
environment with loop controls, the `generation` tag, `raise_exception`,
`strftime_now`, `tojson`, and its `continue_final_message`. Without
transformers, `_fallback_template` builds the same environment (the only
place this module copies behaviour instead of calling it). The template sees
the tokenizer's special tokens as variables (`bos_token`, `eos_token`, ...),
exactly the `tokenizer.special_tokens_map` that `apply_chat_template` passes.

Every failure (a file that is not UTF-8 or JSON, a template that does not
compile or raises while rendering) is a ValueError naming the file.
"""

from __future__ import annotations

import datetime
import functools
import json
import os
from typing import Any, Mapping, Sequence

TEMPLATE_FILE = 'chat_template.jinja'
TEMPLATE_DIR = 'additional_chat_templates'
TOKENIZER_CONFIG = 'tokenizer_config.json'
SPECIAL_TOKENS_MAP = 'special_tokens_map.json'
# transformers' `SPECIAL_TOKENS_ATTRIBUTES`: the variables a template sees.
SPECIAL_TOKEN_NAMES = ('bos_token', 'eos_token', 'unk_token', 'sep_token', 'pad_token',
                       'cls_token', 'mask_token')
# The LLaDA chat format (SPEC §5), used when a checkpoint has no template: BOS,
# `<|start_header_id|>{role}<|end_header_id|>\n\n{content}<|eot_id|>` per message,
# then the assistant header.
LLADA_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}"
    "<|end_header_id|>\n\n{{ m['content'] | trim }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}")


def read_template(path: str) -> str:
  """The text of a template file; ValueError naming it if unreadable."""
  try:
    with open(path, encoding='utf-8') as f:
      return f.read()
  except (OSError, UnicodeDecodeError) as e:
    raise ValueError(f'{path}: cannot read the chat template ({e})') from None


def json_file(path: str) -> Any:
  """A JSON file's value; ValueError naming it if unreadable."""
  try:
    with open(path, encoding='utf-8') as f:
      return json.load(f)
  except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
    raise ValueError(f'{path}: not valid JSON ({e})') from None


def templates(directory: str | os.PathLike) -> tuple[dict[str, str], str | None]:
  """({name: template}, the file they come from) of a tokenizer directory; ({}, None) if none."""
  directory = os.fspath(directory)
  found, where = {}, None
  jinja = os.path.join(directory, TEMPLATE_FILE)
  if os.path.isfile(jinja):
    found['default'], where = read_template(jinja), jinja
  extra = os.path.join(directory, TEMPLATE_DIR)
  if os.path.isdir(extra):
    for name in sorted(os.listdir(extra)):
      if name.endswith('.jinja'):
        found[name[:-len('.jinja')]] = read_template(os.path.join(extra, name))
        where = where or extra
  if found:
    return found, where
  conf_path = os.path.join(directory, TOKENIZER_CONFIG)
  return templates_in_json(conf_path) if os.path.isfile(conf_path) else ({}, None)


def templates_in_json(path: str) -> tuple[dict[str, str], str | None]:
  """({name: template}, path) of the `chat_template` key of a JSON file ({}, None without one).

  The value is a string (named 'default') or a list of `{"name", "template"}`;
  anything else raises ValueError naming the file.
  """
  conf = json_file(path)
  value = conf.get('chat_template') if isinstance(conf, dict) else None
  if value is None:
    return {}, None
  if isinstance(value, str):
    return {'default': value}, path
  if isinstance(value, list) and all(isinstance(t, Mapping) and isinstance(t.get('name'), str)
                                     and isinstance(t.get('template'), str) for t in value):
    return {t['name']: t['template'] for t in value}, path
  raise ValueError(f'{path}: "chat_template" must be a string or a list of '
                   '{"name", "template"} objects')


def find(directory: str | os.PathLike | None, name: str | None = None
         ) -> tuple[str | None, str | None]:
  """(template, where it was read) of `directory`, the one called `name` (default: 'default').

  (None, None) if the directory has no template and no name was asked for.
  Raises ValueError naming the file for a name it does not hold, or several
  templates and none called 'default'.
  """
  found, where = templates(directory) if directory else ({}, None)
  if not found and name is None:
    return None, None
  pick = name or 'default'
  if pick not in found:
    if not found:
      raise ValueError(f'{directory}: no chat template (looked for {TEMPLATE_FILE}, '
                       f'{TEMPLATE_DIR}/, "chat_template" in {TOKENIZER_CONFIG})')
    raise ValueError(f'{where}: no chat template named {pick!r}; have {sorted(found)}'
                     + ('' if name else ' (name one)'))
  return found[pick], where


def special_tokens(directory: str | os.PathLike | None) -> dict[str, str]:
  """{name: text} of the named special tokens (`bos_token`, ...) the tokenizer files declare.

  `tokenizer_config.json` first, then `special_tokens_map.json`; a value is a
  string or an AddedToken dict with `content`.
  """
  out: dict[str, str] = {}
  for file in (TOKENIZER_CONFIG, SPECIAL_TOKENS_MAP):
    path = os.path.join(os.fspath(directory), file) if directory else None
    conf = json_file(path) if path and os.path.isfile(path) else {}
    for key in SPECIAL_TOKEN_NAMES:
      v = conf.get(key) if isinstance(conf, dict) else None
      v = v.get('content') if isinstance(v, Mapping) else v
      if isinstance(v, str) and key not in out:
        out[key] = v
  return out


def render(template: str, messages: Sequence[Mapping], tokens: Mapping[str, str], *,
           add_generation_prompt: bool = True, continue_final_message: bool = False,
           where: str = '<template>', **kwargs) -> str:
  """The text of `messages` under `template`, as `apply_chat_template(tokenize=False)` gives it.

  `tokens` are the special-token variables (`special_tokens`); `kwargs` more
  template variables. `continue_final_message`: the last message is left
  open for the model to continue (transformers' semantics; not with
  `add_generation_prompt`). Raises ValueError naming `where` if the template
  does not compile or fails on these messages.
  """
  import jinja2
  if continue_final_message and add_generation_prompt:
    raise ValueError('continue_final_message and add_generation_prompt exclude each other')
  variables = {**tokens, **kwargs}
  messages = [{k: v for k, v in dict(m).items() if v is not None} for m in messages]
  try:
    renderer = _transformers_renderer()
    if renderer is not None:
      return renderer([messages], chat_template=template,
                      add_generation_prompt=add_generation_prompt,
                      continue_final_message=continue_final_message, **variables)[0][0]
    return _render_fallback(template, messages, add_generation_prompt, continue_final_message,
                            variables)
  except (jinja2.TemplateError, ValueError, TypeError) as e:
    raise ValueError(f'{where}: chat template: {e}') from None


@functools.lru_cache(maxsize=1)
def _transformers_renderer():
  """transformers' `render_jinja_template`, or None where transformers is not installed."""
  try:
    from transformers.utils.chat_template_utils import render_jinja_template
  except ImportError:
    return None
  return render_jinja_template


# -- without transformers: the same environment -------------------------------------

_CONTINUE_TAG = 'CONTINUE_FINAL_MESSAGE_TAG '  # transformers' marker, cut off after rendering


def _render_fallback(template, messages, add_generation_prompt, continue_final_message,
                     variables) -> str:
  if continue_final_message:
    if not messages or not isinstance(messages[-1].get('content'), str):
      raise ValueError('continue_final_message: the last message has no text content')
    final = messages[-1]['content']
    messages = messages[:-1] + [{**messages[-1], 'content': final + _CONTINUE_TAG}]
  text = _fallback_template(template).render(
      messages=messages, tools=None, documents=None,
      add_generation_prompt=add_generation_prompt, **variables)
  if not continue_final_message:
    return text
  if final.strip() not in text or _CONTINUE_TAG.strip() not in text:
    raise ValueError('continue_final_message: the template does not render the final message')
  cut = text.rindex(_CONTINUE_TAG.strip())
  return text[:cut] if text[cut:cut + len(_CONTINUE_TAG)] == _CONTINUE_TAG else \
      text[:cut].rstrip()


@functools.lru_cache(maxsize=8)
def _fallback_template(template: str):
  """`template` compiled in transformers' chat environment, rebuilt (see module docstring)."""
  import jinja2
  import jinja2.ext
  import jinja2.sandbox

  class Generation(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` renders its body (transformers tracks it)."""
    tags = {'generation'}

    def parse(self, parser):
      lineno = next(parser.stream).lineno
      body = parser.parse_statements(['name:endgeneration'], drop_needle=True)
      return jinja2.nodes.CallBlock(self.call_method('_body'), [], [], body).set_lineno(lineno)

    def _body(self, caller):
      return caller()

  def raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)

  def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)

  env = jinja2.sandbox.ImmutableSandboxedEnvironment(
      trim_blocks=True, lstrip_blocks=True, extensions=[Generation, jinja2.ext.loopcontrols])
  env.filters['tojson'] = tojson
  env.globals.update(raise_exception=raise_exception,
                     strftime_now=lambda fmt: datetime.datetime.now().strftime(fmt))
  return env.from_string(template)
