"""What runs in the model worker processes: the LitAPI stages, the batching loop and explanations."""
