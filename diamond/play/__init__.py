"""Play in the world model from a browser (docs/architecture.md §1; README, "Play in the world
model"): the session, the local HTTP server and its page."""
