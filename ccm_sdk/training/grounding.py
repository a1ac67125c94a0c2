"""Token grounding: a loss that puts each caption word's cross-attention on the pixels it names.

A text-to-image UNet reads the caption through cross-attention: at every pixel of every
cross-attention layer, a softmax over the caption's tokens. With only the denoising loss, nothing
ties the token "blue" of "a blue diamond" to the diamond's pixels rather than the background's, and
a small model trained briefly binds attributes loosely (the colour lands on the wrong object). Where
a dataset knows which pixels each word describes, the grounding loss (the token loss of Wang et al.
2024, "TokenCompose") asks that each grounded token's attention fall inside its region:

    A_l[p]   = attention of pixel p to token l (one head of one cross-attention layer)
    inside_l = sum_p m_l[p] A_l[p] / sum_p A_l[p]       m_l: the token's region, area-resized to the layer
    loss     = mean over grounded tokens, heads and layers of (1 - inside_l)^2

A dataset opts in with two item keys (:func:`collate` keeps them):

    "regions"       int tensor [H, W]: a region id per pixel (at the image's size)
    "word_regions"  int tensor [n_words]: for each whitespace-separated word of the caption, the
                    region id it describes, or -1 for words that name no region ("on", "left", "a")

Words become token positions through the tokenizer (a word may be several tokens, the first token
may be a BOS); positions past the tokenizer's length, and captions replaced by "" for classifier-free
guidance, ground nothing.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from ..errors import TrainingError


@dataclass
class AttentionRecord:
    """Cross-attention probabilities recorded during one forward while ``active``."""

    active: bool = False
    probs: list[torch.Tensor] = field(default_factory=list)  # each [B * heads, pixels, tokens]

    def start(self) -> None:
        self.active, self.probs = True, []

    def stop(self) -> list[torch.Tensor]:
        probs, self.active, self.probs = self.probs, False, []
        return probs


class RecordingCrossAttnProcessor:
    """diffusers' plain attention, computed with explicit probabilities, which it hands to ``record``
    while the record is active (so that a loss can read them with their gradients)."""

    def __init__(self, record: AttentionRecord):
        self.record = record

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *args, **kwargs):
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)
        batch_size, sequence_length, _ = hidden_states.shape if encoder_hidden_states is None else encoder_hidden_states.shape
        attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.head_to_batch_dim(attn.to_k(encoder_hidden_states))
        value = attn.head_to_batch_dim(attn.to_v(encoder_hidden_states))
        probs = attn.get_attention_scores(attn.head_to_batch_dim(query), key, attention_mask)
        if self.record.active:
            self.record.probs.append(probs)
        hidden_states = attn.batch_to_head_dim(torch.bmm(probs, value))
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


def record_cross_attention(unet: torch.nn.Module) -> AttentionRecord:
    """Give every cross-attention layer (``attn2``) of a diffusers UNet a recording processor; the
    self-attention layers keep theirs. Returns the record the layers write to."""
    processors = dict(unet.attn_processors)
    record = AttentionRecord()
    crossing = [name for name in processors if name.endswith("attn2.processor")]
    if not crossing:
        raise TrainingError("grounding_weight > 0, but this UNet has no cross-attention layers (attn2) to ground tokens in")
    for name in crossing:
        processors[name] = RecordingCrossAttnProcessor(record)
    unet.set_attn_processor(processors)
    return record


class WordTokens:
    """Token positions of each whitespace-separated word of a caption, as ``tokenizer`` encodes it
    padded to ``max_length`` (the pipeline's encoding); remembered for the last few captions."""

    def __init__(self, tokenizer: Any, max_length: int):
        self.tokenizer, self.max_length = tokenizer, int(max_length)
        self._cache: OrderedDict[str, list[list[int]]] = OrderedDict()

    def _count(self, text: str) -> int:
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"]) if text else 0

    def _offset(self, caption: str) -> int:
        """How many special tokens precede the caption's first token (CLIP's BOS: 1)."""
        plain = self.tokenizer(caption, add_special_tokens=False)["input_ids"]
        full = self.tokenizer(caption)["input_ids"]
        for start in range(len(full) - len(plain) + 1):
            if full[start : start + len(plain)] == plain:
                return start
        raise TrainingError(f"cannot find the caption's tokens among its encoded tokens: {caption!r}")

    def __call__(self, caption: str) -> list[list[int]]:
        if caption in self._cache:
            self._cache.move_to_end(caption)
            return self._cache[caption]
        words = caption.split()
        offset = self._offset(caption) if words else 0
        last = self.max_length - 1  # the final position holds EOS (or padding) after truncation
        positions, before = [], 0
        for i in range(len(words)):
            after = self._count(" ".join(words[: i + 1]))
            positions.append([offset + p for p in range(before, after) if offset + p < last])
            before = after
        self._cache[caption] = positions
        if len(self._cache) > 4096:
            self._cache.popitem(last=False)
        return positions


@dataclass
class GroundingTargets:
    """Per sample and token: the token's region (a soft mask at the image's size) and whether it is grounded."""

    masks: torch.Tensor  # float [B, L, H, W]
    grounded: torch.Tensor  # bool [B, L]


def grounding_targets(batch: dict[str, Any], captions: Sequence[str], words: WordTokens) -> GroundingTargets:
    """The targets of a collated batch whose ``captions`` are the ones encoded this step (a caption
    dropped to "" grounds nothing). Raises TrainingError when the batch has no grounding keys or a
    caption's word count differs from its ``word_regions``."""
    regions, word_regions = batch.get("regions"), batch.get("word_regions")
    if regions is None or word_regions is None:
        raise TrainingError(
            "grounding_weight > 0 needs a dataset whose items carry 'regions' (a region id per pixel) and 'word_regions' "
            "(a region id per caption word, -1 for none); this one has "
            f"{'neither' if regions is None and word_regions is None else 'only ' + ('regions' if word_regions is None else 'word_regions')}"
        )
    count, (height, width) = len(captions), regions.shape[-2:]
    masks = torch.zeros(count, words.max_length, height, width)
    grounded = torch.zeros(count, words.max_length, dtype=torch.bool)
    for b, caption in enumerate(captions):
        if not caption:
            continue
        positions, targets = words(caption), word_regions[b]
        if len(positions) != len(targets):
            raise TrainingError(
                f"caption {b} of the batch has {len(positions)} words but its word_regions has {len(targets)} entries: {caption!r}"
            )
        for tokens, region in zip(positions, targets.tolist()):
            if region < 0 or not tokens:
                continue
            mask = regions[b] == region
            if not mask.any():
                continue
            masks[b, tokens] = mask.float()
            grounded[b, tokens] = True
    return GroundingTargets(masks, grounded)


def _layer_size(pixels: int, height: int, width: int) -> tuple[int, int]:
    """The (h, w) of a layer with ``pixels`` positions in a UNet over ``height`` x ``width`` latents."""
    factor = 1
    while factor <= max(height, width):
        h, w = -(-height // factor), -(-width // factor)
        if h * w == pixels:
            return h, w
        factor *= 2
    raise TrainingError(f"a cross-attention layer has {pixels} positions, which no halving of the {height}x{width} latents gives")


def attention_inside(probs: Sequence[torch.Tensor], masks: torch.Tensor, latent_size: tuple[int, int]) -> list[torch.Tensor]:
    """Per cross-attention layer, the share of each token's attention that falls inside its mask:
    float [B, heads, L] (``masks`` [B, L, H, W] at the image's size, area-pooled to each layer's size)."""
    batch, out = masks.shape[0], []
    resized: dict[tuple[int, int], torch.Tensor] = {}
    for layer in probs:
        heads, pixels, tokens = layer.shape[0] // batch, layer.shape[1], layer.shape[2]
        size = _layer_size(pixels, *latent_size)
        if size not in resized:
            mask = F.adaptive_avg_pool2d(masks, size) if masks.shape[-2:] != size else masks
            resized[size] = mask.flatten(2).to(layer.device, torch.float32)  # [B, L, pixels]
        a = layer.float().reshape(batch, heads, pixels, tokens)
        out.append(torch.einsum("bhpl,blp->bhl", a, resized[size][:, :tokens]) / a.sum(2).clamp_min(1e-8))
    return out


def grounding_loss(probs: Sequence[torch.Tensor], targets: GroundingTargets, latent_size: tuple[int, int]) -> torch.Tensor:
    """Mean over grounded tokens, heads and layers of (1 - attention inside the token's region)^2;
    zero (with a gradient path) when nothing in the batch is grounded."""
    if not probs:
        raise TrainingError("no cross-attention was recorded: is the recording processor installed on this UNet?")
    grounded = targets.grounded.to(probs[0].device)
    total = probs[0].sum() * 0.0
    if not grounded.any():
        return total
    for inside in attention_inside(probs, targets.masks, latent_size):
        per_token = (1.0 - inside).square().mean(1)  # [B, L]
        total = total + per_token[grounded[:, : per_token.shape[1]]].mean()
    return total / len(probs)
