"""The source params.yaml configures, opened: its signature and its items."""

from __future__ import annotations

from collections.abc import Iterator

from pipeline.contracts.paths import Paths
from pipeline.core.source_params import IngestParams
from pipeline.data.sources import Rejected, SourceError, SourceItem, folder, hf, manifest, synthetic, webdataset


def open_source(params: IngestParams, paths: Paths) -> tuple[str, Iterator[SourceItem | Rejected]]:
    """The configured source's signature (what it is and where) and its items."""
    if params.source == "folder":
        root = paths.input(params.folder.path)
        if paths.raw.is_relative_to(root):
            # Otherwise every run would walk its own outputs (and the processed data) as new input.
            raise SourceError(f"ingest.folder.path: {root} contains the pipeline's {paths.raw}; "
                              "point it at the folder of source images, such as data/images")
        return f"folder {root}", folder.items(params.folder, root)
    if params.source == "manifest":
        path = paths.input(params.manifest.path)
        return f"manifest {path}", manifest.items(params.manifest, path)
    if params.source == "hf":
        location = hf.locate(params.hf.path_or_id, paths.input(params.hf.path_or_id))
        return f"hf {location} split={params.hf.split}", hf.items(params.hf, location)
    if params.source == "webdataset":
        given = params.webdataset.path
        location = given if webdataset.is_url(given) else str(paths.input(given))
        return f"webdataset {location}", webdataset.items(location)
    return f"synthetic {params.synthetic.model_dump_json()}", synthetic.items(params.synthetic)
