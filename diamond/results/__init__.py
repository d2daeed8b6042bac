"""Results (paper Table 1, docs/architecture.md §5): scores, human-normalized aggregates
with rliable, the tables and the released-agents and study reports."""
