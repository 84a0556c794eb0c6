"""Stage `inputs`: fingerprint the inputs params.yaml names outside the pipeline's files, so DVC sees them change.

dvc.yaml runs this stage every time (`always_changed`); it writes data/inputs/<input>.json for the image
source, `model.pretrained`, `evaluate.prompts` and `evaluate.clip_model` (pipeline/contracts/inputs.py), and
the stages that read an input depend on its fingerprint. DVC re-runs a stage only when a dependency's content
changed, so an unchanged input costs this stage's listing and nothing else.

What a fingerprint covers:
- a folder or manifest source: every item the source lists, by name, caption and change stamp (size and
  modification time, its mask file's too, which ingest's incremental index uses too), so an added, removed,
  edited, re-captioned or re-masked image re-runs ingest, and nothing is read but the captions;
- a saved Hugging Face dataset, a pretrained model folder, a CLIP folder: every file's relative path, size and
  modification time (one stat per file, not a read of 24 GB of weights);
- webdataset shards, local or remote: each shard's size and ETag or modification time;
- the prompts file: its content;
- named subsets (`ingest.source: subsets`): each subset's source as above, by subset name, except the rendered
  class images (data/class_images, the class_images stage's output, which ingest lists itself);
- a hub id (and a remote URL for the other inputs): its name alone. A new revision upstream is not seen;
  `dvc repro -f -s STAGE` re-runs the stage that reads it.
A copied or freshly cloned folder has new modification times: ingest re-reads its images once and, their
content being the same, writes the same data/raw, so nothing after it re-runs.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator
from pathlib import Path

from pipeline.contracts.inputs import CLIP_MODEL, PRETRAINED, PROMPTS, SOURCE, input_locations
from pipeline.contracts.paths import Paths
from pipeline.core.atomic import write_json
from pipeline.core.config import Params
from pipeline.core.prior_params import CLASS_IMAGES
from pipeline.core.source_params import SUBSETS, IngestParams, SourceSections
from pipeline.data.sources import Rejected, configured, webdataset


def inputs(params: Params, paths: Paths) -> dict[str, dict]:
    """Write each input's fingerprint into data/inputs/ and return them by file name."""
    locations = input_locations(params)
    fingerprints = {
        SOURCE: source_fingerprint(params.ingest, paths),
        PRETRAINED: location_fingerprint(locations[PRETRAINED], paths),
        PROMPTS: location_fingerprint(locations[PROMPTS], paths, by_content=True),
        CLIP_MODEL: location_fingerprint(locations[CLIP_MODEL], paths),
    }
    for name, fingerprint in fingerprints.items():
        write_json(paths.inputs / name, fingerprint)
    return fingerprints


def source_fingerprint(params: IngestParams, paths: Paths) -> dict:
    if params.source == SUBSETS:
        return {"input": SUBSETS, "subsets": {name: sections_fingerprint(subset, paths)
                                              for name, subset in params.subsets.items()}}
    return sections_fingerprint(params, paths)


def sections_fingerprint(params: SourceSections, paths: Paths) -> dict:
    """One source's fingerprint, from its kind and its section."""
    location = params.location()
    if params.source == "folder" and location.rstrip("/") == CLASS_IMAGES:
        # a stage's output, which ingest lists itself: fingerprinted here it could be read before the stage renders
        return {"input": location, "watched": "as the class_images stage's output"}
    if params.source in ("folder", "manifest"):
        _, items = configured.open_sections(params, paths)
        return {"input": location, **digest_of(item_lines(items))}
    if params.source == "webdataset":
        filesystem, shards = webdataset.shard_files(
            location if webdataset.is_url(location) else str(paths.input(location)))
        return {"input": location, **digest_of(f"{shard}\t{webdataset.shard_stamp(filesystem.info(shard))}"
                                                for shard in shards)}
    if params.source == "hf":
        return location_fingerprint(location, paths)
    return {"input": None}  # the rendered shapes: their params, which ingest lists, are all there is


def item_lines(items: Iterable) -> Iterator[str]:
    for item in items:
        if isinstance(item, Rejected):
            yield f"rejected\t{item.name}\t{item.reason}"
        else:
            yield f"{item.name}\t{item.stamp}\t{item.caption}"


def location_fingerprint(location: str | None, paths: Paths, by_content: bool = False) -> dict:
    """A local file or folder by its files (stat, or content for a small file), else the name alone."""
    if location is None:
        return {"input": None}
    local = paths.input(location)
    if not local.exists():
        return {"input": location, "watched": "by name only (a hub id or URL, not a path here)"}
    if local.is_file() and by_content:
        return {"input": location, "files": 1, "sha256": hashlib.sha256(local.read_bytes()).hexdigest()}
    return {"input": location, **digest_of(file_stats(local))}


def file_stats(location: Path) -> Iterator[str]:
    files = [location] if location.is_file() else sorted(path for path in location.rglob("*") if path.is_file())
    for path in files:
        stat = path.stat()
        yield f"{path.relative_to(location).as_posix()}\t{stat.st_size}\t{stat.st_mtime_ns}"


def digest_of(lines: Iterable[str]) -> dict:
    digest, count = hashlib.sha256(), 0
    for line in lines:
        digest.update(line.encode("utf-8", "surrogateescape") + b"\n")
        count += 1
    return {"files": count, "sha256": digest.hexdigest()}
