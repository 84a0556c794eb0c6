"""The train stage's own pieces: trained modules and EMA, checkpoints, export, speed levers, throughput."""
