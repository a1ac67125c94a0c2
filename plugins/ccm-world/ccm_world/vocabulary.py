"""The world's closed vocabulary, its palette, and an offline CLIP tokenizer with one token per word.

A BPE tokenizer only reaches a whole-word token through merges whose every intermediate piece
is itself in the vocabulary. With the merges of every split of every substring of every word,
any order of merging ends at the whole word, so each vocabulary word becomes exactly one token
(ids 2.., in ``WORLD_VOCABULARY`` order, after the two specials); the pieces take the ids after.
"""

from __future__ import annotations

from transformers import CLIPTokenizer

# RGB in 0..255. Any two colours that can touch in a scene differ by at least 44 in some channel,
# gradient shades included, so every region boundary is visible in the image (``min_contrast``).
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "orange": (250, 150, 30),
    "yellow": (245, 220, 50),
    "green": (40, 170, 70),
    "cyan": (60, 200, 220),
    "blue": (40, 80, 220),
    "purple": (140, 60, 190),
    "pink": (245, 130, 190),
    "white": (245, 245, 245),
    "black": (25, 25, 25),
}
COLORS: tuple[str, ...] = tuple(PALETTE)
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "diamond")
SIZES: tuple[str, ...] = ("small", "medium", "large")
ARM_POSES: tuple[str, ...] = ("up", "out", "down")
RELATIONS: tuple[str, ...] = ("left of", "right of", "above", "below", "in front of", "behind")

_GRAMMAR_WORDS = ("a", "an", "person", "with", "arms", "on", "background", "gradient", "and", ",")
_RELATION_WORDS = tuple(dict.fromkeys(word for relation in RELATIONS for word in relation.split()))
# Every word a caption can contain, in token-id order (id = 2 + position).
WORLD_VOCABULARY: tuple[str, ...] = tuple(
    dict.fromkeys((*_GRAMMAR_WORDS, *SIZES, *COLORS, *SHAPES, *ARM_POSES, *_RELATION_WORDS))
)
# Worst case: "a medium purple person with arms down , a medium orange diamond and a large white
# triangle on a yellow gradient background" is 22 words; plus the two specials.
MAX_CAPTION_TOKENS = 24
BOS, EOS = "<|startoftext|>", "<|endoftext|>"


def gradient_end(color: tuple[int, int, int]) -> tuple[int, int, int]:
    """The far end of a gradient background: 40% of the way to white (dark colours) or black (light ones)."""
    luminance = (0.299 * color[0] + 0.587 * color[1] + 0.114 * color[2]) / 255
    target = 255 if luminance < 0.4 else 0
    return tuple(round(0.6 * c + 0.4 * target) for c in color)  # type: ignore[return-value]


def min_contrast() -> int:
    """The smallest largest-channel difference (0..255) between an object colour and any other
    colour it can touch: another object, or any shade of a plain or gradient background."""
    worst = 255
    for name, color in PALETTE.items():
        for other, other_color in PALETTE.items():
            if other == name:
                continue
            end = gradient_end(other_color)
            for step in range(11):  # the background runs through every shade between the two ends
                shade = [a + (b - a) * step / 10 for a, b in zip(other_color, end)]
                worst = min(worst, round(max(abs(a - b) for a, b in zip(color, shade))))
    return worst


def article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _pieces(word: str) -> list[tuple[str, ...]]:
    """The symbols BPE starts a word from: its characters, the last one carrying ``</w>``."""
    return [tuple(word[:-1]) + (word[-1] + "</w>",)]


def _build_vocab_and_merges() -> tuple[dict[str, int], list[tuple[str, str]]]:
    vocab: dict[str, int] = {BOS: 0, EOS: 1}
    for word in WORLD_VOCABULARY:
        vocab[word + "</w>"] = len(vocab)
    merges: dict[tuple[str, str], None] = {}
    for word in WORLD_VOCABULARY:
        (symbols,) = _pieces(word)
        n = len(symbols)
        for start in range(n):
            for stop in range(start + 1, n + 1):
                vocab.setdefault("".join(symbols[start:stop]), len(vocab))
                for split in range(start + 1, stop):
                    merges[("".join(symbols[start:split]), "".join(symbols[split:stop]))] = None
    return vocab, list(merges)


def world_tokenizer(model_max_length: int = MAX_CAPTION_TOKENS) -> CLIPTokenizer:
    """A CLIP tokenizer over ``WORLD_VOCABULARY``, built in code (no files, no network).

    Captions pad to ``model_max_length`` with ``<|endoftext|>``, as CLIP's do; words outside the
    vocabulary fall apart into pieces or ``<|endoftext|>`` (the unknown token).
    """
    vocab, merges = _build_vocab_and_merges()
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=model_max_length)


def word_token_ids() -> dict[str, int]:
    """Vocabulary word -> its token id."""
    return {word: 2 + i for i, word in enumerate(WORLD_VOCABULARY)}
