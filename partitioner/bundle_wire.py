"""An edge bundle on the wire: the cloud's ``GetBundle`` stream and the edge's bounded reassembly.

:func:`bundle_chunks` turns an opened bundle into ``BundleChunk`` messages: the manifest first,
then every listed file in the manifest's order, in pieces of at most ``chunk_bytes``. It sends the
bytes on disk as they are: the receiver checks them.

:class:`BundleReceiver` writes a stream of chunks into an empty directory under hard limits (the
manifest's total bytes and file count, each file exactly its declared size, in order, with no gap
and nothing past its end) and hashes each file as it arrives; :meth:`BundleReceiver.finish` then
opens the result with :meth:`EdgeBundle.open`, which checks everything again. Every error is a
:class:`~partitioner.bundle.BundleError` naming the file at fault. No torch.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator
from pathlib import Path

from protos.cleave.v1 import split_inference_pb2 as si_pb2

from .bundle import (
    MANIFEST,
    MAX_MANIFEST_BYTES,
    BundleError,
    BundleFormatError,
    BundleIntegrityError,
    EdgeBundle,
    Manifest,
    _safe_path,
    parse_manifest,
)

DEFAULT_MAX_BYTES = 4 << 30  # a bundle larger than this is refused unless the edge allows more
DEFAULT_MAX_FILES = 256


def bundle_chunks(bundle: EdgeBundle, chunk_bytes: int) -> Iterator[si_pb2.BundleChunk]:
    """``bundle`` as ``GetBundle`` messages: its manifest, then each listed file in ``chunk_bytes`` pieces."""
    manifest = (bundle.root / MANIFEST).read_bytes()
    yield si_pb2.BundleChunk(manifest=manifest)
    for name in bundle.manifest.files:
        offset = 0
        with (bundle.root / name).open("rb") as f:
            while data := f.read(chunk_bytes):
                yield si_pb2.BundleChunk(path=name, offset=offset, data=data)
                offset += len(data)
            if offset == 0:
                yield si_pb2.BundleChunk(path=name, offset=0)  # an empty file is still announced


class BundleReceiver:
    """Reassembles a ``GetBundle`` stream into ``root`` (an empty directory), under hard limits.

    ``max_bytes`` and ``max_files`` bound what a manifest may declare; the files must then arrive
    in the manifest's order, each exactly its declared size: a chunk past a file's end, out of
    order, or for a file not listed is refused at once, before it is written.
    """

    def __init__(self, root: Path, max_bytes: int = DEFAULT_MAX_BYTES, max_files: int = DEFAULT_MAX_FILES) -> None:
        self.root = Path(root)
        self.max_bytes = max_bytes
        self.max_files = max_files
        self.manifest: Manifest | None = None
        self.received = 0  # file bytes written so far
        self._order: list[str] = []
        self._next = 0  # index in _order of the file being received
        self._offset = 0  # bytes of that file received
        self._digest = hashlib.sha256()
        self._file = None

    def feed(self, chunk: si_pb2.BundleChunk) -> None:
        """Take one message of the stream; BundleError naming the file when it breaks a limit."""
        if self.manifest is None:
            self._start(chunk)
            return
        if chunk.manifest:
            raise BundleFormatError(f"{MANIFEST}: sent twice (only the first message carries it)")
        self._advance_to(chunk.path)
        name = self._order[self._next]
        entry = self.manifest.files[name]
        if chunk.offset != self._offset:
            raise BundleIntegrityError(f"{name}: a chunk at offset {chunk.offset}, expected {self._offset}")
        end = self._offset + len(chunk.data)
        if end > entry.bytes:
            raise BundleIntegrityError(
                f"{name}: the cloud sent {end} bytes or more, the manifest says {entry.bytes} (cut off)"
            )
        if self._file is None:
            path = _safe_path(self.root, name, "files")
            path.parent.mkdir(parents=True, exist_ok=True)
            self._file = path.open("xb")
        self._file.write(chunk.data)
        self._digest.update(chunk.data)
        self._offset = end
        self.received += len(chunk.data)

    def receive(self, chunks: Iterable[si_pb2.BundleChunk], expect_fingerprint: str | None = None) -> EdgeBundle:
        """Feed every chunk, then :meth:`finish`."""
        try:
            for chunk in chunks:
                self.feed(chunk)
        finally:
            self._close()
        return self.finish(expect_fingerprint)

    def finish(self, expect_fingerprint: str | None = None) -> EdgeBundle:
        """Check that every file arrived whole, write the manifest, and open the result (every hash again)."""
        if self.manifest is None:
            raise BundleFormatError(f"{MANIFEST}: the stream ended before the manifest")
        if self._next < len(self._order):
            self._complete()
        if self._next < len(self._order):
            missing = self._order[self._next]
            raise BundleIntegrityError(f"{missing}: not sent (the stream ended after {self.received} bytes)")
        return EdgeBundle.open(self.root, expect_fingerprint)

    def _start(self, chunk: si_pb2.BundleChunk) -> None:
        if not chunk.manifest or chunk.path or chunk.data:
            raise BundleFormatError(f"{MANIFEST}: the first message must carry the manifest, and only it")
        if len(chunk.manifest) > MAX_MANIFEST_BYTES:
            raise BundleFormatError(f"{MANIFEST}: {len(chunk.manifest)} bytes, over {MAX_MANIFEST_BYTES}")
        manifest = parse_manifest(chunk.manifest)
        if len(manifest.files) > self.max_files:
            raise BundleError(f"{MANIFEST}: {len(manifest.files)} files, over the limit of {self.max_files}")
        total = sum(e.bytes for e in manifest.files.values())
        if total > self.max_bytes:
            raise BundleError(f"{MANIFEST}: {total} bytes of files, over the limit of {self.max_bytes}")
        for name in manifest.files:
            if name == MANIFEST:
                raise BundleFormatError(f"{MANIFEST}: files lists the manifest itself")
            _safe_path(self.root, name, "files")
        self.root.mkdir(parents=True, exist_ok=True)
        (self.root / MANIFEST).write_bytes(chunk.manifest)
        self.manifest = manifest
        self._order = list(manifest.files)

    def _advance_to(self, path: str) -> None:
        """Make ``path`` the file being received: the current one, or the next once the current is whole."""
        assert self.manifest is not None
        if self._next < len(self._order) and path == self._order[self._next]:
            return
        if path not in self.manifest.files:
            raise BundleFormatError(f"{path!r}: not a file the manifest lists")
        self._complete()
        if self._next >= len(self._order) or path != self._order[self._next]:
            raise BundleIntegrityError(f"{path}: sent out of the manifest's order")

    def _complete(self) -> None:
        """The current file is done: it must be its declared size and sha256."""
        assert self.manifest is not None
        name = self._order[self._next]
        entry = self.manifest.files[name]
        if self._offset != entry.bytes:
            raise BundleIntegrityError(f"{name}: {self._offset} bytes sent, the manifest says {entry.bytes}")
        if self._file is None and entry.bytes == 0:
            path = _safe_path(self.root, name, "files")
            path.parent.mkdir(parents=True, exist_ok=True)
            path.touch(exist_ok=False)
        digest = self._digest.hexdigest()
        if digest != entry.sha256:
            raise BundleIntegrityError(f"{name}: sha256 {digest[:16]}... is not the manifest's {entry.sha256[:16]}...")
        self._close()
        self._next += 1
        self._offset = 0
        self._digest = hashlib.sha256()

    def _close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


__all__ = ["DEFAULT_MAX_BYTES", "DEFAULT_MAX_FILES", "BundleReceiver", "bundle_chunks"]
