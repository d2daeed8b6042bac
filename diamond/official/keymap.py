"""Official DIAMOND weights in this project's modules: the key map and a strict, checked load.

The official trainer (github.com/eloialonso/diamond, `src/agent.py`) saves one state dict for
the whole agent, with keys under `denoiser.`, `rew_end_model.` and `actor_critic.`; the
authors' released Atari 100k checkpoints (`atari_100k/models/{Game}.pt` on the Hugging Face Hub,
repository `eloialonso/diamond`) are such state dicts. Our module tree mirrors the official one
block for block (`diamond/models/`), so converting is a renaming of keys (`KEY_RULES`) and
loading is strict: no missing, unexpected or reshaped tensor.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch
from torch import Tensor, nn

from diamond.io import ArtifactError

# Official top-level module -> our network name.
NETWORKS = {"denoiser": "denoiser", "rew_end_model": "reward_end", "actor_critic": "actor_critic"}

# (official pattern, our replacement), applied in order to the key within each network.
KEY_RULES: dict[str, list[tuple[str, str]]] = {
    "denoiser": [
        (r"^inner_model\.noise_emb\.weight$", "noise_emb.freqs"),
        (r"^inner_model\.act_emb\.0\.", "act_emb."),
        (r"^inner_model\.cond_proj\.", "cond_proj."),
        (r"^inner_model\.norm_out\.norm\.", "net.norm_out."),
        (r"^inner_model\.(conv_in|conv_out)\.", r"net.\1."),
        (r"^inner_model\.unet\.d_blocks\.", "net.down_blocks."),
        (r"^inner_model\.unet\.u_blocks\.", "net.up_blocks."),
        (r"^inner_model\.unet\.mid_blocks\.", "net.middle."),
        (r"^inner_model\.unet\.(downsamples|upsamples)\.", r"net.\1."),
    ],
    "rew_end_model": [],
    "actor_critic": [
        (r"^encoder\.encoder\.", "encoder."),
        (r"\.f\.0\.norm\.", ".norm."),
        (r"\.f\.2\.", ".conv."),
        (r"\.skip_projection\.", ".skip."),
        (r"^actor_linear\.", "actor."),
        (r"^critic_linear\.", "critic."),
    ],
}
# Inside the conditional residual blocks (denoiser and reward/termination model).
RESBLOCK_RULES: list[tuple[str, str]] = [
    (r"\.resblocks\.", ".blocks."),
    (r"\.proj\.", ".skip."),
    (r"\.(norm[12])\.linear\.", r".\1.to_scale_shift."),
    (r"\.attn\.norm\.norm\.", ".attention.norm."),
    (r"\.attn\.qkv_proj\.", ".attention.qkv."),
    (r"\.attn\.out_proj\.", ".attention.out."),
]
ACTION_EMBEDDING_KEY = "denoiser.inner_model.act_emb.0.weight"


def map_key(network: str, key: str) -> str:
    """Our name for the official key `key` of `network` (an official top-level module name)."""
    rules = KEY_RULES[network] + (RESBLOCK_RULES if network != "actor_critic" else [])
    for pattern, replacement in rules:
        key = re.sub(pattern, replacement, key)
    return key


def split_official(state: Mapping[str, Tensor], where: str) -> dict[str, dict[str, Tensor]]:
    """An official agent state dict -> {our network name: its state dict in our key names}."""
    if not isinstance(state, Mapping) or not state:
        raise ArtifactError(f"{where}: not a state dict (found {type(state).__name__})")
    out: dict[str, dict[str, Tensor]] = {ours: {} for ours in NETWORKS.values()}
    for key, value in state.items():
        network, _, rest = str(key).partition(".")
        if network not in NETWORKS or not rest:
            raise ArtifactError(
                f"{where}: key {key!r} is not under denoiser., rew_end_model. or actor_critic.; "
                "not an official DIAMOND agent state dict"
            )
        out[NETWORKS[network]][map_key(network, rest)] = value
    empty = [name for name, sd in out.items() if not sd]
    if empty:
        raise ArtifactError(f"{where}: no {empty[0]} weights; not a complete official DIAMOND agent state dict")
    return out


def official_num_actions(state: Mapping[str, Tensor], where: str) -> int:
    """The action count an official agent was built for (rows of the denoiser's action embedding)."""
    emb = state.get(ACTION_EMBEDDING_KEY) if isinstance(state, Mapping) else None
    if not isinstance(emb, Tensor) or emb.ndim != 2:
        raise ArtifactError(f"{where}: no {ACTION_EMBEDDING_KEY}; not an official DIAMOND agent state dict")
    return int(emb.shape[0])


def load_strict(model: nn.Module, state: Mapping[str, Tensor], name: str, where: str) -> None:
    """load_state_dict(strict=True), with a one-line error naming the first offending key."""
    ours = model.state_dict()
    missing = [k for k in ours if k not in state]
    unexpected = [k for k in state if k not in ours]
    if missing or unexpected:
        first = f"missing {missing[0]!r}" if missing else f"unexpected {unexpected[0]!r}"
        raise ArtifactError(
            f"{where}: {name} weights do not fit this architecture ({len(missing)} missing, {len(unexpected)} "
            f"unexpected keys; {first}); build it with the official config (configs/paper.yaml)"
        )
    for k, v in state.items():
        if tuple(v.shape) != tuple(ours[k].shape):
            raise ArtifactError(
                f"{where}: {name}.{k} has shape {tuple(v.shape)}, this architecture {tuple(ours[k].shape)}; "
                "build it with the official config (configs/paper.yaml)"
            )
    model.load_state_dict(dict(state), strict=True)


def load_official(
    state: Mapping[str, Tensor], denoiser: nn.Module, reward_end: nn.Module, actor_critic: nn.Module, where: str
) -> None:
    """Load an official agent state dict into our three networks, strictly."""
    parts = split_official(state, where)
    with torch.no_grad():
        load_strict(denoiser, parts["denoiser"], "denoiser", where)
        load_strict(reward_end, parts["reward_end"], "reward_end", where)
        load_strict(actor_critic, parts["actor_critic"], "actor_critic", where)
