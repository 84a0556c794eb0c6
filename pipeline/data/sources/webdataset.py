"""img2dataset's webdataset output: `.tar` shards in which each sample is `{key}.jpg|png|webp` (the image),
`{key}.txt` (its caption) and `{key}.json` (its download metadata), with a `{shard}.parquet` of metadata
beside each shard (not needed here: the captions are in the shards).

`ingest.webdataset.path` is a folder of shards, a glob (`data/shards/*.tar`) or an fsspec URL
(`s3://bucket/laion/`, `https://host/shards/00000.tar`); remote file systems need their fsspec package
(s3fs, gcsfs). A sample is named `{shard}/{key}` and stamped with its shard's size and modification time
(or its ETag, where the store gives one), so a shard that did not change has no image read again. The
shard's member headers and captions are read each run (seeks past the image bytes on a local disk; on a
remote store that is a range request per sample). A sample without an image, a caption that is not
UTF-8 and a shard that is not a tar archive are rejected with the shard and key; the others go on.
"""

from __future__ import annotations

import posixpath
import tarfile
from collections.abc import Iterator

from pipeline.data.sources import Rejected, SourceError, SourceItem, caption_text

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")
CAPTION_SUFFIX = ".txt"


def is_url(path: str) -> bool:
    return "://" in path


def shard_files(location: str):
    """The file system and the sorted .tar shards at a folder, glob, single shard or URL."""
    import fsspec

    filesystem, root = fsspec.core.url_to_fs(location)
    if filesystem.isdir(root):
        shards = filesystem.glob(posixpath.join(root.rstrip("/"), "*.tar"))
    else:
        shards = [path for path in filesystem.glob(root) if path.endswith(".tar")]
    if not shards:
        raise SourceError(f"ingest.webdataset.path: no .tar shards at {location}")
    return filesystem, sorted(shards)


def shard_stamp(info: dict) -> str:
    """Size and the store's ETag, else its modification (or creation) time: each changes with the shard."""
    changed = (info.get("ETag") or info.get("etag") or info.get("mtime") or info.get("LastModified")
               or info.get("created"))
    return f"{info['size']}:{changed}"


def items(location: str) -> Iterator[SourceItem | Rejected]:
    filesystem, shards = shard_files(location)
    base = posixpath.commonpath([posixpath.dirname(shard) for shard in shards])
    for shard in shards:
        name = posixpath.relpath(shard, base)
        try:
            yield from shard_items(filesystem, shard, name)
        except (tarfile.TarError, EOFError) as error:
            yield Rejected(name, f"{name}: not a readable tar archive ({type(error).__name__}: {error})")


def shard_items(filesystem, shard: str, name: str) -> Iterator[SourceItem | Rejected]:
    """The samples of one shard, grouped by key (the member name up to the first dot of its file name)."""
    stamp = shard_stamp(filesystem.info(shard))
    samples: dict[str, dict[str, tarfile.TarInfo]] = {}
    captions: dict[str, bytes] = {}
    with filesystem.open(shard, "rb") as stream, tarfile.open(fileobj=stream, mode="r:") as archive:
        for member in archive:
            if not member.isfile():
                continue
            folder, file_name = posixpath.split(member.name)
            stem, dot, suffix = file_name.partition(".")
            key = posixpath.join(folder, stem)
            samples.setdefault(key, {})[f"{dot}{suffix}".lower()] = member
            if f"{dot}{suffix}".lower() == CAPTION_SUFFIX:
                captions[key] = archive.extractfile(member).read()
    for key, members in samples.items():
        item_name = f"{name}/{key}"
        image = next((members[suffix] for suffix in IMAGE_SUFFIXES if suffix in members), None)
        if image is None:
            yield Rejected(item_name, f"{name}: sample {key} has no image (.jpg, .png or .webp), only "
                                      f"{', '.join(sorted(members))}")
            continue
        try:
            caption = caption_text(captions.get(key, b"").decode("utf-8"))
        except UnicodeDecodeError as exc:
            yield Rejected(item_name, f"{name}: caption {key}.txt is not UTF-8 text ({exc.reason} at byte {exc.start})")
            continue
        yield SourceItem(item_name, caption, member_reader(filesystem, shard, image), stamp)


def member_reader(filesystem, shard: str, member: tarfile.TarInfo):
    def read() -> bytes:
        with filesystem.open(shard, "rb") as stream:
            stream.seek(member.offset_data)
            return stream.read(member.size)

    return read
