"""One file per precision mode; each registers itself with `quant.registry.register_mode`."""
