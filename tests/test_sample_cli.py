"""`illada-sample` / `illada-score` end to end on a tiny checkpoint with a word-level tokenizer."""

import json
import os

import jax
import numpy as np
import pytest

import illada_jax
from illada_jax import chat, sampling, scoring
from illada_jax.cli import sample as sample_cli
from illada_jax.cli import score as score_cli

SPECIALS = ['<s>', '<pad>', '</s>', '<unk>', '<|eot_id|>', '<[MASK]>']  # iLLaDA ids 0..5
WORDS = [f'w{i}' for i in range(58)]
CFG = illada_jax.get_preset('illada_tiny').replace(
    num_layers=2, d_model=64, num_heads=4, num_kv_heads=2, head_dim=16, mlp_hidden=96,
    vocab_size=64, max_len=64, param_dtype='float32', compute_dtype='float32',
    remat_policy='none')


@pytest.fixture(scope='module')
def ckpt(tmp_path_factory):
  from tokenizers import Tokenizer, models, pre_tokenizers
  root = tmp_path_factory.mktemp('ckpt')
  tok_dir = root / 'tok'
  tok_dir.mkdir()
  vocab = {t: i for i, t in enumerate(SPECIALS + WORDS)}
  tok = Tokenizer(models.WordLevel(vocab, unk_token='<unk>'))
  tok.pre_tokenizer = pre_tokenizers.Whitespace()
  tok.add_special_tokens(SPECIALS)
  tok.save(str(tok_dir / 'tokenizer.json'))
  params = illada_jax.init_params(CFG, jax.random.key(0))
  params = jax.tree.map(lambda x: x * 5, params)
  params['embedder']['embedding'] = params['embedder']['embedding'].at[CFG.mask_token_id].set(0.)
  path = str(root / 'model')
  illada_jax.save_checkpoint(path, CFG, params, tokenizer_dir=str(tok_dir))
  return path, params


def test_chat_format_is_the_llada_one():
  text = chat.chat_text([{'role': 'user', 'content': '  hi  '}])
  assert text == ('<|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|>'
                  '<|start_header_id|>assistant<|end_header_id|>\n\n')


def test_sample_cli_writes_jsonl_matching_generate(ckpt, tmp_path, capsys):
  path, params = ckpt
  out = tmp_path / 'out.jsonl'
  sample_cli.main(['--ckpt', path, '--prompt', 'w1 w2 w3', 'w7', '--gen-length', '8',
                   '--block-length', '4', '--steps', '8', '--out', str(out), '--show-denoising'])
  recs = [json.loads(line) for line in open(out)]
  assert [r['prompt'] for r in recs] == ['w1 w2 w3', 'w7']
  ids, mask = chat.left_pad([[7, 8, 9], [13]], CFG.pad_token_id)
  tokens = np.asarray(sampling.generate(CFG, params, ids, mask, gen_length=8, block_length=4,
                                        steps=8))
  for r, rec in enumerate(recs):
    assert rec['completion_ids'] == chat.completion_ids(CFG, tokens[r, 3:])
    assert rec['nfe'] == 8
  frames = [line for line in capsys.readouterr().out.splitlines() if line.startswith('step ')]
  assert len(frames) == 8 and frames[-1] == 'step 8/8'


def test_score_cli_predicts_the_best_choice(ckpt, tmp_path, capsys):
  path, params = ckpt
  data = tmp_path / 'items.jsonl'
  items = [{'context': 'w1 w2', 'choices': ['w3', 'w4 w5', 'w9'], 'answer': 0}]
  data.write_text('\n'.join(json.dumps(i) for i in items) + '\n')
  score_cli.main(['--ckpt', path, '--data', str(data), '--method', 'confidence'])
  rec = json.loads(capsys.readouterr().out.strip())
  want = scoring.confidence_score(CFG, params, [([7, 8], [9]), ([7, 8], [10, 11]),
                                                ([7, 8], [15])])
  np.testing.assert_allclose(rec['scores'], want, rtol=1e-6)
  assert rec['prediction'] == int(np.argmax(want))


class _Req:
  def __init__(self, *args):
    self.args = args


def test_lm_eval_adapter_scores_and_generates(ckpt):
  pytest.importorskip('lm_eval')
  from lm_eval.api.registry import get_model
  from illada_jax import lm_eval_adapter  # noqa: F401  (registers the model)
  path, params = ckpt
  lm = get_model('illada_jax').create_from_arg_string(f'ckpt={path},method=confidence,batch_size=4')
  got = lm.loglikelihood([_Req('w1 w2', ' w3'), _Req('w1 w2', ' w4 w5')])
  want = scoring.confidence_score(CFG, params, [([7, 8], [9]), ([7, 8], [10, 11])])
  np.testing.assert_allclose([g for g, _ in got], want, rtol=1e-6)
  mc = get_model('illada_jax').create_from_arg_string(f'ckpt={path},mc_num=1,mc_batch=1')
  one = mc.loglikelihood([_Req('w1 w2', ' w3')])[0][0]
  np.testing.assert_allclose(one, scoring.mc_log_likelihood(CFG, params, [([7, 8], [9])],
                                                            mc_num=1, batch_size=1)[0], rtol=1e-6)
  gen = get_model('illada_jax').create_from_arg_string(
      f'ckpt={path},gen_length=8,block_length=4,steps=8')
  texts = gen.generate_until([_Req('w1 w2 w3', {'until': ['w45'], 'max_gen_toks': 8}),
                              _Req('w7', {'until': [], 'max_gen_toks': 8})])
  ids, mask = chat.left_pad([[7, 8, 9], [13]], CFG.pad_token_id)
  tokens = np.asarray(sampling.generate(CFG, params, ids, mask, gen_length=8, block_length=4,
                                        steps=8))
  tok = chat.load_tokenizer(path)
  for r, text in enumerate(texts):
    full = tok.decode(chat.completion_ids(CFG, tokens[r, 3:]))
    assert text == (full.split('w45')[0] if r == 0 else full)


def test_chat_prompt_uses_the_checkpoint_template(ckpt, tmp_path):
  path, _ = ckpt
  tok = chat.load_tokenizer(path)
  plain = chat.prompt_ids(tok, CFG, 'w1 w2', chat=True, ckpt_dir=path)
  assert plain[0] == CFG.bos_token_id  # LLaDA format: BOS, then the rendered messages
  tdir = tmp_path / 'templated'
  tdir.mkdir()
  (tdir / 'tokenizer.json').write_text(open(os.path.join(path, 'tokenizer.json')).read())
  template = ("{{ bos_token }}{% for m in messages %}{{ m['content'] }} <|eot_id|> {% endfor %}"
              "{% if add_generation_prompt %}w9{% endif %}")
  (tdir / 'tokenizer_config.json').write_text(json.dumps({'chat_template': template}))
  ids = chat.prompt_ids(tok, CFG, [{'role': 'user', 'content': 'w1 w2'}], chat=False,
                        ckpt_dir=str(tdir))
  assert ids == [0, 7, 8, 4, 15]
