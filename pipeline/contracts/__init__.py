"""The files stages hand each other: their names, columns and readers/writers, in one place.

- `paths`: where every stage reads and writes (mirrors dvc.yaml);
- `records`: the small JSON/CSV records: validation summary, VAE/train/eval metrics, loss curve, registry
  record and the registry's tags (no heavy imports: flows read these);
- `data`: the raw, validated and processed manifests and the processed splits' readers;
- `latents`: the cached VAE latents and text states that encode writes and train/evaluate read.

Stages import these and the shared modules, never each other.
"""
