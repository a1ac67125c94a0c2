"""How much of each caption word's cross-attention a world teacher puts on the pixels the word names,
on held-out scenes: the quantity t2i's token-grounding loss trains (docs/training.md).

    python plugins/ccm-world/scripts/attention_grounding.py --model world:teacher [--scenes 128] [--timesteps 250 500 750]

For every grounded word (a colour, size or shape word of an object, or the background's words; the
world's ``word_regions``) and every head of every cross-attention layer, "inside" is the share of the
token's attention (summed over the layer's pixels) that falls in the word's region, its mask area-pooled
to the layer's size. Uniform attention over the pixels would give the region's area share, printed as
"chance". Reported for the objects' colour words, their other words and the background's words, averaged over the
timesteps given (images noised with seed 0). The scenes are world seed 1 (no training run used them).
"""

from __future__ import annotations

import argparse

import torch

from ccm_sdk import CCMPipeline
from ccm_sdk.training.grounding import WordTokens, attention_inside, grounding_targets, record_cross_attention
from ccm_world.dataset import WorldDataset
from ccm_world.vocabulary import COLORS

KINDS = ("object colour words", "other object words", "background words")


def word_kinds(caption: str, word_regions: list[int], words: WordTokens, length: int) -> torch.Tensor:
    """Per token position: 0 an object's colour word, 1 another word of an object, 2 a background word, -1 none."""
    kinds = torch.full((length,), -1, dtype=torch.long)
    for tokens, word, region in zip(words(caption), caption.split(), word_regions):
        if region >= 0:
            kinds[tokens] = 2 if region == 0 else (0 if word in COLORS else 1)
    return kinds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="world:teacher")
    parser.add_argument("--scenes", type=int, default=128)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--timesteps", type=int, nargs="+", default=[250, 500, 750])
    args = parser.parse_args()
    dataset = WorldDataset(size=64, length=100_000, seed=1, grounding=True)
    pipe = CCMPipeline.from_pretrained(args.model, local_files_only=True)
    record = record_cross_attention(pipe.unet)
    length = pipe.tokenizer.model_max_length
    words = WordTokens(pipe.tokenizer, length)
    sums = {kind: [0.0, 0.0, 0] for kind in KINDS}  # inside, chance, tokens
    generator = torch.Generator().manual_seed(0)
    for start in range(0, args.scenes, args.batch):
        items = [dataset[i] for i in range(start, min(args.scenes, start + args.batch))]
        captions = [it["caption"] for it in items]
        batch = {"regions": torch.stack([it["regions"] for it in items]), "word_regions": [it["word_regions"] for it in items]}
        targets = grounding_targets(batch, captions, words)
        kinds = torch.stack([word_kinds(c, it["word_regions"].tolist(), words, length) for c, it in zip(captions, items)])
        chance = targets.masks.mean((2, 3))  # [B, L]: the region's area share
        with torch.no_grad():
            latents = pipe.vae.encode(torch.stack([it["image"] for it in items]) * 2 - 1).latent_dist.mean
            latents = latents * pipe.vae.config.scaling_factor
            ids, _ = pipe._tokenize(tuple(captions), length)
            embeds = pipe.text_encoder(ids)[0]
            for t in args.timesteps:
                noise = torch.randn(latents.shape, generator=generator)
                x_t = pipe.schedule.add_noise(latents, noise, torch.full((len(items),), t))
                record.start()
                pipe.unet(x_t, t, encoder_hidden_states=embeds)
                layers = attention_inside(record.stop(), targets.masks, tuple(latents.shape[-2:]))
                inside = torch.stack([layer.mean(1) for layer in layers]).mean(0)  # [B, L]
                for k, kind in enumerate(KINDS):
                    chosen = targets.grounded & (kinds == k)
                    sums[kind][0] += float(inside[chosen].sum())
                    sums[kind][1] += float(chance[chosen].sum())
                    sums[kind][2] += int(chosen.sum())
    print(f"{args.model}: cross-attention inside each word's region, {args.scenes} scenes, timesteps {args.timesteps}")
    for kind, (inside_sum, chance_sum, count) in sums.items():
        print(f"  {kind:19s} inside {inside_sum / count:.3f}   chance {chance_sum / count:.3f}   ({count} tokens)")


if __name__ == "__main__":
    main()
