"""The output's text as tokens come, read from short windows instead of the whole output after every
token: stop strings found in the tail (the same first stop, at the same token, as the whole text), and
the streamed text (always a prefix of the whole text, and all of it once it ends in whole characters).
SmolLM2's byte-level tokenizer, on text with multi-byte characters and special tokens inside."""

from __future__ import annotations

import random

import pytest

from fieldprint.engine.engine import StreamText, tail_has_stop

TEXT = ("Grüße aus Köln! 東京の天気は晴れ 🌤️ and the answer is 42. Human: next question? "
        "Naïve café façade — « quoted » ✓ done.\n\nUser: 🙂🙂 end")


def _with_specials(tok, ids: list[int], rng: random.Random) -> list[int]:
    """ids with up to five special tokens inserted (they decode to nothing)."""
    ids, specials = list(ids), sorted(set(tok.all_special_ids))
    for _ in range(rng.randrange(0, 6)):
        ids.insert(rng.randrange(len(ids)), rng.choice(specials))
    return ids


def _first_stop(ids, check) -> int | None:
    return next((k for k in range(1, len(ids) + 1) if check(ids[:k])), None)


@pytest.mark.parametrize("seed", range(16))
def test_the_tail_finds_the_first_stop_where_the_whole_text_does(smollm2_tokenizer, seed):
    tok = smollm2_tokenizer
    rng = random.Random(seed)
    ids = _with_specials(tok, tok(TEXT, add_special_tokens=False)["input_ids"], rng)
    full = tok.decode(ids, skip_special_tokens=True)
    start = rng.randrange(len(full) - 12)
    stops = (full[start : start + rng.randrange(1, 12)], "never appears")
    whole = lambda prefix: any(s in tok.decode(prefix, skip_special_tokens=True) for s in stops)  # noqa: E731
    want = _first_stop(ids, whole)
    assert want is not None
    assert _first_stop(ids, lambda prefix: tail_has_stop(tok, prefix, stops, frozenset(tok.all_special_ids))) == want


def test_no_stop_is_seen_in_text_that_has_none(smollm2_tokenizer):
    tok = smollm2_tokenizer
    ids = list(tok(TEXT * 3, add_special_tokens=False)["input_ids"])
    special = frozenset(tok.all_special_ids)
    assert not any(tail_has_stop(tok, ids[:k], ("Assistant:", "🌧"), special) for k in range(1, len(ids) + 1))


@pytest.mark.parametrize("seed", range(8))
def test_the_streamed_text_is_the_whole_text_in_whole_characters(smollm2_tokenizer, seed):
    tok = smollm2_tokenizer
    rng = random.Random(seed)
    ids = _with_specials(tok, tok(TEXT + " " + TEXT[::-1], add_special_tokens=False)["input_ids"], rng)
    if seed % 2:  # arbitrary ids too: byte tokens that never make a whole character, stray spaces
        ids = _with_specials(tok, [rng.randrange(len(tok)) for _ in range(120)], rng)
    text = StreamText(tok)
    for k in range(1, len(ids) + 1):
        got, whole = text.update(ids[:k]), tok.decode(ids[:k], skip_special_tokens=True)
        assert whole.startswith(got)
        if not whole.endswith("\ufffd"):
            assert got == whole, f"after {k} tokens"


class _ComposingTokenizer:
    """A tokenizer whose decoding composes characters (NFC): a later token can change the text before it."""

    pieces = {0: "caf", 1: "e", 2: "\u0301", 3: " ok", 4: "!"}

    def decode(self, ids, skip_special_tokens=True):
        import unicodedata

        return unicodedata.normalize("NFC", "".join(self.pieces[i] for i in ids))


def test_a_window_that_rewrites_its_text_falls_back_to_the_whole_decode():
    tok, ids = _ComposingTokenizer(), [0, 1, 2, 3, 4]
    text = StreamText(tok)
    got = [text.update(ids[:k]) for k in range(1, len(ids) + 1)]
    assert got == [tok.decode(ids[:k]) for k in range(1, len(ids) + 1)]
    assert got[2] == "café" and got[-1] == "café ok!"
