"""The evaluate stage's own pieces: noise metrics, shape and label adherence, prompts, external metrics."""
