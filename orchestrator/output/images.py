"""Where images live in an output: one object per image (`files`), or WebDataset tar shards (`shards`).

Used by the sink (writing), the manifest's compaction (packing tars) and every reader (reproduce, verify, the
report). A manifest row locates its image by `image_key` (relative to the output root) and, inside a tar, by
`image_member`, `image_offset` and `image_size`, so one image is one ranged read whatever the layout.

Tars follow img2dataset's WebDataset conventions: each sample is `<key>.<png|jpg|webp>`, `<key>.txt` (the prompt)
and `<key>.json` (its manifest row); sample keys never contain a dot. They are written with the standard
library's tarfile (POSIX ustar), which every WebDataset reader accepts.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import tarfile
from dataclasses import dataclass

import numpy as np
from PIL import Image

EXTENSIONS = {"png": "png", "jpeg": "jpg", "webp": "webp"}
_UNSAFE = re.compile(r"[^A-Za-z0-9_-]")
TAR_MTIME = 0  # fixed member times: the same rows always give byte-identical tars


def _short_hash(text: str, size: int = 4) -> str:
    return hashlib.blake2b(text.encode("utf-8"), digest_size=size).hexdigest()


def safe_key(prompt_id: str) -> str:
    """A name-safe key for a user-supplied id: it never contains '/', '.' or '..', so it never escapes its folder
    (nor splits a WebDataset key). Ids that needed changing get a hash suffix, so two ids never collide."""
    cleaned = _UNSAFE.sub("_", prompt_id)[:80]
    if cleaned != prompt_id or not cleaned:
        cleaned = f"{cleaned}-{_short_hash(prompt_id)}"
    return cleaned


def sample_key(prompt_id: str, seed: int) -> str:
    """One image's name without extension: the file stem (files layout) and the WebDataset sample key (tars)."""
    return f"{safe_key(prompt_id)}_{int(seed)}"


def file_image_key(prompt_id: str, seed: int, image_format: str) -> str:
    """Deterministic key of an image in the files layout, spread over 256 folders by prompt."""
    return f"images/{_short_hash(prompt_id, 1)}/{sample_key(prompt_id, seed)}.{EXTENSIONS[image_format]}"


def encode_image(pixels: np.ndarray, image_format: str) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=image_format.upper())
    return buffer.getvalue()


@dataclass(frozen=True)
class Member:
    """Where one file sits inside a tar: its name and the byte range of its data."""

    name: str
    offset: int
    size: int


class TarPacker:
    """Appends files to a tar stream and records where each one's data lands (for ranged reads later)."""

    def __init__(self, stream):
        self._tar = tarfile.open(fileobj=stream, mode="w", format=tarfile.USTAR_FORMAT)

    def add(self, name: str, data: bytes) -> Member:
        info = tarfile.TarInfo(name)
        info.size, info.mtime, info.mode = len(data), TAR_MTIME, 0o644
        self._tar.addfile(info, io.BytesIO(data))
        # tarfile sets offsets only when reading; the data ends the record, padded to 512-byte blocks.
        padded = -(-len(data) // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE
        return Member(name, self._tar.offset - padded, len(data))

    def close(self) -> None:
        self._tar.close()


def pack_images(names: list[str], images: list[bytes]) -> tuple[bytes, list[Member]]:
    """A small tar of images (one sink unit's, while its shard is in progress), with each member's place."""
    buffer = io.BytesIO()
    packer = TarPacker(buffer)
    members = [packer.add(name, data) for name, data in zip(names, images)]
    packer.close()
    return buffer.getvalue(), members


def sample_files(key: str, extension: str, image: bytes, row: dict) -> list[tuple[str, bytes]]:
    """The members of one WebDataset sample: the image, the prompt as text, and the manifest row as JSON."""
    described = {name: value for name, value in row.items() if not name.startswith("image_")}
    return [
        (f"{key}.{extension}", image),
        (f"{key}.txt", (row.get("prompt") or "").encode("utf-8")),
        (f"{key}.json", json.dumps(described, sort_keys=True, default=str).encode("utf-8")),
    ]


def list_members(data: bytes) -> dict[str, Member]:
    """Every member of a tar held in memory (verify reads tars this way)."""
    members = {}
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
        for info in tar:
            if info.isfile():
                members[info.name] = Member(info.name, info.offset_data, info.size)
    return members
