"""The end-of-thinking logit boost of iLLaDA-Instruct's evaluation (SPEC §2).

At every denoising step, a row whose generated part does not yet contain the
whole marker `e_0..e_{m-1}` (e.g. the tokens of `</think>`) and whose current
block still has a masked position gets, at the *first* masked position `q`
of that block, a bonus on the marker token that would come next:

    next  = e_j for the largest j in m-1..1 such that the j tokens right before q
            (all generated: q - P >= j) are e_0..e_{j-1}; otherwise e_0
    logits[q, next] += boost * clip((q - P + 1) / G, 0, 1) ** power

with `P` the prompt length and `G` the row's whole generation limit. The bonus
is added before candidates and confidences are computed, so it also raises
that candidate's confidence.

The sampler's canvas is rotated (`sampling.roll`): the current block is at
physical columns `[P, P + W)` and a row at block `k` holds logical column
`x` at physical column `(x - k W) mod L`. Rotation keeps cyclic neighbours
together, so the tokens right before `q` are the physical columns just before
it (mod L), and the generated part in logical order is one gather.
"""

from __future__ import annotations

import jax.numpy as jnp


def marker_ids(text: str, tokenizer) -> tuple[int, ...]:
  """Token ids of the marker `text` (`tokenizer.encode`, no special tokens added).

  Raises ValueError if the text encodes to nothing or does not decode back to
  itself (e.g. pieces the tokenizer maps to its unknown token).
  """
  ids = tuple(int(i) for i in tokenizer.encode(text))
  if not ids:
    raise ValueError(f'SamplingOptions.end_think: {text!r} encodes to no tokens')
  back = tokenizer.decode(ids)
  if back.strip() != text.strip():
    raise ValueError(f'SamplingOptions.end_think: {text!r} encodes to {list(ids)}, which '
                     f'decodes to {back!r}; pass the marker as token ids instead')
  return ids


def contains(gen_BG, marker: tuple[int, ...]):
  """bool `[B]`: the marker occurs as a contiguous run in `gen_BG` (int32 `[B, G]`)."""
  b, g = gen_BG.shape
  m = len(marker)
  if g < m:
    return jnp.zeros((b,), bool)
  hit_BS = jnp.ones((b, g - m + 1), bool)
  for u, e in enumerate(marker):
    hit_BS &= gen_BG[:, u:u + g - m + 1] == e
  return hit_BS.any(-1)


def boost(logits_BWV, x_BL, masked_BW, blk_B, limit_B, *, start: int, marker: tuple[int, ...],
          strength: float, power: float):
  """float32 `[B, W, V]` logits with the end-of-thinking bonus added (SPEC §2).

  Args:
    logits_BWV: float32 logits of the current block (physical columns
      `[start, start + W)` of the canvas), after classifier-free guidance.
    x_BL: int32 rotated canvas tokens; `start` is the prompt width `P`.
    masked_BW: bool, still-masked positions of the current block (rows that
      are inactive have none, so they get no bonus).
    blk_B: int32 block index of each row (its rotation is `blk_B * W`).
    limit_B: int32 whole generation limit `G` of each row, in tokens.
    marker: the marker's token ids `e_0..e_{m-1}`; strength, power: `boost`, `power`.
  """
  b, w, _ = logits_BWV.shape
  l = x_BL.shape[1]
  m = len(marker)
  rows_B = jnp.arange(b)
  # The generated part in logical order: offset t sits at physical (P + t - k W) mod L.
  t_G = jnp.arange(l - start)
  gen_BG = jnp.take_along_axis(x_BL, (start + t_G[None] - blk_B[:, None] * w) % l, axis=1)
  open_B = ~contains(gen_BG, marker) & masked_BW.any(-1)
  i_B = jnp.argmax(masked_BW, axis=-1)  # the first masked position of the block
  offset_B = blk_B * w + i_B  # q - P
  next_B = jnp.full((b,), marker[0], jnp.int32)
  for j in range(1, m):  # ascending, so the largest matching j wins
    ok_B = offset_B >= j
    for u in range(j):  # token e_u sits j - u columns before q
      ok_B &= x_BL[rows_B, (start + i_B - (j - u)) % l] == marker[u]
    next_B = jnp.where(ok_B, marker[j], next_B)
  progress_B = jnp.clip((offset_B + 1).astype(jnp.float32) / limit_B.astype(jnp.float32), 0., 1.)
  bonus_B = jnp.where(open_B, strength * progress_B ** power, 0.)
  return logits_BWV.at[rows_B, i_B, next_B].add(bonus_B)


def resolve(options, tokenizer):
  """`options` with a text `end_think` replaced by its token ids (boost on only).

  Raises ValueError naming the field if the text needs a tokenizer and none is given.
  """
  if options.end_think_boost == 0 or not isinstance(options.end_think, str):
    return options
  if tokenizer is None:
    raise ValueError(f'SamplingOptions.end_think: the text {options.end_think!r} needs a '
                     'tokenizer (pass tokenizer=, or the marker as token ids)')
  return options.replace(end_think=marker_ids(options.end_think, tokenizer))


def check_ids(options, vocab_size: int) -> None:
  """Raises ValueError if the boost is on and the marker is not ids inside the vocabulary."""
  if options.end_think_boost == 0:
    return
  if isinstance(options.end_think, str):
    raise ValueError(f'SamplingOptions.end_think: {options.end_think!r} is text; turn it into '
                     'ids with the tokenizer first (end_think.resolve)')
  bad = [i for i in options.end_think if not 0 <= i < vocab_size]
  if bad:
    raise ValueError(f'SamplingOptions.end_think: ids {bad} outside [0, {vocab_size})')



def answer(text: str, marker: str | tuple[int, ...], tokenizer) -> str:
  """The part of a completion after the first end-of-thinking marker (iLLaDA-Instruct
  writes its reasoning, the marker, then the answer); `text` itself if the marker never
  appears (the reasoning ran to the length limit). Leading whitespace is dropped.

  `marker` is text, or token ids decoded with `tokenizer`.
  """
  if not isinstance(marker, str):
    marker = tokenizer.decode(list(marker)).strip()
  head, found, tail = text.partition(marker)
  return tail.lstrip() if found else text
