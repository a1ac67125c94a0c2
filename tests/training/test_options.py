"""Run options end to end: mixed precision, gradient checkpointing, accumulation, tar shards with
DataLoader workers, a torch Dataset passed in Python, and the hub push hook."""

from __future__ import annotations

import io
import tarfile

import torch

from ccm_sdk.training import export as export_module
from ccm_sdk.training import train
from ccm_sdk.training.ct_controlnet import CTControlNetTrainer


def _tar_of(folder, path):
    with tarfile.open(path, "w") as tar:
        for image in sorted(folder.glob("*.png")):
            for name, data in ((f"{image.stem}.png", image.read_bytes()), (f"{image.stem}.txt", image.with_suffix(".txt").read_bytes())):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return path


def test_bf16_checkpointing_accumulation_and_tar_workers(make_config, squares, tmp_path):
    config = make_config(
        "ct_controlnet", data__path=str(_tar_of(squares, tmp_path / "shard.tar")), data__num_workers=1,
        train__mixed_precision="bf16", train__gradient_checkpointing=True, train__gradient_accumulation_steps=2,
        train__max_steps=2, consistency__distance="random",
    )  # fmt: skip
    trainer = CTControlNetTrainer(config)
    result = trainer.train()
    assert trainer.unwrapped().is_gradient_checkpointing and trainer.unet.is_gradient_checkpointing
    assert result.summary["mixed_precision"] == "bf16" and len(result.history) == 2
    assert all(torch.isfinite(torch.tensor(loss)) for _, loss, _ in result.history)


def test_a_torch_dataset_from_python(make_config):
    class Solid(torch.utils.data.Dataset):
        def __len__(self):
            return 3

        def __getitem__(self, i):
            return {"image": torch.full((3, 32, 32), i / 3), "caption": f"shade {i}", "control": torch.full((3, 32, 32), 0.5)}

    config = make_config("ct_controlnet", data__path=None, train__max_steps=2)
    assert train(config, dataset=Solid()).step == 2


def test_outputs_are_pushed_when_asked(make_config, monkeypatch):
    pushed = []
    monkeypatch.setattr(export_module, "push_to_hub", lambda folder, repo, private: pushed.append((folder, repo, private)) or "url")
    config = make_config("ct_controlnet", train__max_steps=1, hub__push=True, hub__repo_id="me/tiny-controlnet")
    result = CTControlNetTrainer(config).train()
    assert pushed == [(result.outputs["controlnet"], "me/tiny-controlnet", True)] and result.summary["hub"] == "url"
