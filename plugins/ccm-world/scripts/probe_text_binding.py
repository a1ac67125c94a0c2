"""Does a text encoder bind each colour to its noun? A linear probe on its hidden states.

    python plugins/ccm-world/scripts/probe_text_binding.py [MODEL ...] [--captions 6000]

For every noun of a world caption (a shape, "person", or "background") the probe reads the encoder's
hidden state at that noun's token and predicts the colour the caption gives it ("a large *blue*
diamond", "on a *green* background"): multinomial logistic regression on the standardised states of
the first 5/6 of the captions, accuracy on the rest. Chance is 0.1 (ten colours). The token
embeddings alone (layer 0) know only the noun, so they score chance; a state that scores near 1
carries its own colour, apart from the other colours of the caption, which is what the UNet's
cross-attention can then read. MODEL: folders holding text_encoder/ and tokenizer/ (default: the
world's shipped LCM).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from ccm_sdk.training.text_encoder import load_text_encoder
from ccm_world.dataset import WorldDataset
from ccm_world.vocabulary import COLORS, SHAPES

DEFAULT = Path(__file__).resolve().parents[1] / "ccm_world" / "models" / "lcm"
NOUNS = (*SHAPES, "person", "background")


def noun_rows(captions: list[str]) -> np.ndarray:
    """[caption index, token position, colour index, is background] for every noun of every caption."""
    rows = []
    for c, caption in enumerate(captions):
        words = caption.split()
        for i, word in enumerate(words):
            if word in NOUNS:
                j = i - 1
                if word == "background" and words[j] == "gradient":
                    j -= 1
                rows.append((c, i + 1, COLORS.index(words[j]), word == "background"))  # +1: the BOS token
    return np.array(rows)


def probe(states: torch.Tensor, rows: np.ndarray, train: np.ndarray, *, steps: int = 400) -> float:
    """Held-out accuracy of a linear probe from states[caption, position] to the colour."""
    x = states[rows[:, 0], rows[:, 1]].float()
    y = torch.as_tensor(rows[:, 2])
    mean, std = x[train].mean(0), x[train].std(0) + 1e-6
    x = (x - mean) / std
    weight = torch.zeros(x.shape[1], len(COLORS), requires_grad=True)
    bias = torch.zeros(len(COLORS), requires_grad=True)
    optimizer = torch.optim.Adam([weight, bias], lr=0.02)
    for _ in range(steps):
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(x[train] @ weight + bias, y[train]) + 1e-4 * weight.square().sum()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        return float(((x[~train] @ weight + bias).argmax(1) == y[~train]).float().mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", nargs="*", default=[str(DEFAULT)])
    parser.add_argument("--captions", type=int, default=6000)
    parser.add_argument("--seed", type=int, default=3, help="world seed of the captions")
    args = parser.parse_args()
    torch.manual_seed(0)
    dataset = WorldDataset(size=64, length=max(args.captions, 1), seed=args.seed, conditions=())
    captions = [dataset.scene(i).caption for i in range(args.captions)]
    rows = noun_rows(captions)
    train_rows = rows[:, 0] < args.captions * 5 // 6
    background = rows[:, 3] == 1
    print("| encoder | layer | objects' nouns | background |")
    print("|---|---|---|---|")
    for model in args.models:
        tokenizer, encoder = load_text_encoder(model)
        ids = tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt").input_ids
        with torch.no_grad():
            out = encoder.float()(ids, output_hidden_states=True)
        layers = [(f"{k}" if k else "0 (token embeddings)", h) for k, h in enumerate(out.hidden_states)]
        layers.append(("output (final layer norm)", out.last_hidden_state))
        for name, states in layers:
            objects = probe(states, rows[~background], train_rows[~background])
            back = probe(states, rows[background], train_rows[background])
            print(f"| {model} | {name} | {objects:.3f} | {back:.3f} |")


if __name__ == "__main__":
    main()
