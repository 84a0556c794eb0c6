"""The inputs params.yaml names outside the pipeline's own files, and the fingerprints through which DVC sees them.

The user's image source, the pretrained model, the evaluation prompts file and the CLIP model can sit anywhere
(a folder in the project, an absolute path, a hub id, a URL), so dvc.yaml cannot list them as deps. The
`inputs` stage, which DVC runs every time, writes one fingerprint per input into data/inputs/, and every
stage that reads an input lists its fingerprint: an edit to the input re-runs those stages, and an unchanged
input re-runs nothing. In an experiment's copy of the project (`dvc exp run --temp`) these inputs are read
from the project itself (`Paths.input`), as they are not copied.
"""

from __future__ import annotations

from pipeline.core.config import Params

SOURCE = "source.json"  # the configured ingest source: read by ingest
PRETRAINED = "pretrained.json"  # model.pretrained: read by vae, encode, train
PROMPTS = "prompts.json"  # evaluate.prompts: read by evaluate
CLIP_MODEL = "clip_model.json"  # evaluate.clip_model: read by evaluate

# the params keys naming each input: a stage that reads one lists the fingerprint (tests/test_dependencies.py).
# ingest.subsets names inputs too (each subset's source section), but train reads it only for the subsets' shares:
# only ingest reads their sources, and it lists the fingerprint as it reads all of `ingest`.
WATCHED_KEYS = {SOURCE: ("ingest.folder", "ingest.manifest", "ingest.hf", "ingest.webdataset"),
                PRETRAINED: ("model.pretrained",), PROMPTS: ("evaluate.prompts",), CLIP_MODEL: ("evaluate.clip_model",)}


def input_locations(params: Params) -> dict[str, str | None]:
    """Each fingerprint's input as params.yaml names it: a path (relative to the project root unless absolute),
    a hub id or a URL; None where the input is not set."""
    return {SOURCE: params.ingest.location(), PRETRAINED: params.model.pretrained,
            PROMPTS: params.evaluate.prompts, CLIP_MODEL: params.evaluate.clip_model}
