"""Play in the world model from a browser (README, "Play in the world model"): the
session, the local HTTP server and its page."""
