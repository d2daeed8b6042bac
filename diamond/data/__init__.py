"""Real experience: episodes, the on-disk episode store, and the segment sampler (docs/architecture.md §3.1)."""

from diamond.data.episode import Episode
from diamond.data.sampler import RECENCY_WEIGHTS, Segment, SegmentSampler, episode_weights
from diamond.data.store import EpisodeStore

__all__ = ["Episode", "EpisodeStore", "RECENCY_WEIGHTS", "Segment", "SegmentSampler", "episode_weights"]
