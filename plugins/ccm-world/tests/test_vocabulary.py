"""The closed vocabulary and its offline tokenizer."""

from __future__ import annotations

from ccm_world import MAX_CAPTION_TOKENS, WORLD_VOCABULARY, WorldDataset, min_contrast, word_token_ids, world_tokenizer
from ccm_world.vocabulary import PALETTE, gradient_end
from transformers import CLIPTokenizer


def test_every_word_is_one_token_with_a_fixed_id():
    tokenizer = world_tokenizer()
    ids = word_token_ids()
    assert list(ids.values()) == list(range(2, 2 + len(WORLD_VOCABULARY)))
    for word in WORLD_VOCABULARY:
        assert tokenizer(word, add_special_tokens=False).input_ids == [ids[word]], word
    assert tokenizer.bos_token_id == 0 and tokenizer.eos_token_id == 1 and tokenizer.model_max_length == MAX_CAPTION_TOKENS


def test_captions_round_trip_and_fit(tmp_path):
    tokenizer = world_tokenizer()
    worst = ("a medium purple person with arms down , a medium orange diamond and a large white triangle "
             "on a yellow gradient background")  # fmt: skip
    captions = [worst] + [WorldDataset(length=300, seed=5).scene(i).caption for i in range(300)]
    for caption in captions:
        ids = tokenizer(caption).input_ids
        assert len(ids) == len(caption.split()) + 2 <= MAX_CAPTION_TOKENS
        assert tokenizer.decode(ids, skip_special_tokens=True) == caption
    tokenizer.save_pretrained(tmp_path)
    reloaded = CLIPTokenizer.from_pretrained(tmp_path)
    batch = reloaded(captions[:4], padding="max_length", max_length=MAX_CAPTION_TOKENS, return_tensors="pt")
    assert batch.input_ids.shape == (4, MAX_CAPTION_TOKENS)
    assert batch.input_ids.tolist() == tokenizer(captions[:4], padding="max_length", max_length=MAX_CAPTION_TOKENS).input_ids


def test_unknown_words_do_not_become_vocabulary_words():
    tokenizer = world_tokenizer()
    ids = set(tokenizer("a dog", add_special_tokens=False).input_ids)
    assert word_token_ids()["a"] in ids and not ids & (set(word_token_ids().values()) - {word_token_ids()["a"]})


def test_touching_colours_always_differ_visibly():
    assert min_contrast() >= 40  # the world-edges threshold (0.1 = 25.5 / 255) sits well below it
    for color in PALETTE.values():
        assert max(abs(a - b) for a, b in zip(color, gradient_end(color))) > 40
