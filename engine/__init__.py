"""The model engine: load a causal LM once, capture and steer its residual stream, generate, read emotions."""
