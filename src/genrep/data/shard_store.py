"""The shards of a packed set: WebDataset's layout (one plain tar file per shard, each record the members
``<key>.jpg`` and ``<key>.cls``), written with webdataset's ``TarWriter`` and read by index with its
memory-mapped ``wids.MMIndexedTar``. Why this library and not litdata, mosaicml-streaming or Hugging Face
``datasets``: docs/data.md ("Packed sets"), measured by ``benchmarks/packed_formats.py``.

A shard is a standard tar file (``tar tf`` lists it, any WebDataset reader streams it) and is written with a fixed
owner and modification time, so the same images give the same bytes and the same sha256. Reading by index needs
the offsets of the members, which ``MMIndexedTar`` finds by walking the tar headers of the memory-mapped file when
a process first opens the shard (milliseconds for 1,000 records): no index file is written or unpickled.
"""

from __future__ import annotations

from pathlib import Path

BACKEND = "webdataset-tar"
SHARD_SUFFIX = ".tar"
_IMAGE, _LABEL = "jpg", "cls"


def write_shard(path: Path, images: list[bytes], labels: list[int]) -> None:
    """A tar of records ``<k>.jpg`` (the encoded bytes as they are) and ``<k>.cls`` (the label as text)."""
    import webdataset

    with open(path, "wb") as f, webdataset.TarWriter(f, user="genrep", group="genrep", mtime=1,
                                                     encoder=False) as sink:
        for k, (data, label) in enumerate(zip(images, labels)):
            sink.write({"__key__": f"{k:07d}", _IMAGE: data, _LABEL: str(int(label)).encode()})


class ShardReader:
    """Record ``i`` of one shard: its image bytes, by index, from the memory-mapped tar."""

    def __init__(self, path: Path):
        from wids.wids_mmtar import MMIndexedTar

        self.path = Path(path)
        self.tar = MMIndexedTar(str(self.path), verbose=False)
        names = [name for name, _, _ in self.tar.by_index]
        self.images = [k for k, name in enumerate(names) if name.endswith(f".{_IMAGE}")]
        if 2 * len(self.images) != len(names):
            raise ValueError(f"{self.path} is not a packed shard: {len(names)} members, {len(self.images)} images")

    def __len__(self) -> int:
        return len(self.images)

    def read(self, i: int) -> bytes:
        _, data = self.tar.get_at_index(self.images[i])
        return bytes(data)
