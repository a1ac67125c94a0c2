"""A small frozen CLIP text encoder and tokenizer over a fixed vocabulary, for models trained from scratch.

    build_text_encoder(["a", "red", "blue", "square", "circle"], "world/text")
    # -> world/text/text_encoder/ (CLIPTextModel, safetensors), world/text/tokenizer/ (CLIPTokenizer)

The encoder is a randomly initialised ``CLIPTextModel`` that is never trained: it is a fixed,
deterministic map from token sequences to hidden states, and the text-to-image UNet (``t2i``
trainer) learns to read it through cross-attention. Different captions give different states
because different words have different (random) token embeddings and positions; nothing about
the words' meaning is known to it.

The tokenizer is a stock ``CLIPTokenizer`` (byte-level BPE, lower-casing, CLIP's word split),
built from a vocabulary and merges in code, so any transformers version loads the folder. Each
vocabulary word is exactly one token: its merges grow the word from the right ("d</w>",
"ed</w>", "red</w>"), so only the pair ending at the end of the word can ever merge and the
result never depends on merge order. A word outside the vocabulary splits into pieces (single
letters and word endings); every piece that is not itself a vocabulary word has the embedding
of the unknown token ``<|unk|>``, so the encoder reads the word as unknown. (A vocabulary word
that ends an unknown word, like "ed" in "bed" when "ed" is in the vocabulary, keeps its own
token.)
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

import torch

from ..errors import InputError

BOS, EOS, UNK = "<|startoftext|>", "<|endoftext|>", "<|unk|>"
SUFFIX = "</w>"


def _pre_tokenize(tokenizer, word: str) -> list[str]:
    """The pieces CLIP's normaliser and pre-tokeniser cut ``word`` into (byte-level characters)."""
    backend = tokenizer.backend_tokenizer
    return [piece for piece, _ in backend.pre_tokenizer.pre_tokenize_str(backend.normalizer.normalize_str(word))]


def _vocabulary(vocabulary: Iterable[str]) -> tuple[dict[str, int], list[tuple[str, str]], list[str], list[str]]:
    """BPE vocab and merges with one token per word; also the words (lower-cased) and their tokens."""
    from transformers import CLIPTokenizer

    if isinstance(vocabulary, str):
        raise InputError("vocabulary should be a list of words, got one string")
    probe = CLIPTokenizer(vocab={BOS: 0, EOS: 1}, merges=[])
    vocab: dict[str, int] = {BOS: 0, EOS: 1, UNK: 2}
    merges: list[tuple[str, str]] = []
    words: list[str] = []
    word_tokens: list[str] = []
    for word in vocabulary:
        if not isinstance(word, str) or not word.strip():
            raise InputError(f"vocabulary words must be non-empty strings, got {word!r}")
        if word.strip() in (BOS, EOS, UNK):
            raise InputError(f"{word!r} is a special token, not a vocabulary word")
        pieces = _pre_tokenize(probe, word.strip())
        if len(pieces) != 1:
            raise InputError(f"vocabulary word {word!r} is not one word for CLIP's tokenizer (it splits into {pieces}); list its parts")
        (piece,) = pieces
        if piece + SUFFIX in word_tokens:
            continue  # a repeated (or differently cased) word
        # grow the word from the right: last char + "</w>", then one more char to the left per merge
        token = piece[-1] + SUFFIX
        vocab.setdefault(token, len(vocab))
        for char in reversed(piece[:-1]):
            vocab.setdefault(char, len(vocab))
            if char + token not in vocab:
                merges.append((char, token))
            token = char + token
            vocab.setdefault(token, len(vocab))
        words.append(word.strip().lower())
        word_tokens.append(token)
    if not words:
        raise InputError("the vocabulary is empty")
    return vocab, merges, words, word_tokens


def vocabulary_tokenizer(vocabulary: Iterable[str], *, max_length: int = 77):
    """A ``CLIPTokenizer`` with one token per vocabulary word (plus BOS, EOS = padding, UNK).

    Words are lower-cased; each must be one piece for CLIP's pre-tokeniser (a run of letters, one
    digit, or a run of punctuation), else :class:`InputError` names it.
    """
    from transformers import CLIPTokenizer

    vocab, merges, _, _ = _vocabulary(vocabulary)
    return CLIPTokenizer(vocab=vocab, merges=merges, unk_token=UNK, model_max_length=max_length)


def build_text_encoder(
    vocabulary: Iterable[str],
    path: str | os.PathLike,
    *,
    hidden_size: int = 256,
    layers: int = 2,
    heads: int | None = None,
    max_length: int = 77,
    seed: int = 0,
) -> Path:
    """Save a frozen random ``CLIPTextModel`` and its vocabulary ``CLIPTokenizer`` under ``path``.

    Writes ``path/text_encoder/`` and ``path/tokenizer/`` (the layout of a diffusers model folder,
    so the ``t2i`` trainer's ``text_encoder`` key takes ``path``) and ``path/vocabulary.txt``.
    ``heads`` defaults to ``hidden_size // 64`` (at least 1); ``max_length`` is the padded prompt
    length. The same arguments give bit-identical weights.
    """
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    heads = heads or max(1, hidden_size // 64)
    if hidden_size < 1 or layers < 1 or max_length < 3:
        raise InputError(f"expected hidden_size >= 1, layers >= 1 and max_length >= 3, got {hidden_size}, {layers}, {max_length}")
    if hidden_size % heads:
        raise InputError(f"hidden_size {hidden_size} is not divisible by heads {heads}")
    vocab, merges, words, word_tokens = _vocabulary(vocabulary)
    tokenizer = CLIPTokenizer(vocab=vocab, merges=merges, unk_token=UNK, model_max_length=max_length)
    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=4 * hidden_size,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        max_position_embeddings=max_length,
        projection_dim=hidden_size,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = CLIPTextModel(config)
    # 1. every piece that is not a whole word reads as the unknown token
    whole = {vocab[token] for token in word_tokens} | {vocab[BOS], vocab[EOS], vocab[UNK]}
    pieces = sorted(i for i in vocab.values() if i not in whole)
    with torch.no_grad():
        table = model.get_input_embeddings().weight
        table[pieces] = table[vocab[UNK]].clone()
    model.requires_grad_(False).eval()
    # 2. hub layout
    path = Path(path)
    model.save_pretrained(path / "text_encoder", safe_serialization=True)
    tokenizer.save_pretrained(path / "tokenizer")
    (path / "vocabulary.txt").write_text("".join(f"{w}\n" for w in words))
    return path


def load_text_encoder(path: str | os.PathLike, *, torch_dtype: torch.dtype = torch.float32):
    """``(tokenizer, text_encoder)`` from a folder holding ``tokenizer/`` and ``text_encoder/``
    (what :func:`build_text_encoder` writes, or a diffusers model folder), frozen."""
    from transformers import CLIPTextModel, CLIPTokenizer

    from ..errors import MissingModelError
    from ..models.loading import check_component_folder, load_component, resolve_model_path

    root = resolve_model_path(path, what="text encoder")
    what = f"text encoder {str(path)!r}"
    check_component_folder(root / "tokenizer", what=f"{what}, tokenizer", config_name="tokenizer_config.json", weights=False)
    try:
        tokenizer = CLIPTokenizer.from_pretrained(root / "tokenizer")
    except Exception as exc:
        raise MissingModelError(f"{what}, tokenizer: cannot load {str(root / 'tokenizer')!r}: {exc}") from exc
    model = load_component(CLIPTextModel, root / "text_encoder", what=f"{what}, text_encoder", torch_dtype=torch_dtype)
    return tokenizer, model.requires_grad_(False).eval()
