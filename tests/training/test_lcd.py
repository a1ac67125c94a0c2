"""Latent consistency distillation: the loss by hand (guided teacher step, EMA target), the EMA
update, gradients for full and LoRA students, learning, and outputs that load."""

from __future__ import annotations

import pytest
import torch

from ccm_sdk.errors import IncompatibleModelsError
from ccm_sdk.pipeline import CCMPipeline
from ccm_sdk.training.lcd import LCDDraws, LCDTrainer


@pytest.fixture()
def full(make_config):
    trainer = LCDTrainer(make_config("lcd", ema_decay=0.9))
    trainer.setup()
    with torch.no_grad():  # move the student off the EMA target, so the test tells them apart
        trainer.unwrapped().time_embedding.cond_proj.weight.normal_(0, 0.02, generator=torch.Generator().manual_seed(3))
    return trainer


def _draws(latents):
    noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(5))
    return LCDDraws(index=torch.tensor([0, 30]), noise=noise, w=torch.tensor([2.0, 0.5]))


def test_loss_matches_the_hand_computed_value(full, fixed_batches, by_hand):
    _, (inputs,) = fixed_batches(full)
    draws = _draws(inputs.latents)
    t_start = by_hand.grid(50)[draws.index]  # 19 and 619
    t_prev = (t_start - 20).clamp(min=0)  # skipping step k = 1000 / 50
    emb = by_hand.w_embedding(draws.w)
    w = draws.w.reshape(-1, 1, 1, 1)
    with torch.no_grad():
        x = by_hand.add_noise(inputs.latents, draws.noise, t_start)
        student = by_hand.f(full.unwrapped()(x, t_start, encoder_hidden_states=inputs.embeds, timestep_cond=emb).sample, x, t_start)
        eps_c = full.teacher(x, t_start, encoder_hidden_states=inputs.embeds).sample
        eps_u = full.teacher(x, t_start, encoder_hidden_states=inputs.uncond_embeds).sample
        x0_c, x0_u = by_hand.x0(eps_c, x, t_start), by_hand.x0(eps_u, x, t_start)
        x0_g, eps_g = x0_c + w * (x0_c - x0_u), eps_c + w * (eps_c - eps_u)
        a_prev = by_hand.alphas[t_prev].reshape(-1, 1, 1, 1)
        x_prev = a_prev.sqrt() * x0_g + (1 - a_prev).sqrt() * eps_g
        target = by_hand.f(full.target(x_prev, t_prev, encoder_hidden_states=inputs.embeds, timestep_cond=emb).sample, x_prev, t_prev)
    expected = (student - target).square().mean()
    assert full.compute_loss(inputs, draws).item() == pytest.approx(expected.item(), rel=1e-4)
    c = 0.01
    full.config = full.config.model_copy(update={"loss": "huber", "huber_c": c})
    assert full.compute_loss(inputs, draws).item() == pytest.approx((((student - target) ** 2 + c * c).sqrt() - c).mean().item(), rel=1e-4)


def test_the_student_starts_as_the_teacher_with_a_new_guidance_projection(make_config):
    trainer = LCDTrainer(make_config("lcd"))
    trainer.setup()
    student = trainer.unwrapped()
    assert student.config.time_cond_proj_dim == 32 and trainer.teacher.config.time_cond_proj_dim is None
    assert torch.count_nonzero(student.time_embedding.cond_proj.weight) == 0
    teacher = trainer.teacher.state_dict()
    assert all(torch.equal(v, teacher[k]) for k, v in student.state_dict().items() if k in teacher)


def test_ema_update(full):
    before = full.target.time_embedding.cond_proj.weight.clone()
    online = full.unwrapped().time_embedding.cond_proj.weight
    full.after_optimizer_step()
    assert torch.allclose(full.target.time_embedding.cond_proj.weight, 0.9 * before + 0.1 * online)


def test_full_student_gradients(full, fixed_batches, assert_gradients):
    _, (inputs,) = fixed_batches(full)
    full.compute_loss(inputs, _draws(inputs.latents)).backward()
    pipe = full.base.pipe
    assert_gradients(full.unwrapped(), [full.teacher, full.target, pipe.vae, pipe.text_encoder])
    assert full.unwrapped().time_embedding.cond_proj.weight.grad.abs().sum() > 0


def test_lora_student_gradients(make_config, fixed_batches, assert_gradients):
    trainer = LCDTrainer(make_config("lcd", mode="lora", ema_decay=0.0))
    trainer.setup()
    assert trainer.target is None
    _, (inputs,) = fixed_batches(trainer)
    trainer.compute_loss(inputs, _draws(inputs.latents)).backward()
    student = trainer.unwrapped()
    lora = [n for n, _ in student.named_parameters() if "lora_" in n]
    assert lora and student.config.time_cond_proj_dim is None
    assert_gradients(student, [trainer.teacher, trainer.base.pipe.vae, trainer.base.pipe.text_encoder], names=lora)


def test_a_consistency_model_teacher_is_refused(make_config, lcm_dir):
    with pytest.raises(IncompatibleModelsError, match="teacher"):
        LCDTrainer(make_config("lcd", model=str(lcm_dir))).setup()


def test_outputs_load_into_the_pipeline(make_config, sd_dir):
    x = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(0))
    embeds = torch.randn(1, 77, 32, generator=torch.Generator().manual_seed(1))
    # 1. LCM-LoRA, with alpha != rank so the scaling must survive the round trip
    lora = LCDTrainer(make_config("lcd", mode="lora", lora__alpha=8, ema_decay=0.0, train__max_steps=2, train__lr=1e-2))
    result = lora.train()
    pipe = CCMPipeline.from_pretrained(sd_dir, lora=result.outputs["lora"])
    with torch.no_grad():
        ours = lora.unwrapped()(x, 500, encoder_hidden_states=embeds).sample
        loaded = pipe.unet(x, 500, encoder_hidden_states=embeds).sample
        base = CCMPipeline.from_pretrained(sd_dir).unet(x, 500, encoder_hidden_states=embeds).sample
    assert torch.allclose(ours, loaded, atol=1e-5) and not torch.allclose(ours, base, atol=1e-4)
    # 2. a full LCM: a pipeline folder with the student UNet and the training grid
    full = LCDTrainer(make_config("lcd", train__max_steps=2, output_dir=str(lora.config.output_dir) + "-full"))
    result = full.train()
    pipe = CCMPipeline.from_pretrained(result.outputs["lcm"])
    assert pipe.is_lcm and pipe.schedule.original_inference_steps == 50
    # the guidance scale the student was distilled for (the middle of its w range, as w + 1) is its default
    cfg = full.config
    assert pipe.generation_defaults.guidance_scale == (cfg.w_min + cfg.w_max) / 2 + 1.0 == full.recommended_guidance()
    assert all(torch.equal(v, pipe.unet.state_dict()[k]) for k, v in full.unwrapped().state_dict().items())
    pipe.set_progress_bar_config(disable=True)
    assert torch.isfinite(pipe("a red square", num_inference_steps=2, height=32, width=32, output_type="pt").images).all()


@pytest.mark.slow
def test_training_lowers_the_loss(make_config, eval_loss):
    # a random teacher's guided step is wild for large w; small w keeps the toy task well posed
    config = make_config("lcd", w_min=0.0, w_max=0.5, ema_decay=0.5, train__max_steps=150, train__lr=1e-3, checkpoint__every=1000)
    trainer = LCDTrainer(config)
    trainer.setup()
    evaluate = eval_loss(trainer)
    before = evaluate()
    trainer.train()
    assert evaluate() < 0.7 * before
