"""The frozen image tower's features of evaluation images, computed once and served again by
train.evaluate. One FeatureCache, two lifetimes: a run's own serves its later evaluations (per-epoch
val, the test; ImageNet's test split is its val split); a table worker's (kept) serves every later
run in that process: the other seeds, base and new, the other hosts whose image tower is frozen.
With a folder, the entries are also kept on disk, so that a later table starts warm.

    cache = features.for_run(args.no_feature_cache)   # the kept one, else a new one; None: off
    with features.kept(features.FeatureCache("store", max_bytes=16 * 2**30)):  # a table worker
        ...

An entry is one pass of an evaluation loader: the features of each of its batches as the tower gave
them. Its key is what they depend on: the image tower's tensors (SHA-256) and the method's
image_features, every image file of the pass in order (path, size, modification time), the loader's
preprocessing and batch size (a batch's features are bitwise those of the same batch only), the
precision, the device and the torch version. A changed image file is another key. A disk entry is
written atomically with the SHA-256 of its key and of its tensors; one that does not match either
is recomputed and replaced, never served. The folder is kept under max_bytes by removing the least
recently used entries.
"""
import hashlib
import io
import os
import sys
import weakref
from contextlib import contextmanager, suppress

import torch

import outputs
from data import UserError

MAGIC = b"textrefiner image features 1\n"
DEFAULT_STORE_BYTES = 16 * 2**30
_tower_digests = weakref.WeakKeyDictionary()  # CLIP -> SHA-256 of its image tower's tensors
_kept = None  # the FeatureCache inside kept()


@contextmanager
def kept(cache):
    """Inside the block for_run() returns `cache`: a table worker's runs share it."""
    global _kept
    _kept = cache
    try:
        yield cache
    finally:
        _kept = None


def for_run(disabled=False):
    """The FeatureCache a run evaluates with: the kept one, else its own; None when disabled."""
    if disabled:
        return None
    return _kept if _kept is not None else FeatureCache()


def tower_digest(clip):
    """SHA-256 of the image tower's tensors (names, dtypes, shapes, bytes), once per CLIP object."""
    if clip not in _tower_digests:
        h = hashlib.sha256()
        for name, tensor in clip.visual.state_dict().items():
            h.update(f"{name} {tensor.dtype} {tuple(tensor.shape)}\n".encode())
            h.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy())
        _tower_digests[clip] = h.hexdigest()
    return _tower_digests[clip]


def image_files(items):
    """(path, size, modification time in ns) of every item's image, in order."""
    files = []
    for item in items:
        stat = os.stat(item.impath)
        files.append((os.path.abspath(item.impath), stat.st_size, stat.st_mtime_ns))
    return files


class FeatureCache:
    """Evaluation features by key (key()); folder: also on disk there, within max_bytes."""

    def __init__(self, folder=None, max_bytes=DEFAULT_STORE_BYTES):
        self.folder, self.max_bytes, self.entries = folder, max_bytes, {}
        if folder:
            os.makedirs(folder, exist_ok=True)

    def __len__(self):
        return len(self.entries)

    def key(self, model, loader, precision, device):
        """The SHA-256 (hex) of what the features of this loader's pass depend on."""
        method = type(model).image_features
        where = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
        parts = [tower_digest(model.clip), f"{method.__module__}.{method.__qualname__}",
                 loader.preprocessing, loader.batch_size, precision, where, torch.__version__,
                 image_files(loader.dataset.items)]
        return hashlib.sha256(repr(parts).encode()).hexdigest()

    def get(self, key, device):
        """[features (B, D)] of each batch of the pass, or None."""
        if key not in self.entries and self.folder:
            features = self._read(key, device)
            if features is not None:
                print(f"evaluation features read from the feature store: {self._path(key)}")
                self.entries[key] = features
        return self.entries.get(key)

    def put(self, key, features):
        self.entries[key] = features
        if self.folder:
            self._write(key, features)

    def _path(self, key):
        return os.path.join(self.folder, key + ".pt")

    def _read(self, key, device):
        """The entry on disk when it is whole and of this key; a damaged one is removed."""
        path = self._path(key)
        try:
            with open(path, "rb") as f:
                blob = f.read()
        except FileNotFoundError:
            return None
        payload = blob[len(header(key, b"")):]
        features = None
        if blob.startswith(header(key, payload)):
            try:
                features = torch.load(io.BytesIO(payload), map_location=device, weights_only=True)
            except Exception:  # whatever the damage, the entry is recomputed
                pass
        if not (isinstance(features, list) and all(isinstance(f, torch.Tensor) for f in features)):
            print(f"warning: feature store entry {path} is damaged; recomputing it",
                  file=sys.stderr)
            with suppress(FileNotFoundError):  # another worker's reader removed it first
                os.remove(path)
            return None
        with suppress(FileNotFoundError):
            os.utime(path)  # recently used: removed last
        return features

    def _write(self, key, features):
        buffer = io.BytesIO()
        torch.save([f.cpu() for f in features], buffer)
        payload = buffer.getvalue()
        blob = header(key, payload) + payload
        if len(blob) > self.max_bytes:
            return
        self._make_room(len(blob))
        try:
            outputs.replace_atomically(self._path(key), lambda f: f.write(blob), shared=True)
        except UserError as e:  # a full disk costs the store an entry, not the run
            print(f"warning: feature store: {e}", file=sys.stderr)

    def _make_room(self, size):
        """The least recently used entries removed until `size` more bytes fit in max_bytes."""
        entries = []
        for name in os.listdir(self.folder):
            if name.endswith(".pt"):
                try:
                    stat = os.stat(os.path.join(self.folder, name))
                except FileNotFoundError:  # another worker removed it
                    continue
                entries.append((stat.st_mtime_ns, stat.st_size, name))
        total = sum(s for _, s, _ in entries)
        for _, entry_size, name in sorted(entries):
            if total + size <= self.max_bytes:
                break
            with suppress(FileNotFoundError):
                os.remove(os.path.join(self.folder, name))
            total -= entry_size


def header(key, payload):
    """An entry's first bytes: MAGIC, its key, the SHA-256 of its payload (each a line)."""
    return MAGIC + f"{key}\n{hashlib.sha256(payload).hexdigest()}\n".encode()
