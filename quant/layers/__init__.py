"""Linear modules that run quantized weights (one per storage format)."""
