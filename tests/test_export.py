"""`jax.export` for `cuda` and `tpu` from this CPU: each program holds the real kernel.

The Pallas dispatch picks its kernel by the platform being lowered for
(`jax.lax.platform_dependent`), so exporting the model forward, its gradient,
the engine's block program and the int8 forward for a GPU or a TPU lowers
the Triton or Mosaic kernel here, catching lowering errors (block shapes,
unsupported ops, dtypes) without an accelerator.

Triton's custom call (`__gpu$xla.gpu.triton`) is not on jax.export's list of
custom calls with a compatibility guarantee (its payload is Triton IR of one
jax version), so its safety check is disabled explicitly for the `cuda`
exports; these exports are a lowering check, not artifacts to keep.
Mosaic's `tpu_custom_call` is on the list and keeps the check.
"""

import jax
import jax.numpy as jnp
import pytest

import illada_jax
from illada_jax import engine, model, sampling

TRITON = '__gpu$xla.gpu.triton'
MOSAIC = 'tpu_custom_call'
DISABLED = {'cuda': [jax.export.DisabledSafetyCheck.custom_call(TRITON)], 'tpu': []}

# The 8B attention layout (H=32, K=8, Dh=128: the kernels' real tiles) in one
# narrow layer, L = 256.
CFG = illada_jax.get_preset('illada_8b').replace(
    num_layers=1, d_model=256, mlp_hidden=512, vocab_size=512, max_len=512,
    attention_impl='pallas')
TOKENS = jax.ShapeDtypeStruct((2, 256), jnp.int32)


def _export(fn, platform, *args) -> str:
  return jax.export.export(jax.jit(fn), platforms=[platform],
                           disabled_checks=DISABLED[platform])(*args).mlir_module()


def _forward(cfg):
  return lambda p, t: model.build(cfg).apply({'params': p}, t)


def _grad(p, t):
  def loss(p):
    logits = model.Transformer(CFG).apply({'params': p}, t)
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), t[..., None], -1))
  return jax.grad(loss)(p)


def _kernels(text: str) -> dict:
  return {'triton': text.count(TRITON), 'mosaic': text.count(MOSAIC),
          'names': {n for n in ('illada_flash_fwd', 'illada_flash_dkv', 'illada_flash_dq')
                    if n in text}}


def _programs():
  o = sampling.SamplingOptions(gen_length=64, block_length=32, threshold=0.9, cache='dual')
  qcfg = CFG.replace(quantize='int8')
  block = engine.block_program(CFG, o, 128)
  return {
      'forward': (_forward(CFG), (model.abstract_params(CFG), TOKENS), 1),
      'grad': (_grad, (model.abstract_params(CFG), TOKENS), 3),
      'block_program': (lambda *a: block(*a), (model.abstract_params(CFG),
                                              *engine.abstract_block_inputs(CFG, o, 4, 128)), 1),
      'int8_forward': (_forward(qcfg), (model.abstract_params(qcfg), TOKENS), 1),
  }


@pytest.mark.parametrize('platform', ['cuda', 'tpu'])
@pytest.mark.parametrize('program', ['forward', 'grad', 'block_program', 'int8_forward'])
def test_export_holds_the_platforms_kernel(program, platform):
  fn, args, kernels = _programs()[program]
  got = _kernels(_export(fn, platform, *args))
  if platform == 'cuda':
    # forward; + dK/dV and dQ for the gradient (the remat recomputation may add one)
    assert got['triton'] >= kernels and got['mosaic'] == 0, got
  else:
    assert got['mosaic'] >= kernels and got['triton'] == 0, got
    want = {'illada_flash_fwd'} | ({'illada_flash_dkv', 'illada_flash_dq'} if kernels > 1 else set())
    assert got['names'] == want, got


def test_triton_export_is_refused_without_the_disabled_check():
  """Why the cuda exports above disable one check: jax.export refuses Triton's call."""
  with pytest.raises(ValueError, match='custom call'):
    jax.export.export(jax.jit(_forward(CFG)), platforms=['cuda'])(model.abstract_params(CFG), TOKENS)
