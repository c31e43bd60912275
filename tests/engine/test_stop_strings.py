"""Stop strings are found by decoding only the output's tail: the same first stop, at the same token,
as decoding the whole output after every token (SmolLM2's byte-level tokenizer)."""

from __future__ import annotations

import random

import pytest

from fieldprint.engine.engine import tail_has_stop

TEXT = ("Grüße aus Köln! 東京の天気は晴れ 🌤️ and the answer is 42. Human: next question? "
        "Naïve café façade — « quoted » ✓ done.\n\nUser: 🙂🙂 end")


def _first_stop(ids, check) -> int | None:
    return next((k for k in range(1, len(ids) + 1) if check(ids[:k])), None)


@pytest.mark.parametrize("seed", range(16))
def test_the_tail_finds_the_first_stop_where_the_whole_text_does(smollm2_tokenizer, seed):
    tok = smollm2_tokenizer
    rng = random.Random(seed)
    ids = list(tok(TEXT, add_special_tokens=False)["input_ids"])
    specials = sorted(set(tok.all_special_ids))
    for _ in range(rng.randrange(0, 6)):  # special tokens inside the output decode to nothing
        ids.insert(rng.randrange(len(ids)), rng.choice(specials))
    full = tok.decode(ids, skip_special_tokens=True)
    start = rng.randrange(len(full) - 12)
    stops = (full[start : start + rng.randrange(1, 12)], "never appears")
    whole = lambda prefix: any(s in tok.decode(prefix, skip_special_tokens=True) for s in stops)  # noqa: E731
    want = _first_stop(ids, whole)
    assert want is not None
    assert _first_stop(ids, lambda prefix: tail_has_stop(tok, prefix, stops)) == want


def test_no_stop_is_seen_in_text_that_has_none(smollm2_tokenizer):
    tok = smollm2_tokenizer
    ids = list(tok(TEXT * 3, add_special_tokens=False)["input_ids"])
    assert not any(tail_has_stop(tok, ids[:k], ("Assistant:", "🌧")) for k in range(1, len(ids) + 1))
