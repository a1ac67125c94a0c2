"""Token grounding: word -> token positions (multi-token words, BOS, truncation), the targets of a
batch (dropped captions ground nothing), the loss by hand (area-resized masks, heads, layers), the
recording processor's parity with diffusers' attention, and t2i with ``grounding_weight``: the loss
is the sum, gradients reach the cross-attention, training moves attention into the regions, bad
input is refused."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from torch.utils.data import Dataset

from ccm_sdk.datasets import TorchDataset, collate
from ccm_sdk.errors import TrainingError
from ccm_sdk.training.config import resolve_key, validate_config
from ccm_sdk.training.grounding import (
    GroundingTargets,
    WordTokens,
    attention_inside,
    grounding_loss,
    grounding_targets,
    record_cross_attention,
)
from ccm_sdk.training.t2i import T2ITrainConfig, T2ITrainer
from ccm_sdk.training.text_encoder import build_text_encoder
from ccm_sdk.utils.config_files import set_path

WORDS = ["a", "red", "blue", "square", "on", "background"]
TINY_UNET = {"block_out_channels": [32, 64], "layers_per_block": 1, "norm_num_groups": 8, "attention_head_dim": 4}


class PieceTokenizer:
    """A stand-in tokenizer: words of more than three letters are two tokens (head, tail), a BOS
    (id 1) and an EOS (id 2) surround the caption."""

    def __call__(self, text: str, add_special_tokens: bool = True):
        ids = []
        for word in text.split():
            ids += [10 + len(word)] if len(word) <= 3 else [10 + len(word), 50]
        return {"input_ids": [1, *ids, 2] if add_special_tokens else ids}


def test_word_token_positions_follow_the_tokenizer():
    words = WordTokens(PieceTokenizer(), max_length=8)
    # "a" (1 token) "blue" (2) "square" (2) "on" (1) "a" (1): after the BOS at position 0
    assert words("a blue square on a") == [[1], [2, 3], [4, 5], [6], []]  # position 7 holds the EOS: nothing past 6
    assert words("") == []


def test_word_tokens_of_a_one_token_per_word_encoder(tmp_path):
    from ccm_sdk.training.text_encoder import load_text_encoder

    tokenizer, _ = load_text_encoder(build_text_encoder(WORDS, tmp_path / "words", hidden_size=16, layers=1, max_length=8))
    assert WordTokens(tokenizer, 8)("a red square on a blue background") == [[1], [2], [3], [4], [5], [6], []]


def _batch(captions, word_regions, regions):
    return {"captions": captions, "regions": regions, "word_regions": [torch.tensor(w) for w in word_regions]}


def test_targets_mark_each_grounded_token_with_its_region():
    regions = torch.zeros(2, 4, 4, dtype=torch.long)
    regions[:, :2, :2] = 1
    batch = _batch(["a red square on a blue background"] * 2, [[-1, 1, 1, -1, -1, 0, 0]] * 2, regions)
    words = WordTokens(PieceTokenizer(), max_length=12)
    targets = grounding_targets(batch, ["a red square on a blue background", ""], words)
    # red: [2], square: [3, 4], blue: [7, 8], background: [9, 10]
    assert targets.grounded[0].nonzero().flatten().tolist() == [2, 3, 4, 7, 8, 9, 10]
    assert not targets.grounded[1].any(), "a caption dropped to '' grounds nothing"
    assert torch.equal(targets.masks[0, 3], (regions[0] == 1).float()) and torch.equal(targets.masks[0, 9], (regions[0] == 0).float())
    assert targets.masks[0, 1].sum() == 0
    with pytest.raises(TrainingError, match="has 7 words but its word_regions has 2 entries"):
        grounding_targets(_batch(batch["captions"], [[1, 1]] * 2, regions), batch["captions"], words)
    with pytest.raises(TrainingError, match="needs a dataset whose items carry 'regions'.*this one has neither"):
        grounding_targets({"captions": ["a"]}, ["a"], words)


def test_loss_by_hand_with_area_resized_masks_heads_and_layers():
    mask = torch.zeros(1, 2, 4, 4)
    mask[0, 1, :2, :2] = 1.0  # token 1: the top-left quarter; token 0 is not grounded
    targets = GroundingTargets(mask, torch.tensor([[False, True]]))
    fine = torch.rand(2, 16, 2)  # 2 heads, 4x4 pixels, 2 tokens (batch 1)
    coarse = torch.rand(2, 4, 2)  # the 2x2 layer: the quarter is its first pixel
    inside_fine = fine[:, mask[0, 1].flatten() > 0, 1].sum(1) / fine[:, :, 1].sum(1)
    inside_coarse = coarse[:, 0, 1] / coarse[:, :, 1].sum(1)
    expected = ((1 - inside_fine).square().mean() + (1 - inside_coarse).square().mean()) / 2
    assert grounding_loss([fine, coarse], targets, (4, 4)).item() == pytest.approx(expected.item(), rel=1e-6)
    # attention wholly inside the region costs nothing
    inside = torch.zeros(2, 16, 2)
    inside[:, 0, 1] = 1.0
    assert grounding_loss([inside], targets, (4, 4)).item() == pytest.approx(0.0, abs=1e-7)
    nothing = GroundingTargets(mask, torch.zeros(1, 2, dtype=torch.bool))
    assert grounding_loss([fine], nothing, (4, 4)).item() == 0.0
    with pytest.raises(TrainingError, match="has 9 positions, which no halving of the 4x4 latents gives"):
        grounding_loss([torch.rand(2, 9, 2)], targets, (4, 4))


def test_attention_inside_is_one_when_inside_and_the_area_share_when_uniform():
    mask = torch.zeros(2, 1, 4, 4)
    mask[0, 0, :2, :] = 1.0  # sample 0: the top half; sample 1: one pixel
    mask[1, 0, 3, 3] = 1.0
    uniform = torch.full((2 * 3, 16, 1), 1 / 16)  # batch 2, 3 heads, 4x4 pixels, 1 token
    inside = attention_inside([uniform], mask, (4, 4))[0]
    assert inside.shape == (2, 3, 1)
    assert torch.allclose(inside[0], torch.full((3, 1), 0.5)) and torch.allclose(inside[1], torch.full((3, 1), 1 / 16))
    on_it = torch.zeros(2 * 3, 4, 1)  # a 2x2 layer: sample 0's top half is its first two pixels
    on_it[:3, 1, 0] = 1.0
    on_it[3:, 0, 0] = 1.0  # sample 1 attends the top-left pixel; its region is in the bottom-right one
    coarse = attention_inside([on_it], mask, (4, 4))[0]
    assert torch.allclose(coarse[0], torch.ones(3, 1)) and torch.allclose(coarse[1], torch.zeros(3, 1))


class RedSquares(Dataset):
    """32x32 images: a red square (its place and size vary) on a blue background, with regions."""

    def __len__(self) -> int:
        return 16

    def __getitem__(self, index: int):
        g = torch.Generator().manual_seed(index)
        size = int(torch.randint(10, 20, (1,), generator=g))
        top, left = (int(v) for v in torch.randint(0, 32 - size, (2,), generator=g))
        regions = torch.zeros(32, 32, dtype=torch.long)
        regions[top : top + size, left : left + size] = 1
        image = torch.stack([regions == 1, torch.zeros_like(regions, dtype=torch.bool), regions == 0]).float()
        return {"image": image, "caption": "a red square on a blue background", "regions": regions,
                "word_regions": [-1, 1, 1, -1, -1, 0, 0]}  # fmt: skip


@pytest.fixture(scope="module")
def words_dir(tmp_path_factory):
    return build_text_encoder(WORDS, tmp_path_factory.mktemp("text") / "words", hidden_size=32, layers=1, max_length=10)


def _config(tmp_path, sd_dir, words_dir, **overrides) -> T2ITrainConfig:
    raw = {
        "trainer": "t2i", "output_dir": str(tmp_path / "out"), "vae": str(sd_dir), "text_encoder": str(words_dir),
        "architecture": dict(TINY_UNET), "grounding_weight": 1.0,
        "train": {"max_steps": 4, "batch_size": 4, "lr": 1e-3, "num_threads": 1, "device": "cpu"},
        "checkpoint": {"every": 100}, "log": {"progress": False, "plot": False},
    }  # fmt: skip
    for key, value in overrides.items():
        set_path(raw, resolve_key(T2ITrainConfig, key.replace("__", ".")), value)
    return validate_config(T2ITrainConfig, raw)


def test_the_recording_processor_computes_what_diffusers_does(tmp_path, sd_dir, words_dir):
    trainer = T2ITrainer(_config(tmp_path, sd_dir, words_dir, grounding_weight=0.0), dataset=RedSquares())
    trainer.setup()
    unet = trainer.unwrapped()
    x, t, text = torch.randn(2, 4, 4, 4), torch.tensor([5, 500]), torch.randn(2, 10, 32)
    with torch.no_grad():
        before = unet(x, t, encoder_hidden_states=text).sample
        record = record_cross_attention(unet)
        record.start()
        after = unet(x, t, encoder_hidden_states=text).sample
        probs = record.stop()
    assert torch.allclose(before, after, atol=1e-5)
    # one map per cross-attention layer (4x4 down, 2x2 mid, two 4x4 up), 4 heads each, rows summing to one over the tokens
    assert [tuple(p.shape) for p in probs] == [(2 * 4, 16, 10), (2 * 4, 4, 10), (2 * 4, 16, 10), (2 * 4, 16, 10)]
    assert all(torch.allclose(p.sum(-1), torch.ones(())) for p in probs)
    unet(x, t, encoder_hidden_states=text)
    assert record.probs == [], "nothing is recorded while the record is stopped"


def _without_grounding(inputs):
    return replace(inputs, grounding=None)


def _grounding_of(unet, record, inputs, draws, schedule) -> float:
    """The grounding loss of ``unet``'s cross-attention (which writes to ``record``) on one batch."""
    record.start()
    with torch.no_grad():
        unet(schedule.add_noise(inputs.latents, draws.noise, draws.t), draws.t, encoder_hidden_states=inputs.embeds)
    return grounding_loss(record.stop(), inputs.grounding, tuple(inputs.latents.shape[-2:])).item()


def test_t2i_adds_the_grounding_loss_and_training_lowers_it(tmp_path, sd_dir, words_dir, assert_gradients):
    config = _config(tmp_path, sd_dir, words_dir, train__max_steps=40, train__lr=3e-3)
    trainer = T2ITrainer(config, dataset=RedSquares())
    trainer.setup()
    batch = collate([trainer.dataset[i] for i in range(8)])
    torch.manual_seed(0)
    inputs = trainer.prepare_inputs(batch)
    assert inputs.grounding.grounded.sum() == 8 * 4  # red, square, blue, background; no dropout
    draws = trainer.sample_draws(inputs)
    total = trainer.compute_loss(inputs, draws)
    grounding = total - trainer.compute_loss(_without_grounding(inputs), draws)
    assert grounding.item() == pytest.approx(_grounding_of(trainer.unwrapped(), trainer.attention, inputs, draws, trainer.base.schedule), rel=1e-5)
    total.backward()
    assert_gradients(trainer.unwrapped(), [trainer.base.pipe.vae])
    trainer.unwrapped().zero_grad()
    before = grounding.item()
    trainer.train()
    # the same run without the grounding term
    plain = T2ITrainer(config.model_copy(update={"grounding_weight": 0.0, "output_dir": str(tmp_path / "plain")}), dataset=RedSquares())
    plain.train()
    after = _grounding_of(trainer.unwrapped(), trainer.attention, inputs, draws, trainer.base.schedule)
    without = _grounding_of(plain.unwrapped(), record_cross_attention(plain.unwrapped()), inputs, draws, trainer.base.schedule)
    assert after < 0.7 * before and after < 0.7 * without, (before, after, without)


def test_bad_grounding_input(tmp_path, sd_dir, words_dir, squares):
    with pytest.raises(Exception, match="gradient checkpointing recomputes"):
        _config(tmp_path, sd_dir, words_dir, train__gradient_checkpointing=True)
    trainer = T2ITrainer(_config(tmp_path, sd_dir, words_dir, data__path=str(squares)))
    trainer.setup()
    with pytest.raises(TrainingError, match="needs a dataset whose items carry 'regions'"):
        trainer.prepare_inputs(collate([trainer.dataset[0], trainer.dataset[1]]))
    items = [RedSquares()[0], {"image": torch.zeros(3, 32, 32), "caption": "a"}]
    with pytest.raises(TrainingError, match="1 of 2 items in one batch have no regions"):
        collate([TorchDataset([item])[0] for item in items])
    wrong = {**RedSquares()[0], "regions": torch.zeros(16, 16, dtype=torch.long)}
    with pytest.raises(TrainingError, match="expected regions of the image's size 32x32.*got regions \\(16, 16\\)"):
        TorchDataset([wrong])[0]
    with pytest.raises(TrainingError, match="has regions but not word_regions"):
        TorchDataset([{**RedSquares()[0], "word_regions": None}])[0]
