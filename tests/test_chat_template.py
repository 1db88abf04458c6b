"""Chat templates: found where transformers saves them, rendered and tokenized as
`AutoTokenizer.apply_chat_template` does, one path from messages to ids."""

import json
import os
import types

import pytest

from helpers import make_data, transformers_tokenizer
from illada_jax import chat_template, prompts, text_tokenizer

# Shapes real checkpoints use, written here by hand.
LLAMA3 = (  # BOS text, header tokens, trimmed contents, a date from strftime_now
    "{{- bos_token }}{% if messages[0]['role'] == 'system' %}"
    "{% set system = messages[0]['content'] | trim %}{% set messages = messages[1:] %}"
    "{% else %}{% set system = 'Today is ' + strftime_now('%Y') + '.' %}{% endif %}"
    "{{- '<|start_header_id|>system<|end_header_id|>\n\n' + system + '<|eot_id|>' }}"
    "{% for m in messages %}"
    "{{- '<|start_header_id|>' + m['role'] + '<|end_header_id|>\n\n' + m['content'] | trim"
    " + '<|eot_id|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}"
    "{% endif %}")
CHATML = (  # a default system message, no BOS
    "{% if messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant .<|im_end|>\n' }}{% endif %}"
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
EOS_USER = (  # Zephyr / Mistral: the reply ends in the eos_token variable
    "{% for message in messages %}{% if message['role'] == 'user' %}"
    "{{ '<|user|>\n' + message['content'] + eos_token }}"
    "{% elif message['role'] == 'system' %}{{ '<|system|>\n' + message['content'] + eos_token }}"
    "{% elif message['role'] == 'assistant' %}"
    "{{ '<|assistant|>\n' + message['content'] + eos_token }}"
    "{% endif %}{% if loop.last and add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
    "{% endfor %}")
LOOP_CONTROLS = (  # {% continue %} / {% break %}, raise_exception, tojson
    "{% for m in messages %}{% if m['role'] == 'system' %}{% continue %}{% endif %}"
    "{% if m['role'] not in ['user', 'assistant'] %}{{ raise_exception('bad role') }}{% endif %}"
    "{{ bos_token + m['role'] + ': ' + m['content'] | tojson + '\n' }}"
    "{% if loop.index >= 6 %}{% break %}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'assistant:' }}{% endif %}")
GENERATION = (  # SmolLM3-style {% generation %} around the replies
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' }}"
    "{% if m['role'] == 'assistant' %}{% generation %}{{ m['content'] + '<|im_end|>' }}"
    "{% endgeneration %}{% else %}{{ m['content'] + '<|im_end|>' }}{% endif %}{{ '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
TEMPLATES = {'llama3': LLAMA3, 'chatml': CHATML, 'eos_user': EOS_USER,
             'loop_controls': LOOP_CONTROLS, 'generation': GENERATION}
ADDED = ('<|start_header_id|>', '<|end_header_id|>', '<|eot_id|>', '<|im_start|>', '<|im_end|>')
ROLES = dict(bos_token='<s>', eos_token='</s>', unk_token='<unk>', pad_token='<pad>')

CHAT = [{'role': 'system', 'content': 'be brief .'},
        {'role': 'user', 'content': 'what is two plus two ?'},
        {'role': 'assistant', 'content': 'four .'},
        {'role': 'user', 'content': 'the cat sat on the mat ?'}]
NO_SYSTEM = CHAT[1:]
PREFILL = CHAT[1:3]  # ends in an assistant message: continued, not closed


def _ids(cfg_tok):
  return types.SimpleNamespace(bos_token_id=cfg_tok.bos_id, eos_token_id=cfg_tok.eos_id)


@pytest.mark.torch
@pytest.mark.parametrize('name', sorted(TEMPLATES))
def test_text_and_ids_as_transformers_apply_chat_template(tmp_path, name):
  transformers = pytest.importorskip('transformers')
  path = transformers_tokenizer(tmp_path / 'tok', TEMPLATES[name], added=ADDED, **ROLES)
  assert os.path.isfile(os.path.join(path, 'chat_template.jinja'))  # how transformers 5 saves
  hf = transformers.AutoTokenizer.from_pretrained(path)
  fmt = prompts.PromptFormat.from_checkpoint(path)
  tok = text_tokenizer.load(path)
  texts = []
  for messages, gen in ((CHAT, True), (NO_SYSTEM, True), (CHAT, False), (PREFILL, False)):
    cont = not gen and messages[-1]['role'] == 'assistant'
    kw = dict(add_generation_prompt=gen, continue_final_message=cont)
    want_text = hf.apply_chat_template(messages, tokenize=False, **kw)
    want_ids = hf.apply_chat_template(messages, tokenize=True, return_dict=False, **kw)
    assert fmt.render(tok, messages, add_generation_prompt=gen) == want_text, (messages, gen)
    assert fmt.encode(tok, _ids(tok), messages, add_generation_prompt=gen) == want_ids
    texts.append((want_text, want_ids))
  assert texts[3][0].endswith('four .')  # the prefill is continued
  if name == 'eos_user':  # the eos_token variable is the EOS text, which encodes to its id
    assert texts[0][0].count('</s>') == 4 and texts[0][1].count(tok.eos_id) == 4
  if name == 'llama3':
    assert texts[0][1][0] == tok.bos_id and texts[0][1].count(tok.bos_id) == 1


@pytest.mark.parametrize('name', sorted(TEMPLATES))
def test_the_fallback_environment_renders_as_transformers(monkeypatch, name):
  """Without transformers, the same text (its renderer is what the other test checks)."""
  tokens = {'bos_token': '<s>', 'eos_token': '</s>'}
  cases = [(m, g) for m, g in ((CHAT, True), (NO_SYSTEM, True), (CHAT, False), (PREFILL, False))]
  want = [chat_template.render(TEMPLATES[name], m, tokens, add_generation_prompt=g,
                               continue_final_message=not g and m[-1]['role'] == 'assistant')
          for m, g in cases]
  monkeypatch.setattr(chat_template, '_transformers_renderer', lambda: None)
  got = [chat_template.render(TEMPLATES[name], m, tokens, add_generation_prompt=g,
                              continue_final_message=not g and m[-1]['role'] == 'assistant')
         for m, g in cases]
  assert got == want
  assert 'four .' in got[3] and not got[3].rstrip().endswith(('<|im_end|>', '<|eot_id|>', '</s>'))


@pytest.mark.torch
def test_named_templates_in_tokenizer_config_and_additional_files(tmp_path):
  transformers = pytest.importorskip('transformers')
  named = {'default': CHATML, 'tool_use': LLAMA3}
  legacy = tmp_path / 'legacy'  # transformers 4.x: a list in tokenizer_config.json
  transformers_tokenizer(legacy, None, added=ADDED, **ROLES)
  conf = json.loads((legacy / 'tokenizer_config.json').read_text())
  conf['chat_template'] = [{'name': k, 'template': v} for k, v in named.items()]
  (legacy / 'tokenizer_config.json').write_text(json.dumps(conf))
  saved = transformers_tokenizer(tmp_path / 'saved', named, added=ADDED, **ROLES)  # 5.x files
  assert os.path.isfile(os.path.join(saved, 'additional_chat_templates', 'tool_use.jinja'))
  for path in (str(legacy), saved):
    hf = transformers.AutoTokenizer.from_pretrained(path)
    tok = text_tokenizer.load(path)
    for name in (None, 'tool_use'):
      fmt = prompts.PromptFormat.from_checkpoint(path, name)
      assert fmt.chat_template == named[name or 'default']
      assert fmt.render(tok, CHAT) == hf.apply_chat_template(
          CHAT, chat_template=name, tokenize=False, add_generation_prompt=True)
    with pytest.raises(ValueError, match="no chat template named 'other'"):
      prompts.PromptFormat.from_checkpoint(path, 'other')
  del conf['chat_template'][0]  # several templates, none 'default'
  (legacy / 'tokenizer_config.json').write_text(json.dumps(conf))
  with pytest.raises(ValueError, match=r"tokenizer_config.json: no chat template named 'default'"):
    prompts.PromptFormat.from_checkpoint(str(legacy))


def test_a_template_that_cannot_render_names_its_file(tmp_path):
  (tmp_path / 'chat_template.jinja').write_text('{% for m in messages %}{{ m.content }')
  fmt = prompts.PromptFormat.from_checkpoint(str(tmp_path))
  tok = types.SimpleNamespace(id_to_piece=str)
  with pytest.raises(ValueError, match=f'{tmp_path}/chat_template.jinja: chat template: '):
    fmt.render(tok, CHAT)
  (tmp_path / 'chat_template.jinja').write_bytes(b'\xff\xfe')
  with pytest.raises(ValueError, match='chat_template.jinja: cannot read'):
    prompts.PromptFormat.from_checkpoint(str(tmp_path))


def test_sentencepiece_bos_written_as_text_is_one_bos(tmp_path):
  """A SentencePiece BOS ('<s>', a control piece) in rendered text is its id, once."""
  _, model = make_data(str(tmp_path))
  tok = text_tokenizer.load(model)
  assert len(tok.encode('<s>')) > 1  # plain SentencePiece spells it out
  fmt = prompts.PromptFormat(add_bos=True, chat_template=LLAMA3)
  cfg = types.SimpleNamespace(bos_token_id=0, eos_token_id=2)
  ids = fmt.encode(tok, cfg, CHAT)
  text = fmt.render(tok, CHAT, 0, 2)
  assert text.startswith('<s><|start_header_id|>')
  assert ids[0] == 0 and ids.count(0) == 1
  assert ids[1:] == tok.encode(text[len('<s>'):])
  # The rendered text given as a plain prompt (lm-eval's path) is the same ids: no second BOS.
  assert fmt.encode(tok, cfg, text) == ids
  # The LLaDA format (no template) puts the BOS first the same way.
  llada = prompts.PromptFormat().encode(tok, cfg, CHAT)
  assert llada[0] == 0 and llada.count(0) == 1


def test_checkpoint_directories_carry_every_template_file(tmp_path):
  """Converted checkpoints and step directories copy the files transformers reads templates
  from (`store.copy_tokenizer_files`), and a format written there reads back the same."""
  from illada_jax.checkpoint import store
  src, dst = tmp_path / 'src', tmp_path / 'dst'
  (src / 'additional_chat_templates').mkdir(parents=True)
  (src / 'chat_template.jinja').write_text(CHATML)
  (src / 'additional_chat_templates' / 'tool_use.jinja').write_text(LLAMA3)
  (src / 'tokenizer_config.json').write_text(json.dumps({'eos_token': '</s>'}))
  dst.mkdir()
  copied = store.copy_tokenizer_files(src, dst)
  assert {'chat_template.jinja', 'additional_chat_templates', 'tokenizer_config.json'} <= set(
      copied)
  for name in (None, 'tool_use'):
    assert (prompts.PromptFormat.from_checkpoint(str(dst), name) ==
            prompts.PromptFormat.from_checkpoint(str(src), name))
  step = tmp_path / 'step'
  step.mkdir()
  fmt = prompts.PromptFormat(add_bos=True, chat_template=GENERATION)
  fmt.write(str(step))  # what a training step directory gets for data.chat_template
  assert (step / 'chat_template.jinja').read_text() == GENERATION
  assert prompts.PromptFormat.from_checkpoint(str(step)) == fmt
