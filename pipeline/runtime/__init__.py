"""Where work runs: the torch device and the Ray task fan-out."""
