"""AdamW's weight-decay groups, as the official configure_opt (src/utils.py) builds them."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from diamond.config import OptimizerConfig
from diamond.io import ArtifactError
from diamond.models.blocks import AdaGroupNorm, FourierFeatures
from diamond.models.reward_end import RewardEndModel
from diamond.training import Trainer, weight_decay_groups
from diamond.world_model.denoiser import Denoiser


class Small(nn.Module):
    """One of each kind of layer the three networks use."""

    def __init__(self) -> None:
        super().__init__()
        self.noise_emb = FourierFeatures(4)  # a buffer, not a parameter
        self.act_emb = nn.Embedding(3, 4)
        self.conv = nn.Conv2d(3, 4, 3)
        self.norm = nn.GroupNorm(2, 4)
        self.ada = AdaGroupNorm(4, 4, 2)  # its Linear decays, as in the official AdaGroupNorm
        self.lstm = nn.LSTM(4, 4)
        self.cell = nn.LSTMCell(4, 4)
        self.head = nn.Sequential(nn.Linear(4, 4), nn.SiLU(), nn.Linear(4, 2, bias=False))


def names(model: nn.Module, params: list[nn.Parameter]) -> set[str]:
    ids = {id(p) for p in params}
    return {n for n, p in model.named_parameters() if id(p) in ids}


def test_which_parameters_decay():
    model = Small()
    decay, no_decay = weight_decay_groups(model)
    assert names(model, decay) == {
        "conv.weight", "ada.to_scale_shift.weight", "lstm.weight_ih_l0", "lstm.weight_hh_l0",
        "cell.weight_ih", "cell.weight_hh", "head.0.weight", "head.2.weight",
    }
    assert names(model, no_decay) == {
        "act_emb.weight", "conv.bias", "norm.weight", "norm.bias", "ada.to_scale_shift.bias",
        "lstm.bias_ih_l0", "lstm.bias_hh_l0", "cell.bias_ih", "cell.bias_hh", "head.0.bias",
    }
    assert len(decay) + len(no_decay) == len(list(model.parameters()))
    assert "noise_emb.freqs" in dict(model.named_buffers())


def test_real_networks_split_completely(tiny_params):
    for model in (
        Denoiser(tiny_params.world_model.denoiser, 4),
        RewardEndModel(tiny_params.world_model.reward_end, 4, tiny_params.env.obs_size),
    ):
        decay, no_decay = weight_decay_groups(model)
        assert {id(p) for p in decay} | {id(p) for p in no_decay} == {id(p) for p in model.parameters()}
        assert not {id(p) for p in decay} & {id(p) for p in no_decay}
        owner = {f"{m}.{n}" if m else n: type(mod) for m, mod in model.named_modules()
                 for n, _ in mod.named_parameters(recurse=False)}
        for n in names(model, no_decay):
            assert "bias" in n.rsplit(".", 1)[-1] or owner[n] in (nn.Embedding, nn.GroupNorm, nn.LayerNorm), n
        for n in names(model, decay):
            assert owner[n] in (nn.Linear, nn.Conv2d, nn.LSTM, nn.LSTMCell) and "weight" in n, n


def test_a_parameter_of_an_unknown_layer_is_an_error():
    model = Small()
    model.scale = nn.Parameter(torch.ones(1))
    with pytest.raises(ValueError, match="'scale'"):
        weight_decay_groups(model)


def test_adamw_decays_only_the_decay_group():
    # Zero gradients: AdamW's update is the decay alone, p <- p * (1 - lr * weight_decay).
    model = Small()
    cfg = OptimizerConfig(lr=0.1, eps=1e-8, weight_decay=0.5, warmup_steps=0, warmup_starts_at_zero=False, max_grad_norm=1.0)
    trainer = Trainer(model, cfg)
    assert [g["weight_decay"] for g in trainer.optimizer.param_groups] == [0.5, 0.0]
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer.step(sum(p.sum() for p in model.parameters()) * 0)
    decayed, _ = weight_decay_groups(model)
    for n, p in model.named_parameters():
        factor = 1 - 0.1 * 0.5 if n in names(model, decayed) else 1.0
        torch.testing.assert_close(p.detach(), before[n] * factor, msg=n)


def test_optimizer_state_of_another_layout_is_a_clear_error():
    model = Small()
    cfg = OptimizerConfig(lr=1e-3, eps=1e-8, weight_decay=0.01, warmup_steps=0, warmup_starts_at_zero=False, max_grad_norm=1.0)
    trainer = Trainer(model, cfg)
    trainer.load_state_dict(Trainer(model, cfg).state_dict())  # same layout: fine
    old = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)  # the former single group
    with pytest.raises(ArtifactError, match=r"parameter groups of sizes \[18\].*\[8, 10\]") as e:
        trainer.load_state_dict({"optimizer": old.state_dict(), "num_steps": 5})
    assert "\n" not in str(e.value)


def test_foreach_adamw_updates_like_the_per_parameter_loop():
    """Trainer's AdamW (foreach) gives the per-parameter loop's weights bit for bit over warm-up,
    decay and clipping, and keeps foreach after loading a state saved without it."""
    torch.manual_seed(0)
    models = [Small(), Small()]
    models[1].load_state_dict(models[0].state_dict())
    cfg = OptimizerConfig(lr=1e-2, eps=1e-8, weight_decay=0.1, warmup_steps=3, warmup_starts_at_zero=False, max_grad_norm=0.5)
    trainer = Trainer(models[0], cfg)
    assert all(g["foreach"] for g in trainer.optimizer.param_groups)
    loop = Trainer(models[1], cfg)
    for group in loop.optimizer.param_groups:
        group["foreach"] = False  # PyTorch's CPU default: one parameter at a time
    x = torch.randn(5, 4)
    for _ in range(6):
        for t, m in zip((trainer, loop), models):
            out = m.head(m.cell(x)[0]) + m.act_emb(torch.arange(5) % 3)[:, :2]
            img = m.norm(m.conv(torch.randn(1, 3, 5, 5, generator=torch.Generator().manual_seed(t.num_steps))))
            t.step(out.square().mean() + img.mean() + m.lstm(x[None])[0].sum())
    for a, b in zip(models[0].parameters(), models[1].parameters(), strict=True):
        assert torch.equal(a, b)
    trainer.load_state_dict(loop.state_dict())
    assert all(g["foreach"] for g in trainer.optimizer.param_groups)
