"""The slice store: CT volumes prepared once into memory-mappable, slice-first arrays.

Training reads single axial slices in random order, thousands per second. Decompressing a
`.nii.gz` per slice would be far too slow, so `prepare_store` converts each case once:

  CACHE/index.json                    the volumes, their sources' fingerprints, spacing and
                                      which slices hold liver / tumour; written last
  CACHE/volumes/NAME-HASH/hu.npy      int16 Hounsfield units, (Z, X, Y), RAS
  CACHE/volumes/NAME-HASH/labels.npy  uint8 labels 0 / 1 / 2, (Z, X, Y), RAS
  CACHE/volumes/NAME-HASH/meta.json   the same entry as in the index

Arrays are reoriented to RAS with `nifti.to_ras` (no resampling) and stored slice-first, so
one axial slice is one contiguous 512 KiB read from a memory map. HASH is a hash of the
sources' fingerprints (absolute path, size, modification time of image and label): a
changed source gets a new folder, never an overwritten one.

Preparation is atomic. Each volume is written into a temporary folder that is renamed into
place only when complete, and the index, which alone says which folders are current, is
replaced atomically after each volume. A crash or a bad file mid-way leaves at worst a
temporary folder (removed by the next preparation), never an entry that looks complete.
A lock file keeps two preparations of one cache from running at once.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import logging
import os
import re
import secrets
import shutil
import sys
from typing import Iterable, Sequence

import numpy as np
import tqdm

from munet_jax.atomic import write_json
from munet_jax.data import nifti
from munet_jax.data.discovery import Case, natural_key
from munet_jax.data.volumes import CaseVolume
from munet_jax.errors import UserError, WriteError
from munet_jax.labels import liver_mask, tumour_mask

log = logging.getLogger(__name__)

FORMAT = 1                   # bump when the layout or the meaning of the files changes
INDEX = "index.json"
VOLUMES = "volumes"
LIVER, TUMOUR = 1, 2          # bits of the per-slice flags
_CHUNK_BYTES = 64 << 20      # slices converted at a time: bounds the extra memory
_TMP_PREFIX = ".tmp-"


@dataclasses.dataclass(frozen=True)
class VolumeInfo:
  """One prepared volume.

  Attributes:
    name: the case name ('volume-3').
    folder: absolute path of its entry folder (hu.npy, labels.npy, meta.json).
    shape: (Z, X, Y) of the stored arrays: axial slices of X (towards Right) by Y
      (towards Anterior), Z running inferior -> superior.
    spacing: (sz, sx, sy) voxel size in mm, in the order of `shape`.
    affine: (4, 4) voxel -> world matrix of the source file (its own axis order).
    liver: [start, stop) ranges of the slices that hold liver (label 1 or 2).
    tumour: [start, stop) ranges of the slices that hold tumour (label 2).
    image, label: the source files.
  """
  name: str
  folder: str
  shape: tuple[int, int, int]
  spacing: tuple[float, float, float]
  affine: tuple
  liver: tuple[tuple[int, int], ...]
  tumour: tuple[tuple[int, int], ...]
  image: str
  label: str

  @property
  def num_slices(self) -> int:
    return self.shape[0]

  def slice_flags(self) -> np.ndarray:
    """(Z,) uint8: bit `LIVER` set on slices with liver, bit `TUMOUR` on slices with tumour."""
    flags = np.zeros(self.num_slices, np.uint8)
    for bit, ranges in ((LIVER, self.liver), (TUMOUR, self.tumour)):
      for start, stop in ranges:
        flags[start:stop] |= bit
    return flags

  def to_json(self, cache_dir: str) -> dict:
    d = dataclasses.asdict(self)
    d["folder"] = os.path.relpath(self.folder, cache_dir)
    return d

  @classmethod
  def from_json(cls, d: dict, cache_dir: str) -> "VolumeInfo":
    return cls(name=d["name"], folder=os.path.join(cache_dir, d["folder"]),
               shape=tuple(d["shape"]), spacing=tuple(d["spacing"]),
               affine=tuple(tuple(r) for r in d["affine"]),
               liver=tuple(tuple(r) for r in d["liver"]),
               tumour=tuple(tuple(r) for r in d.get("tumour", d.get("tumor", ()))), image=d["image"], label=d["label"])


class SliceStore:
  """Prepared volumes of one cache folder, read through memory maps.

  Attributes:
    cache_dir: the cache folder.
    volumes: `VolumeInfo` per volume, in the order asked for.
    skipped: (case name, reason) of the cases left out as bad (`skip_bad=True`).

  Pickles without its open memory maps, so worker processes reopen them lazily.
  """

  def __init__(self, cache_dir: str, volumes: Sequence[VolumeInfo],
               skipped: Sequence[tuple[str, str]] = ()):
    self.cache_dir = cache_dir
    self.volumes = list(volumes)
    self.skipped = list(skipped)
    self._by_name = {v.name: v for v in self.volumes}
    self._arrays: dict[str, tuple[np.ndarray, np.ndarray]] = {}

  def __getstate__(self):
    state = self.__dict__.copy()
    state["_arrays"] = {}
    return state

  def __len__(self) -> int:
    return len(self.volumes)

  @property
  def names(self) -> list[str]:
    return [v.name for v in self.volumes]

  @property
  def num_slices(self) -> int:
    return sum(v.num_slices for v in self.volumes)

  def info(self, name: str) -> VolumeInfo:
    """The `VolumeInfo` of volume `name` (KeyError if it is not in this store)."""
    return self._by_name[name]

  def volume(self, name: str) -> tuple[np.ndarray, np.ndarray]:
    """(hu, labels) of volume `name` as stored: read-only memory maps, (Z, X, Y), RAS.

    Slice-first, for readers of single slices (the training batches); whole volumes in
    the library's (X, Y, Z) order come from `case`. hu is int16 Hounsfield units,
    labels uint8 (0 background, 1 liver, 2 tumour).
    """
    arrays = self._arrays.get(name)
    if arrays is None:
      folder = self.info(name).folder
      arrays = (_load(os.path.join(folder, "hu.npy")), _load(os.path.join(folder, "labels.npy")))
      self._arrays[name] = arrays
    return arrays

  def case(self, name: str) -> CaseVolume:
    """Volume `name` in the library's axis convention: RAS (X, Y, Z), views of the maps."""
    hu, labels = self.volume(name)
    sz, sx, sy = self.info(name).spacing
    return CaseVolume(name, np.moveaxis(hu, 0, -1), np.moveaxis(labels, 0, -1), (sx, sy, sz))

  def slice_table(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every slice of the store, volume after volume.

    Returns:
      (volume, z, flags): (N,) int32 index into `volumes`, (N,) int32 slice index, and
      (N,) uint8 flags (bits `LIVER`, `TUMOUR`), N = `num_slices`.
    """
    counts = [v.num_slices for v in self.volumes]
    volume = np.repeat(np.arange(len(counts), dtype=np.int32), counts)
    z = np.concatenate([np.arange(n, dtype=np.int32) for n in counts] or [np.zeros(0, np.int32)])
    flags = np.concatenate([v.slice_flags() for v in self.volumes] or [np.zeros(0, np.uint8)])
    return volume, z, flags


def _load(path: str) -> np.ndarray:
  try:
    return np.load(path, mmap_mode="r")
  except (OSError, ValueError) as e:
    raise UserError(f"{path}: slice store file is missing or damaged ({e}); delete the "
                    "cache folder to prepare it again") from e


def default_cache_dir(root: str) -> str:
  """The store of a data root when `data.cache_dir` is not set: ROOT/.munet_cache."""
  return os.path.join(os.fspath(root), ".munet_cache")


# ---------------------------------------------------------------------------------------
# Preparation


def prepare_store(cases: Sequence[Case], cache_dir, skip_bad: bool = False,
                  progress: bool | None = None) -> SliceStore:
  """Prepares (or re-uses) the slice store of `cases` in `cache_dir`.

  A case whose image and label have the fingerprint recorded in the index is re-used
  without reading its files; new or changed cases are read with full validation
  (`nifti.read_image`, `nifti.read_label`) and written. Entries of other cases already in
  the cache are kept, so one cache can serve several splits.

  Args:
    cases: labelled cases from `discovery.find_cases`; names unique.
    cache_dir: the store folder, created if missing.
    skip_bad: when False, the first bad case raises its `UserError`; when True it is left
      out and listed in `skipped`. A case that failed before with unchanged files is
      skipped again without being re-read.
    progress: tqdm bar over the cases to prepare; default: when stderr is a terminal
      and more than one case needs preparing.

  Returns:
    A `SliceStore` of the cases (in the order given) that are not skipped.

  Raises:
    UserError naming the file: a bad case (with skip_bad=False), a label missing, or a
    cache folder that cannot be written.
  """
  cache_dir = os.path.abspath(os.fspath(cache_dir))
  names = [c.name for c in cases]
  if len(set(names)) != len(names):
    raise ValueError(f"case names are not unique: {names}")
  try:
    os.makedirs(os.path.join(cache_dir, VOLUMES), exist_ok=True)
  except OSError as e:
    if not os.path.isdir(cache_dir):
      raise UserError(f"{cache_dir}: cannot create the slice store folder "
                      f"({e.strerror or e})") from e
  with _locked(cache_dir):
    index = _read_index(cache_dir)
    entries, failed = index["volumes"], index["failed"]
    prints = {c.name: _fingerprint(c) for c in cases}
    todo = [c for c in cases if not _current(entries.get(c.name), prints[c.name], cache_dir)]
    _remove_stale(cache_dir, entries)
    skipped = []
    if progress is None:
      progress = len(todo) > 1 and _stderr_is_terminal()
    for case in tqdm.tqdm(todo, desc="preparing slice store", unit="volume",
                          disable=not progress):
      previous = failed.get(case.name)
      if skip_bad and previous and previous["fingerprint"] == prints[case.name]:
        skipped.append((case.name, previous["reason"]))
        continue
      try:
        info = _prepare_volume(case, cache_dir, prints[case.name])
      except WriteError:
        raise   # the disk, not the case: never recorded as a bad case
      except UserError as e:
        if not skip_bad:
          raise
        reason = " ".join(str(e).split())
        log.info("skipping %s: %s", case.name, reason)   # callers report `skipped`
        skipped.append((case.name, reason))
        entries.pop(case.name, None)
        failed[case.name] = {"fingerprint": prints[case.name], "reason": reason}
        _write_index(cache_dir, index)
        continue
      old = entries.get(case.name)
      entries[case.name] = dict(info.to_json(cache_dir), fingerprint=prints[case.name])
      failed.pop(case.name, None)
      _write_index(cache_dir, index)   # after each volume: a crash keeps what is done
      if old and old["folder"] != entries[case.name]["folder"]:
        shutil.rmtree(os.path.join(cache_dir, old["folder"]), ignore_errors=True)
    skipped_names = {n for n, _ in skipped}
    volumes = [VolumeInfo.from_json(entries[c.name], cache_dir) for c in cases
               if c.name not in skipped_names]
  return SliceStore(cache_dir, volumes, skipped)


def open_store(cache_dir, names: Iterable[str] | None = None) -> SliceStore:
  """Opens a prepared store without checking its sources.

  Args:
    cache_dir: a folder written by `prepare_store`.
    names: the volumes to include, in this order (e.g. the training split); None for all
      of them, in natural order of name.

  Raises:
    UserError naming the folder: no store there, or a name it does not hold.
  """
  cache_dir = os.path.abspath(os.fspath(cache_dir))
  if not os.path.isfile(os.path.join(cache_dir, INDEX)):
    raise UserError(f"{cache_dir}: no prepared slice store here (prepare one with "
                    "`python -m munet_jax.data.prepare ROOT --cache-dir DIR`)")
  entries = _read_index(cache_dir)["volumes"]
  if names is None:
    names = sorted(entries, key=natural_key)
  names = list(names)
  missing = [n for n in names if n not in entries]
  if missing:
    raise UserError(f"{cache_dir}: slice store has no volume {', '.join(missing)}; "
                    "prepare it again from the data root")
  return SliceStore(cache_dir, [VolumeInfo.from_json(entries[n], cache_dir) for n in names])


def _stderr_is_terminal() -> bool:
  return sys.stderr.isatty()


def _fingerprint(case: Case) -> dict:
  if case.label is None:
    raise UserError(f"{case.image}: image has no label file; the slice store holds "
                    "labelled cases only")
  out = {}
  for key, path in (("image", case.image), ("label", case.label)):
    path = os.path.abspath(os.fspath(path))
    try:
      st = os.stat(path)
    except OSError as e:
      raise UserError(f"{path}: cannot read ({e.strerror or e})") from e
    out[key] = {"path": path, "size": st.st_size, "mtime_ns": st.st_mtime_ns}
  return out


def _current(entry: dict | None, fingerprint: dict, cache_dir: str) -> bool:
  """Whether `entry` holds these sources and its files are all there."""
  if entry is None or entry.get("fingerprint") != fingerprint:
    return False
  folder = os.path.join(cache_dir, entry["folder"])
  return all(os.path.isfile(os.path.join(folder, f)) for f in ("hu.npy", "labels.npy"))


def _entry_folder(name: str, fingerprint: dict) -> str:
  digest = hashlib.sha256(json.dumps([FORMAT, fingerprint], sort_keys=True).encode())
  safe = re.sub(r"[^A-Za-z0-9._-]", "_", name)
  return os.path.join(VOLUMES, f"{safe}-{digest.hexdigest()[:12]}")


def _prepare_volume(case: Case, cache_dir: str, fingerprint: dict) -> VolumeInfo:
  """Reads and validates one case and writes its entry folder atomically."""
  rel = _entry_folder(case.name, fingerprint)
  final = os.path.join(cache_dir, rel)
  tmp = os.path.join(cache_dir, VOLUMES, f"{_TMP_PREFIX}{os.getpid()}-{secrets.token_hex(4)}")
  try:
    os.makedirs(tmp)
    image = nifti.read_image(case.image)
    affine = image.affine
    spacing = nifti.ras_spacing(affine)
    hu_ras = nifti.to_ras(image.data, affine)              # (X, Y, Z), a view
    shape = (hu_ras.shape[2], hu_ras.shape[0], hu_ras.shape[1])
    _write_slices(os.path.join(tmp, "hu.npy"), hu_ras, np.int16, _to_int16)
    # Only the grid of the image is needed to check the label: let its voxels go first,
    # so a 512x512x900 case never holds image and label in memory together.
    # (This is why the store does not use `volumes.load_case`.)
    like = dataclasses.replace(image, data=np.broadcast_to(np.int8(0), image.data.shape))
    del image, hu_ras
    label = nifti.read_label(case.label, like=like)
    flags = _write_slices(os.path.join(tmp, "labels.npy"), nifti.to_ras(label.data, affine),
                          np.uint8, None, flags=True)
    del label
    info = VolumeInfo(
        name=case.name, folder=final, shape=shape,
        spacing=(spacing[2], spacing[0], spacing[1]),
        affine=tuple(tuple(float(v) for v in row) for row in affine),
        liver=_ranges(flags & LIVER), tumour=_ranges(flags & TUMOUR),
        image=fingerprint["image"]["path"], label=fingerprint["label"]["path"])
    write_json(os.path.join(tmp, "meta.json"), dict(info.to_json(cache_dir),
                                                     fingerprint=fingerprint))
    if os.path.exists(final):   # left by a crash after the rename, before the index
      shutil.rmtree(final)
    os.rename(tmp, final)
    return info
  except OSError as e:
    raise WriteError(f"{cache_dir}: cannot write the slice store of {case.name} "
                     f"({e.strerror or e})") from e
  except WriteError as e:   # the meta file, through atomic_output
    raise WriteError(f"{cache_dir}: cannot write the slice store of {case.name} "
                     f"({_strerror(e)})") from e
  finally:
    shutil.rmtree(tmp, ignore_errors=True)


def _strerror(error: BaseException) -> str:
  cause = error.__cause__
  return (cause.strerror if isinstance(cause, OSError) and cause.strerror else str(error))


def _to_int16(block: np.ndarray) -> np.ndarray:
  """HU as int16: real values rounded, anything outside int16 clipped (never seen in CT)."""
  if block.dtype == np.int16:
    return block
  info = np.iinfo(np.int16)
  if block.dtype.kind == "f":
    block = np.rint(block)
  return np.clip(block, info.min, info.max).astype(np.int16)


def _write_slices(path: str, ras: np.ndarray, dtype, convert, flags: bool = False):
  """Writes (X, Y, Z) `ras` as a (Z, X, Y) .npy, a chunk of slices at a time.

  Plain writes, not a memory map: the written pages then never count towards this
  process's memory. Returns the per-slice flags when `flags` (labels).
  """
  nx, ny, nz = ras.shape
  per_chunk = max(1, _CHUNK_BYTES // max(1, nx * ny * 4))
  out_flags = np.zeros(nz, np.uint8) if flags else None
  header = {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False,
            "shape": (nz, nx, ny)}
  with open(path, "wb") as f:
    np.lib.format.write_array_header_2_0(f, header)
    for z0 in range(0, nz, per_chunk):
      block = np.ascontiguousarray(np.moveaxis(ras[:, :, z0:z0 + per_chunk], 2, 0))
      block = convert(block) if convert else block.astype(dtype, copy=False)
      if flags:
        out_flags[z0:z0 + len(block)] = (
            LIVER * liver_mask(block).any(axis=(1, 2)) | TUMOUR * tumour_mask(block).any(axis=(1, 2)))
      f.write(np.ascontiguousarray(block, dtype=dtype).data)
    f.flush()
    os.fsync(f.fileno())
  return out_flags


def _ranges(mask: np.ndarray) -> tuple[tuple[int, int], ...]:
  """[start, stop) runs of the non-zero entries of a 1-D array."""
  on = np.flatnonzero(np.diff(np.concatenate([[0], (mask != 0).astype(np.int8), [0]])))
  return tuple((int(a), int(b)) for a, b in zip(on[::2], on[1::2]))


def _read_index(cache_dir: str) -> dict:
  path = os.path.join(cache_dir, INDEX)
  empty = {"format": FORMAT, "volumes": {}, "failed": {}}
  if not os.path.exists(path):
    return empty
  try:
    with open(path) as f:
      index = json.load(f)
  except (OSError, ValueError) as e:
    log.warning("%s: unreadable (%s); preparing the slice store again", path, e)
    return empty
  if not isinstance(index, dict) or index.get("format") != FORMAT:
    log.warning("%s: written by another version; preparing the slice store again", path)
    return empty
  index.setdefault("failed", {})
  return index


def _write_index(cache_dir: str, index: dict) -> None:
  # Durable: the index is the only record of which entries are whole.
  write_json(os.path.join(cache_dir, INDEX), index, durable=True)


def _remove_stale(cache_dir: str, entries: dict) -> None:
  """Removes temporary folders of crashed preparations and folders no entry points to."""
  keep = {os.path.normpath(e["folder"]) for e in entries.values()}
  base = os.path.join(cache_dir, VOLUMES)
  if not os.path.isdir(base):
    return
  for name in os.listdir(base):
    if os.path.normpath(os.path.join(VOLUMES, name)) not in keep:
      shutil.rmtree(os.path.join(base, name), ignore_errors=True)


@contextlib.contextmanager
def _locked(cache_dir: str):
  """An exclusive lock on the cache for one preparation (no-op where locks fail)."""
  try:
    f = open(os.path.join(cache_dir, ".lock"), "a")
  except OSError:
    yield
    return
  with f:
    try:
      fcntl.flock(f, fcntl.LOCK_EX)
    except OSError:
      pass
    yield
