"""The source params.yaml configures, opened: its signature and its items.

With `ingest.source: subsets` each named subset is a source of its own: its items are named `<subset>/<name>`
(two folders may both hold 1.png), carry their subset, and are captioned by the subset's caption rule.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import replace

from pipeline.contracts.paths import Paths
from pipeline.core.source_params import SUBSETS, IngestParams, SourceSections, SubsetParams
from pipeline.data.sources import Rejected, SourceError, SourceItem, folder, hf, manifest, synthetic, webdataset


def open_source(params: IngestParams, paths: Paths) -> tuple[str, Iterator[SourceItem | Rejected]]:
    """The configured source's signature (what it is and where) and its items."""
    if params.source != SUBSETS:
        return open_sections(params, paths)
    opened = {name: subset_items(name, subset, params.trigger, paths) for name, subset in params.subsets.items()}
    signature = json.dumps({name: signature for name, (signature, _) in opened.items()})
    return f"{SUBSETS} {signature}", (item for _, items in opened.values() for item in items)


def subset_items(name: str, subset: SubsetParams, trigger: str | None,
                 paths: Paths) -> tuple[str, Iterator[SourceItem | Rejected]]:
    """A subset's signature and its items, renamed into the subset and captioned by its rule; a source error
    names the subset's key."""
    try:
        signature, items = open_sections(subset, paths)
    except SourceError as error:
        raise SourceError(f"ingest.subsets.{name}: {error}") from None

    def relabelled() -> Iterator[SourceItem | Rejected]:
        try:
            for item in items:
                if isinstance(item, Rejected):
                    yield Rejected(f"{name}/{item.name}", item.reason)
                else:
                    yield replace(item, name=f"{name}/{item.name}", subset=name,
                                  caption=subset.caption.apply(item.caption, trigger))
        except SourceError as error:
            raise SourceError(f"ingest.subsets.{name}: {error}") from None

    return signature, relabelled()


def open_sections(params: SourceSections, paths: Paths) -> tuple[str, Iterator[SourceItem | Rejected]]:
    """One source's signature and items, from its kind and its section."""
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
