"""Real experience: episodes, the on-disk episode store, and the segment sampler (docs/architecture.md §3.1)."""

from diamond.data.episode import Episode
from diamond.data.sampler import OURS, RECENCY_WEIGHTS, Placement, Segment, SegmentSampler, episode_weights
from diamond.data.store import EpisodeStore

__all__ = ["OURS", "Episode", "EpisodeStore", "Placement", "RECENCY_WEIGHTS", "Segment", "SegmentSampler", "episode_weights"]
