"""Generation engine: scheduling, sampling, detokenization and the model runners."""
