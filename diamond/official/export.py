"""Our agent checkpoint -> an official DIAMOND agent state dict (the inverse of `diamond/official/keymap.py`).

What the official code reads: `Agent.load` (`src/agent.py:48-62`) runs `torch.load` and hands each
of `denoiser`, `rew_end_model`, `actor_critic` the keys that start with its name, prefix stripped
(`src/utils.py:173-174`), to a strict `load_state_dict`. `play.py` passes it the Hub file
(`--pretrained`) or the last `checkpoints/agent_versions/agent_epoch_*.pt` (`src/play.py:73-93`,
`src/utils.py:199-206`); the trainer passes it `initialization.path_to_ckpt` (`src/trainer.py:112-113`).
Those files are `Agent.state_dict()` (`src/trainer.py:416`): a flat ordered dict of CPU float32
tensors, no wrapper and no prefix, in the official module order; the FourierFeatures buffer
(`inner_model.noise_emb.weight`) is in it. That is what `to_official` returns.

Our module tree mirrors the official one, so the export is a renaming; the only order difference is
the actor-critic's heads (official `critic_linear` is registered before `actor_linear`,
`src/models/actor_critic.py:47-48`). Params the official architecture cannot express are refused.
"""

from __future__ import annotations

import re
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

from torch import Tensor

from diamond.config import ActorCriticConfig, Params, WorldModelConfig
from diamond.io import ArtifactError
from diamond.official.keymap import NETWORKS, map_key

# The official GroupNorm group size, a constant (GN_GROUP_SIZE, src/models/blocks.py:12).
OFFICIAL_GROUP_CHANNELS = 32
OUR_NETWORKS = {ours: official for official, ours in NETWORKS.items()}

# (our pattern, official replacement): the inverse of official.KEY_RULES / RESBLOCK_RULES. Each
# exported key is checked to map back to ours (`official_key`); the tests check the official key
# lists of the tiny fixture and the paper size (tests/test_export_official.py).
INVERSE_RULES: dict[str, list[tuple[str, str]]] = {
    "denoiser": [
        (r"^noise_emb\.freqs$", "inner_model.noise_emb.weight"),
        (r"^act_emb\.", "inner_model.act_emb.0."),
        (r"^cond_proj\.", "inner_model.cond_proj."),
        (r"^net\.norm_out\.", "inner_model.norm_out.norm."),
        (r"^net\.(conv_in|conv_out)\.", r"inner_model.\1."),
        (r"^net\.down_blocks\.", "inner_model.unet.d_blocks."),
        (r"^net\.up_blocks\.", "inner_model.unet.u_blocks."),
        (r"^net\.middle\.", "inner_model.unet.mid_blocks."),
        (r"^net\.(downsamples|upsamples)\.", r"inner_model.unet.\1."),
    ],
    "rew_end_model": [],
    "actor_critic": [
        (r"^encoder\.", "encoder.encoder."),
        (r"\.norm\.", ".f.0.norm."),
        (r"\.conv\.", ".f.2."),
        (r"\.skip\.", ".skip_projection."),
        (r"^actor\.", "actor_linear."),
        (r"^critic\.", "critic_linear."),
    ],
}
INVERSE_RESBLOCK_RULES: list[tuple[str, str]] = [
    # The last `.blocks.` only: R's encoder levels are `encoder.blocks.N` in both codes.
    (r"\.blocks\.(?!.*\.blocks\.)", ".resblocks."),
    (r"\.skip\.", ".proj."),
    (r"\.(norm[12])\.to_scale_shift\.", r".\1.linear."),
    (r"\.attention\.norm\.", ".attn.norm.norm."),
    (r"\.attention\.qkv\.", ".attn.qkv_proj."),
    (r"\.attention\.out\.", ".attn.out_proj."),
]
# Keys the official module registers after the ones our order puts them before.
OFFICIAL_LATER = {"actor_critic": ("actor_linear.",)}


def official_key(network: str, key: str) -> str:
    """The official key (within official top-level module `network`) of our key `key`."""
    official = key
    for pattern, replacement in (INVERSE_RESBLOCK_RULES if network != "actor_critic" else []) + INVERSE_RULES[network]:
        official = re.sub(pattern, replacement, official)
    if map_key(network, official) != key:
        raise ArtifactError(f"{network}: our key {key!r} has no official counterpart")
    return official


def expressibility_problems(wm: WorldModelConfig, ac: ActorCriticConfig) -> list[str]:
    """Why the official `Agent` (branch main) cannot hold our world model `wm` and actor-critic `ac`;
    empty if it can. The official main code is EDM only, its GroupNorm groups are 32 channels,
    and its R's last layer has no bias (`src/models/rew_end_model.py:38`)."""
    problems = []
    if wm.denoiser.formulation != "edm":
        problems.append(f"world_model.denoiser.formulation is {wm.denoiser.formulation!r} (official: 'edm')")
    for key, value in (("world_model.denoiser", wm.denoiser.num_groups_channels),
                       ("world_model.reward_end", wm.reward_end.num_groups_channels),
                       ("actor_critic", ac.num_groups_channels)):
        if value != OFFICIAL_GROUP_CHANNELS:
            problems.append(f"{key}.num_groups_channels is {value} (official: {OFFICIAL_GROUP_CHANNELS})")
    if wm.reward_end_prior_init:
        problems.append("world_model.reward_end_prior_init is true (official: false, no output bias)")
    return problems


def check_expressible(wm: WorldModelConfig, ac: ActorCriticConfig, where: str) -> None:
    problems = expressibility_problems(wm, ac)
    if problems:
        raise ArtifactError(f"{where}: the official code cannot express this agent: {'; '.join(problems)}")


def to_official(networks: Mapping[str, Mapping[str, Tensor]]) -> OrderedDict[str, Tensor]:
    """{our network name: its state dict} -> the official `Agent.state_dict()` layout.

    Official top-level order (denoiser, rew_end_model, actor_critic), official order within each;
    tensors detached, on the CPU, contiguous (e.g. after channels-last training)."""
    out: OrderedDict[str, Tensor] = OrderedDict()
    for official, ours in NETWORKS.items():
        later = OFFICIAL_LATER.get(official, ())
        keys = [official_key(official, k) for k in networks[ours]]
        # Stable: within each rank, our (= the official) registration order.
        ranked = sorted(zip(keys, networks[ours].values()), key=lambda kv: kv[0].startswith(later))
        for key, value in ranked:
            out[f"{official}.{key}"] = value.detach().cpu().contiguous()
    return out


def official_agent_config(p: Params) -> dict[str, Any]:
    """The official agent config (`config/agent/default.yaml` layout, hydra `_target_`s) of params `p`.

    `img_size` is written out (the official file reads it from `env.train.size`); as in that file,
    `num_actions` is left to the caller (`instantiate(cfg.agent, num_actions=...)`, `src/play.py:92`)."""
    den, re_, ac, size = p.world_model.denoiser, p.world_model.reward_end, p.actor_critic, p.env.obs_size
    return {
        "_target_": "agent.AgentConfig",
        "denoiser": {
            "_target_": "models.diffusion.DenoiserConfig", "sigma_data": den.sigma_data,
            "sigma_offset_noise": den.sigma_offset_noise,
            "inner_model": {
                "_target_": "models.diffusion.InnerModelConfig", "img_channels": 3,
                "num_steps_conditioning": den.num_conditioning_frames, "cond_channels": den.cond_channels,
                "depths": list(den.depths), "channels": list(den.channels), "attn_depths": [int(a) for a in den.attention],
            },
        },
        "rew_end_model": {
            "_target_": "models.rew_end_model.RewEndModelConfig", "lstm_dim": re_.lstm_dim, "img_channels": 3,
            "img_size": size, "cond_channels": re_.cond_channels, "depths": list(re_.depths),
            "channels": list(re_.channels), "attn_depths": [0] * len(re_.channels),
        },
        "actor_critic": {
            "_target_": "models.actor_critic.ActorCriticConfig", "lstm_dim": ac.lstm_dim, "img_channels": 3,
            "img_size": size, "channels": list(ac.channels), "down": [1] * len(ac.channels),
        },
    }
