"""API adapters: each maps its wire format's requests to `SamplingParams` and renders the engine's events.

They sit between the thin routers and `ModelService`, and never touch torch.
"""
