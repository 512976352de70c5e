"""Finding the cases (patients) of a data root, in the LiTS or the Decathlon layout.

- LiTS: `volume-N.nii[.gz]` with `segmentation-N.nii[.gz]`, anywhere below the root (the
  official download spreads them over "Training Batch 1" and "Training Batch 2").
- Decathlon / nnU-Net: `imagesTr/NAME[_0000].nii[.gz]` with `labelsTr/NAME.nii[.gz]`
  in the same parent folder.

Only file names are looked at here; `nifti.read_image` / `read_label` check contents.
Hidden files and folders (names starting with '.') are skipped: the slice cache lives in
`ROOT/.munet_cache` and the Decathlon archive ships macOS `._liver_0.nii.gz` debris.
"""

from __future__ import annotations

import dataclasses
import os
import re

from munet_jax.errors import UserError

_NII = r"\.nii(?:\.gz)?"
_LITS_IMAGE = re.compile(rf"^volume-(\d+){_NII}$")
_LITS_LABEL = re.compile(rf"^segmentation-(\d+){_NII}$")
_DECATHLON = re.compile(rf"^(.+?)(_\d{{4}})?{_NII}$")


@dataclasses.dataclass(frozen=True)
class Case:
  """One patient's CT and, when present, its label file.

  Attributes:
    name: 'volume-3' (LiTS) or 'liver_3' (Decathlon, a `_0000` channel suffix stripped).
    image: path of the CT volume.
    label: path of the label volume; None when absent.
  """
  name: str
  image: str
  label: str | None


def natural_key(text: str) -> list:
  """Sort key that orders 'volume-2' before 'volume-10'."""
  return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", text)]


def _walk_files(root: str):
  """Yields (folder, file name) below root, following links once, skipping hidden names."""
  seen = set()
  for folder, dirs, files in os.walk(root, followlinks=True):
    real = os.path.realpath(folder)
    if real in seen:  # a symlink loop, or the same folder linked twice
      dirs[:] = []
      continue
    seen.add(real)
    dirs[:] = sorted(d for d in dirs if not d.startswith("."))
    for f in sorted(files):
      if not f.startswith("."):
        yield folder, f


def _add(found: dict[str, str], name: str, path: str, what: str) -> None:
  if name in found:
    raise UserError(f"{path}: duplicate {what} for case '{name}', also at {found[name]}; "
                    "keep one copy in the data folder")
  found[name] = path


def find_cases(root, require_labels: bool = True) -> list[Case]:
  """Lists the cases under `root`, sorted naturally by name.

  Args:
    root: the data folder (`data.root`).
    require_labels: when True (training, evaluation) an image without a label file is
      an error; when False (prediction) its `label` is None.

  Returns:
    Cases in natural order of name ('volume-2' before 'volume-10').

  Raises:
    UserError naming the folder or file: root missing or not a folder, no volumes found,
    the same case name twice, a label without an image, or (with `require_labels`) an
    image without a label.
  """
  root = os.fspath(root)
  if not os.path.exists(root):
    raise UserError(f"{root}: data folder not found")
  if not os.path.isdir(root):
    raise UserError(f"{root}: data root must be a folder, this is a file")
  if not os.access(root, os.R_OK | os.X_OK):
    raise UserError(f"{root}: permission denied (cannot list the data folder)")

  images: dict[str, str] = {}
  labels: dict[str, str] = {}
  for folder, f in _walk_files(root):
    path = os.path.join(folder, f)
    parent = os.path.basename(folder)
    if m := _LITS_IMAGE.match(f):
      _add(images, f"volume-{int(m.group(1))}", path, "image")
    elif m := _LITS_LABEL.match(f):
      _add(labels, f"volume-{int(m.group(1))}", path, "label")
    elif parent == "imagesTr" and (m := _DECATHLON.match(f)):
      name, channel = m.group(1), m.group(2)
      if channel not in (None, "_0000"):
        raise UserError(f"{path}: only single-channel CT is supported, found channel "
                        f"{channel[1:]} (expected NAME.nii.gz or NAME_0000.nii.gz)")
      _add(images, name, path, "image")
    elif parent == "labelsTr" and (m := _DECATHLON.match(f)) and m.group(2) is None:
      _add(labels, m.group(1), path, "label")

  if not images and not labels:
    raise UserError(f"{root}: no CT volumes found; expected volume-N.nii[.gz] with "
                    "segmentation-N.nii[.gz], or imagesTr/ and labelsTr/ folders")
  for name in sorted(set(labels) - set(images), key=natural_key):
    raise UserError(f"{labels[name]}: label file has no matching image "
                    f"(expected {_expected_image(name, labels[name])})")
  cases = []
  for name in sorted(images, key=natural_key):
    label = labels.get(name)
    if label is None and require_labels:
      raise UserError(f"{images[name]}: image has no label file "
                      f"(expected {_expected_label(name, images[name])})")
    cases.append(Case(name=name, image=images[name], label=label))
  return cases


def _expected_label(name: str, image: str) -> str:
  if _LITS_IMAGE.match(os.path.basename(image)):
    return f"segmentation-{name.split('-', 1)[1]}.nii.gz anywhere under the data root"
  return os.path.join(os.path.dirname(os.path.dirname(image)), "labelsTr", f"{name}.nii.gz")


def _expected_image(name: str, label: str) -> str:
  if _LITS_LABEL.match(os.path.basename(label)):
    return f"{name}.nii.gz anywhere under the data root"
  return os.path.join(os.path.dirname(os.path.dirname(label)), "imagesTr", f"{name}.nii.gz")


# Single files: what counts as NIfTI, and the case a CT file belongs to.
NIFTI_SUFFIXES = (".nii.gz", ".nii")


def case_name(path: str) -> str:
  """The case name of a CT file: its name without .nii[.gz] and a Decathlon `_0000` suffix."""
  name = os.path.basename(path)
  for suffix in NIFTI_SUFFIXES:
    if name.endswith(suffix):
      name = name[:-len(suffix)]
      break
  return re.sub(r"_0000$", "", name)


def is_nifti(name: str) -> bool:
  return name.endswith(NIFTI_SUFFIXES) and not os.path.basename(name).startswith(".")


def list_nifti(folder: str) -> list[str]:
  """The NIfTI files directly in `folder` (hidden files skipped), sorted by name."""
  try:
    names = os.listdir(folder)
  except OSError as e:
    raise UserError(f"{folder}: cannot list folder ({e.strerror or e})") from e
  return [os.path.join(folder, n) for n in sorted(names, key=natural_key)
          if is_nifti(n) and os.path.isfile(os.path.join(folder, n))]
