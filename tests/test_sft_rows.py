"""Chat SFT rows: hand-checked token rows for both families' chat formats, the over-length
rule and its counts, bad records named by file and line, exact resume, and a short SFT run."""

import json
import math
import os
import types

import numpy as np
import pytest

from helpers import TRAIN_MODEL, word_tokenizer, write_jsonl
from illada_jax import data, prompts, sft_rows, text_tokenizer, train, train_config
from illada_jax.optimizer import OptimizerConfig

CHAT = [{'role': 'system', 'content': 'be brief .'},
        {'role': 'user', 'content': 'hi'},
        {'role': 'assistant', 'content': 'hello .'},
        {'role': 'user', 'content': 'what is two plus two ?'},
        {'role': 'assistant', 'content': 'four .'}]
WORDS = ['system', 'user', 'assistant', 'be', 'brief', '.', 'hi', 'hello', 'what', 'is', 'two',
         'plus', 'four', '?']

# LLaDA: its special tokens (SPEC §5) with small ids; '\n\n' is a token so the header's
# newlines show in the rows.
LLADA_SPECIALS = ['<|startoftext|>', '<|endoftext|>', '<|start_header_id|>', '<|end_header_id|>',
                  '<|eot_id|>', '<|mdm_mask|>', '<unk>']
LLADA_VOCAB = {t: i for i, t in enumerate(LLADA_SPECIALS + ['\n\n', '\n'] + WORDS)}
# LLaDA-8B-Instruct's template (the Llama-3 one), restated here by hand: BOS before the
# first message, contents trimmed, the assistant header as generation prompt.
LLADA_TEMPLATE = (
    "{% for m in messages %}"
    "{% set text = '<|start_header_id|>' + m['role'] + '<|end_header_id|>\n\n'"
    " + m['content'] | trim + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set text = bos_token + text %}{% endif %}{{ text }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}"
    "{% endif %}")

# iLLaDA: its id layout (BOS 0, PAD 1, EOS 2, MASK 5). Its real template is read from
# tokenizer_config.json and is unconfirmed (SPEC §5); this stand-in differs from LLaDA's on
# purpose: other turn tokens and text after the end of turn ('\n'), which belongs to the reply.
ILLADA_SPECIALS = ['<s>', '<pad>', '</s>', '<unk>', '<|eot_id|>', '<[MASK]>', '<|im_start|>',
                   '<|im_end|>']
ILLADA_VOCAB = {t: i for i, t in enumerate(ILLADA_SPECIALS + ['\n'] + WORDS)}
ILLADA_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|im_start|>{{ m['role'] }}{{ '\n' }}"
    "{{ m['content'] }}<|im_end|>{{ '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant{{ '\n' }}{% endif %}")


def _ids(vocab, text):
  return [vocab[t] for t in text.split(' ')]


# The two rows of CHAT, by hand: (prompt, response) per assistant turn.
LL = lambda s: _ids(LLADA_VOCAB, s.replace('NN', '\n\n'))
LLADA_ROWS = [
    (LL('<|startoftext|> <|start_header_id|> system <|end_header_id|> NN be brief . <|eot_id|> '
        '<|start_header_id|> user <|end_header_id|> NN hi <|eot_id|> '
        '<|start_header_id|> assistant <|end_header_id|> NN'),
     LL('hello . <|eot_id|>')),
    (LL('<|startoftext|> <|start_header_id|> system <|end_header_id|> NN be brief . <|eot_id|> '
        '<|start_header_id|> user <|end_header_id|> NN hi <|eot_id|> '
        '<|start_header_id|> assistant <|end_header_id|> NN hello . <|eot_id|> '
        '<|start_header_id|> user <|end_header_id|> NN what is two plus two ? <|eot_id|> '
        '<|start_header_id|> assistant <|end_header_id|> NN'),
     LL('four . <|eot_id|>')),
]
IL = lambda s: _ids(ILLADA_VOCAB, s.replace('N', '\n'))
ILLADA_ROWS = [
    (IL('<s> <|im_start|> system N be brief . <|im_end|> N <|im_start|> user N hi <|im_end|> N '
        '<|im_start|> assistant N'),
     IL('hello . <|im_end|> N')),
    (IL('<s> <|im_start|> system N be brief . <|im_end|> N <|im_start|> user N hi <|im_end|> N '
        '<|im_start|> assistant N hello . <|im_end|> N '
        '<|im_start|> user N what is two plus two ? <|im_end|> N <|im_start|> assistant N'),
     IL('four . <|im_end|> N')),
]
LLADA_EOS, ILLADA_EOS = LLADA_VOCAB['<|endoftext|>'], ILLADA_VOCAB['</s>']


def _llada_tok(root, template=None):
  conf = None if template is None else {'chat_template': template}
  return word_tokenizer(os.path.join(root, 'llada_tok'), LLADA_SPECIALS, WORDS,
                        added=['\n\n', '\n'], tokenizer_config=conf)


def _illada_tok(root):
  return word_tokenizer(os.path.join(root, 'illada_tok'), ILLADA_SPECIALS, WORDS, added=['\n'],
                        tokenizer_config={'chat_template': ILLADA_TEMPLATE})


def _rows(cfg, seq_len, **kw):
  """All rows of `cfg`'s files, in order, through the Grain pipeline."""
  ds = data.make_dataset(cfg, batch_size=1, seq_len=seq_len, objective='sft', seed=0,
                         process_index=0, process_count=1, repeat=False, **kw)
  return [(b['tokens'][0], b['response_mask'][0]) for b in ds]


def _want(prompt, response, seq_len, eos):
  tokens = prompt + response + [eos] * (seq_len - len(prompt) - len(response))
  return np.asarray(tokens), np.asarray([0] * len(prompt) + [1] * (seq_len - len(prompt)))


@pytest.mark.parametrize('family', ['llada', 'llada_jinja', 'illada'])
def test_two_turn_chat_gives_the_hand_checked_rows(tmp_path, family):
  """One row per assistant turn, history as prompt, the reply with its end of turn, EOS pad."""
  if family == 'illada':
    tok, rows, eos = _illada_tok(tmp_path), ILLADA_ROWS, ILLADA_EOS
  else:  # no template: the built-in LLaDA format; with LLaDA-8B-Instruct's Jinja: the same rows
    tok = _llada_tok(tmp_path, LLADA_TEMPLATE if family == 'llada_jinja' else None)
    rows, eos = LLADA_ROWS, LLADA_EOS
  path = write_jsonl(tmp_path / 'chat.jsonl', [{'messages': CHAT}])
  cfg = data.DataConfig(paths=(path,), tokenizer=tok, shuffle=False)
  assert (data.prompt_format(cfg).chat_template is None) == (family == 'llada')
  counts = sft_rows.SftCounts()
  got = _rows(cfg, 48, counts=counts)
  assert len(got) == 2
  for (tokens, mask), (prompt, response) in zip(got, rows):
    want_tokens, want_mask = _want(prompt, response, 48, eos)
    np.testing.assert_array_equal(tokens, want_tokens)
    np.testing.assert_array_equal(mask, want_mask)
  assert (counts.records, counts.rows, counts.truncated, counts.dropped) == (1, 2, 0, 0)
  # The prompt is what the sampler's --chat feeds the model for the same history.
  t = text_tokenizer.load(tok)
  fmt = prompts.PromptFormat.from_checkpoint(tok)
  for (prompt, _), end in zip(rows, (2, 4)):
    ids = types.SimpleNamespace(bos_token_id=t.bos_id, eos_token_id=t.eos_id)
    assert fmt.encode(t, ids, CHAT[:end]) == prompt  # what --chat / lm-eval / the server use
  # 'last': the final turn only.
  last = _rows(data.DataConfig(paths=(path,), tokenizer=tok, shuffle=False, chat_turns='last'), 48)
  assert len(last) == 1
  np.testing.assert_array_equal(last[0][0], got[1][0])


def test_over_length_rows_are_truncated_from_the_left_or_dropped_and_counted(tmp_path):
  """L=24: turn 2 (37 + 3 tokens) loses 16 prompt tokens after BOS; L=5 keeps BOS and one
  prompt token of each turn; L=4 leaves none, so both rows drop; 'drop' drops what is over."""
  tok = _llada_tok(tmp_path)
  path = write_jsonl(tmp_path / 'chat.jsonl', [{'messages': CHAT}])
  cfg = data.DataConfig(paths=(path,), tokenizer=tok, shuffle=False)
  (p1, r1), (p2, r2) = LLADA_ROWS
  assert (len(p1), len(r1), len(p2), len(r2)) == (19, 3, 37, 3)

  counts = sft_rows.SftCounts()
  got = _rows(cfg, 24, counts=counts)
  assert len(got) == 2
  np.testing.assert_array_equal(got[0][0], _want(p1, r1, 24, LLADA_EOS)[0])
  cut = p2[:1] + p2[17:]  # BOS kept, 16 oldest prompt tokens gone
  np.testing.assert_array_equal(got[1][0], cut + r2)
  np.testing.assert_array_equal(got[1][1], [0] * 21 + [1] * 3)
  assert (counts.rows, counts.truncated, counts.prompt_tokens_cut, counts.dropped) == (2, 1, 16, 0)
  assert data.sft_counts(cfg, seq_len=24) == counts  # the dry run counts the same

  got = _rows(cfg, 5)
  np.testing.assert_array_equal([t for t, _ in got], [[p1[0], p1[-1]] + r1, [p2[0], p2[-1]] + r2])
  assert data.sft_counts(cfg, seq_len=5) == sft_rows.SftCounts(
      records=1, rows=2, truncated=2, prompt_tokens_cut=17 + 35)
  assert data.sft_counts(cfg, seq_len=4) == sft_rows.SftCounts(records=1, rows=2, dropped=2)
  assert _rows(cfg, 4) == []

  drop = data.DataConfig(paths=(path,), tokenizer=tok, shuffle=False, chat_overlong='drop')
  got = _rows(drop, 24)
  assert len(got) == 1
  np.testing.assert_array_equal(got[0][0], _want(p1, r1, 24, LLADA_EOS)[0])
  assert data.sft_counts(drop, seq_len=24) == sft_rows.SftCounts(records=1, rows=2, dropped=1)


BAD = [
    ('{"text": "no chat here"}', 'needs "messages" or "prompt" and "response"'),
    ('{"messages": []}', 'must be a non-empty list'),
    ('{"messages": "hi"}', 'must be a non-empty list'),
    ('{"messages": [{"role": "user"}]}', 'message 0 must be an object with "role" and "content"'),
    ('{"messages": [{"role": "user", "content": "hi"}, {"role": "bot", "content": "x"}]}',
     "message 1 has role 'bot'"),
    ('{"messages": [{"role": "user", "content": 3}, {"role": "assistant", "content": "x"}]}',
     'content must be a string'),
    ('{"messages": [{"role": "user", "content": "hi"}]}', 'no assistant turn'),
    ('{"messages": [{"role": "assistant", "content": "hi"}]}', 'no user turn before it'),
    ('{"messages": [{"role": "user", "content": "hi"}, {"role": "system", "content": "x"}, '
     '{"role": "assistant", "content": "x"}]}', 'only the first may be'),
    ('{"messages": [', 'not valid JSON'),
]


@pytest.mark.parametrize('line, message', BAD)
def test_bad_records_are_named_by_file_and_line(tmp_path, line, message):
  tok = _llada_tok(tmp_path)
  good = json.dumps({'messages': CHAT[1:3]})
  path = write_jsonl(tmp_path / 'chat.jsonl', [good, '', line])  # the bad one is on line 3
  cfg = data.DataConfig(paths=(path,), tokenizer=tok, shuffle=False)
  with pytest.raises(ValueError) as e:
    data.sft_counts(cfg, seq_len=48)
  assert f'{path}:3' in str(e.value) and message in str(e.value)


def test_bad_arrayrecord_and_parquet_records_are_named_by_file_and_index(tmp_path):
  from array_record.python import array_record_module as arm
  import pyarrow as pa
  import pyarrow.parquet as pq
  tok = _llada_tok(tmp_path)
  good, bad = {'messages': CHAT[1:3]}, {'messages': CHAT[1:2]}
  files = [str(tmp_path / f'{k}.arrayrecord') for k in 'ab']
  for file, records in zip(files, ([good, good], [good, bad])):
    w = arm.ArrayRecordWriter(file, 'group_size:1')
    for r in records:
      w.write(json.dumps(r).encode())
    w.close()
  cfg = data.DataConfig(paths=tuple(files), tokenizer=tok)
  with pytest.raises(ValueError, match=f'{files[1]} record 1: the conversation has no assistant'):
    data.sft_counts(cfg, seq_len=48)
  parquet = str(tmp_path / 'c.parquet')
  pq.write_table(pa.Table.from_pylist([good, good, bad]), parquet)
  with pytest.raises(ValueError, match=f'{parquet} row 2: the conversation has no assistant'):
    data.sft_counts(data.DataConfig(paths=(parquet,), tokenizer=tok), seq_len=48)


def test_a_template_that_rewrites_the_history_is_refused(tmp_path):
  """If the turn's text does not follow its prompt's text, no reply can be split off."""
  template = ("{% for m in messages %}{{ m['content'] }} {% endfor %}"
              "{% if add_generation_prompt %}assistant{% endif %}")
  tok = word_tokenizer(tmp_path / 'tok', LLADA_SPECIALS, WORDS,
                       tokenizer_config={'chat_template': template})
  path = write_jsonl(tmp_path / 'chat.jsonl', [{'messages': CHAT[1:3]}])
  cfg = data.DataConfig(paths=(path,), tokenizer=tok)
  with pytest.raises(ValueError, match=f'{path}:1: the chat template does not render message 1'):
    data.sft_counts(cfg, seq_len=48)


def test_a_template_refusing_a_conversation_is_named_by_file_and_line(tmp_path):
  template = ("{% if messages[0]['role'] == 'system' %}{{ raise_exception('no system role') }}"
              "{% endif %}" + LLADA_TEMPLATE)
  tok = word_tokenizer(tmp_path / 'tok', LLADA_SPECIALS, WORDS,
                       tokenizer_config={'chat_template': template})
  path = write_jsonl(tmp_path / 'chat.jsonl', [{'messages': CHAT[1:3]}, {'messages': CHAT}])
  cfg = data.DataConfig(paths=(path,), tokenizer=tok)
  where = f'{path}:2: rendering message 2: {tok}/tokenizer_config.json'
  with pytest.raises(ValueError, match=f'{where}: chat template: no system'):
    data.sft_counts(cfg, seq_len=48)


def test_chat_template_setting_overrides_the_tokenizer_directory(tmp_path):
  tok = _llada_tok(tmp_path)  # no template beside it: the LLaDA format
  file = tmp_path / 'chat.jinja'
  file.write_text(ILLADA_TEMPLATE)
  conf = tmp_path / 'conf.json'
  conf.write_text(json.dumps({'chat_template': LLADA_TEMPLATE}))
  fmt = lambda src: data.prompt_format(data.DataConfig(tokenizer=tok, chat_template=src))
  assert fmt('').chat_template is None
  assert fmt(str(file)).chat_template == ILLADA_TEMPLATE
  assert fmt(str(conf)).chat_template == LLADA_TEMPLATE
  assert fmt(_illada_tok(tmp_path)).chat_template == ILLADA_TEMPLATE  # a directory
  with pytest.raises(ValueError, match=f'{tok}: no chat template'):
    fmt(tok)
  (tmp_path / 'other.json').write_text('{"chat_template": [{"name": "tool_use", "template": "x"}]}')
  with pytest.raises(ValueError, match='other.json has no "chat_template" .*tool_use'):
    fmt(str(tmp_path / 'other.json'))
  with pytest.raises(FileNotFoundError, match='data.chat_template'):
    fmt(str(tmp_path / 'missing.jinja'))


def test_resume_between_the_rows_of_one_conversation(tmp_path):
  """The saved iterator state may fall between two turns of a conversation; it resumes there."""
  tok = _llada_tok(tmp_path)
  chats = [{'messages': CHAT[:3 + 2 * (i % 2)]} for i in range(6)]  # 1 or 2 rows each
  chats.insert(2, {'prompt': 'hi', 'response': 'hello .'})  # a pair between them
  path = write_jsonl(tmp_path / 'chat.jsonl', chats)
  cfg = data.DataConfig(paths=(path,), tokenizer=tok)
  kw = dict(batch_size=1, seq_len=48, objective='sft', seed=1, process_index=0, process_count=1)
  it = iter(data.make_dataset(cfg, **kw))
  states, rows = [], []
  for _ in range(12):
    states.append(it.get_state())
    rows.append(next(it)['tokens'])
  four = LLADA_VOCAB['four']
  mid = [k for k in range(12) if four in rows[k]][:2]  # states just before a second turn
  assert mid and all(four not in rows[k - 1] for k in mid)
  for k in [0] + mid:  # each state resumes to the same following rows
    it2 = iter(data.make_dataset(cfg, **kw))
    it2.set_state(json.loads(json.dumps(states[k])))
    for want in rows[k:k + 3]:
      np.testing.assert_array_equal(next(it2)['tokens'], want)


@pytest.mark.slow
def test_sft_on_chat_records_through_the_train_loop(tmp_path):
  """A few steps of SFT from a messages JSONL through `train.train`: the held-out loss
  (fixed batches and noise) falls between the two evaluations."""
  tok = _illada_tok(tmp_path)
  qa = [('hi', 'hello .'), ('what is two plus two ?', 'four .'), ('be brief .', 'hello .')]
  chats = [{'messages': [{'role': 'user', 'content': q}, {'role': 'assistant', 'content': a}]}
           for q, a in qa] * 8
  path = write_jsonl(tmp_path / 'chat.jsonl', chats)
  cfg = train_config.TrainConfig(
      model=TRAIN_MODEL, data=data.DataConfig(paths=(path,), tokenizer=tok), objective='sft',
      optimizer=OptimizerConfig(lr=3e-3, warmup_steps=2, total_steps=16), batch_size=8,
      seq_len=24, steps=16, mesh='data=2,fsdp=2,tensor=2', workdir=str(tmp_path / 'run'),
      log_every=1, checkpoint_every=0, eval_every=8, eval_batches=2, progress_bar=False,
      loss_chunk=8)
  out = train.train(cfg)
  assert out['final_step'] == 16 and all(math.isfinite(x) for x in out['losses'].values())
  assert out['eval'][16] < out['eval'][8], out['eval']
  assert os.path.isdir(out['checkpoint_dir'])


def test_pair_prompts_too_long_are_dropped_and_all_dropped_is_an_error(tmp_path, monkeypatch):
  """A pair whose prompt leaves no room for a response token is dropped and counted (not a
  crash that a resume would hit again); a data set where no row fits raises instead of
  reading forever."""
  tok = _llada_tok(tmp_path)
  short, long = {'prompt': 'hi', 'response': 'ok'}, {'prompt': 'hi ' * 40, 'response': 'ok'}
  path = write_jsonl(tmp_path / 'pairs.jsonl', [short, long, short])
  cfg = data.DataConfig(paths=(path,), tokenizer=tok, shuffle=False)
  counts = data.sft_counts(cfg, seq_len=16)
  assert (counts.records, counts.rows, counts.dropped) == (3, 3, 1)
  assert len(_rows(cfg, 16)) == 2
  monkeypatch.setattr(sft_rows, 'NO_ROW_LIMIT', 2)
  only_long = data.DataConfig(paths=(write_jsonl(tmp_path / 'long.jsonl', [long] * 3),),
                              tokenizer=tok, shuffle=False)
  with pytest.raises(ValueError, match='no SFT row fits seq_len=16'):
    data.sft_counts(only_long, seq_len=16)


def test_a_pair_response_that_does_not_fit_is_cut_without_an_eos_and_logged(tmp_path, caplog):
  tok = _llada_tok(tmp_path)
  fits, long = {'prompt': 'hi', 'response': 'ok'}, {'prompt': 'hi', 'response': 'ok ' * 40}
  path = write_jsonl(tmp_path / 'pairs.jsonl', [fits, long])
  cfg = data.DataConfig(paths=(path,), tokenizer=tok, shuffle=False)
  with caplog.at_level('WARNING', logger=sft_rows.__name__):
    (first, _), (cut, cut_mask) = _rows(cfg, 16)
  eos = int(first[-1])  # a row that fits is padded with EOS
  ok = int(first[np.flatnonzero(first == eos)[0] - 1])
  assert list(cut[-4:]) == [ok] * 4 and cut_mask[-1] == 1  # the answer runs to the end
  assert eos not in cut
  assert data.sft_counts(cfg, seq_len=16).responses_cut == 1
  assert any('responses_cut' in r.getMessage() and 'pairs.jsonl:2' in r.getMessage()
             for r in caplog.records), [r.getMessage() for r in caplog.records]
