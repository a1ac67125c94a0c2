"""The frozen vocabulary text encoder: one token per word, unknown words read as unknown, captions
that differ give different states, and the folder round-trips bit for bit."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from ccm_sdk.errors import InputError
from ccm_sdk.training.text_encoder import UNK, build_text_encoder, load_text_encoder, vocabulary_tokenizer

WORDS = ["a", "red", "ed", "blue", "square", "circle", "big", ",", "3"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return build_text_encoder(WORDS, tmp_path_factory.mktemp("text") / "enc", hidden_size=32, layers=1, max_length=12, seed=3)


def _encode(tokenizer, model, texts):
    ids = tokenizer(texts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        return model(ids)[0]


def test_each_word_is_one_token(folder):
    tokenizer, _ = load_text_encoder(folder)
    tokens = tokenizer.convert_ids_to_tokens(tokenizer("A big, RED square 3").input_ids)
    assert tokens == ["<|startoftext|>", "a</w>", "big</w>", ",</w>", "red</w>", "square</w>", "3</w>", "<|endoftext|>"]
    assert tokenizer.model_max_length == 12 and tokenizer.pad_token == "<|endoftext|>" and tokenizer.unk_token == UNK
    assert (folder / "vocabulary.txt").read_text().split() == WORDS


def test_unknown_words_read_as_the_unknown_token(folder):
    tokenizer, model = load_text_encoder(folder)
    table = model.get_input_embeddings().weight
    unk = table[tokenizer.unk_token_id]
    for word, known_ending in (("purple", None), ("read", None), ("bed", "ed</w>")):
        tokens = tokenizer.tokenize(word)
        assert len(tokens) > 1, tokens  # an unknown word is never a token of its own
        for token in tokens:
            row = table[tokenizer.convert_tokens_to_ids(token)]
            assert torch.equal(row, unk) == (token != known_ending), (word, token)
    # every vocabulary word keeps its own embedding
    rows = torch.stack([table[tokenizer.convert_tokens_to_ids(t)] for t in tokenizer.tokenize(" ".join(WORDS))])
    assert len(rows) == len(WORDS) and not any(torch.equal(r, unk) for r in rows)


def test_different_captions_give_different_embeddings(folder):
    tokenizer, model = load_text_encoder(folder)
    captions = ["a red square", "a blue square", "a red circle", "a square red", ""]
    states = _encode(tokenizer, model, captions + ["a red square"])
    assert states.shape == (6, 12, 32) and torch.isfinite(states).all()
    for i in range(len(captions)):
        for j in range(i + 1, len(captions)):
            assert (states[i] - states[j]).abs().max() > 1e-3, (captions[i], captions[j])
    assert torch.equal(states[0], states[-1])


def test_the_folder_round_trips(folder, tmp_path):
    tokenizer, model = load_text_encoder(folder)
    assert not any(p.requires_grad for p in model.parameters()) and not model.training
    assert (folder / "text_encoder" / "model.safetensors").is_file() and (folder / "tokenizer" / "tokenizer_config.json").is_file()
    # the same arguments give the same weights; another seed does not
    again = build_text_encoder(WORDS, tmp_path / "again", hidden_size=32, layers=1, max_length=12, seed=3)
    other = build_text_encoder(WORDS, tmp_path / "other", hidden_size=32, layers=1, max_length=12, seed=4)
    ours, theirs, different = (load_file(str(f / "text_encoder" / "model.safetensors")) for f in (folder, again, other))
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert not all(torch.equal(ours[k], different[k]) for k in ours)
    # the loaded tokenizer equals the one built in memory
    built = vocabulary_tokenizer(WORDS, max_length=12)
    assert built.get_vocab() == tokenizer.get_vocab()
    assert built("a bed, zz 3").input_ids == tokenizer("a bed, zz 3").input_ids
    assert model.config.hidden_size == 32 and model.config.max_position_embeddings == 12


def test_bad_vocabularies():
    with pytest.raises(InputError, match="'t-shirt' is not one word.*list its parts"):
        vocabulary_tokenizer(["a", "t-shirt"])
    with pytest.raises(InputError, match="empty"):
        vocabulary_tokenizer([])
    with pytest.raises(InputError, match="list of words, got one string"):
        vocabulary_tokenizer("a red square")
    with pytest.raises(InputError, match="special token"):
        vocabulary_tokenizer(["<|endoftext|>"])
    with pytest.raises(InputError, match="not divisible by heads"):
        build_text_encoder(["a"], "unused", hidden_size=30, heads=4)
