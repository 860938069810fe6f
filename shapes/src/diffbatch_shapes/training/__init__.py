"""Training code for the embedded default model (procedural shapes data, tokenizer, training command)."""
