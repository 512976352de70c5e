"""Scoring label volumes the way the paper reports them, and the results file.

Liver is labels 1 and 2 together, tumour is label 2 (`munet_jax.labels`). Each case gets
`segmentation_metrics` for both; the summary is mean ± std (population std, ddof=0) over
cases, leaving out non-finite values (an empty reference, say). Besides "cases" and
"summary", the document holds:
  - "global_dice": LiTS's global Dice, all volumes pooled into one, per target;
  - "lesion_detection": tumour detection by lesion size (`munet_jax.lesions`), pooled
    over cases, and per case "lesions" with the counts it is pooled from;
  - per case "voxels": |A∩B|, |B|, |A| per target (what global Dice is pooled from);
  - per case and target also "rmsd", "hd95" (mm) and "nsd" (a fraction, at
    `eval.nsd_tolerance_mm`), and the summary of each;
  - "source": what was scored (see `evaluate`; for label files, the two folders).

Volumes are scored in the library's RAS (X, Y, Z) order with spacing in the same order
(`munet_jax.data.volumes`); the metrics do not depend on the axis order, and lesion
sizes need the axial axis.

`evaluate` scores a model on a volume source: the trainer calls it on the slice store,
`evaluate_run` (`eval.py --workdir`) on NIfTI files. `evaluate_folders` (`eval.py
--pred --ref`) scores label files, no model.
"""

from __future__ import annotations

import math
import os
import sys
from typing import Callable, Sequence

import numpy as np

from tqdm import tqdm

from munet_jax.atomic import write_json
from munet_jax.data import nifti
from munet_jax.data.discovery import Case, case_name, is_nifti, list_nifti
from munet_jax.data.splits import cases_of_split
from munet_jax.data.volumes import load_case, prefetch
from munet_jax.errors import UserError, WriteError
from munet_jax.inference import VolumeSegmenter, load_runs
from munet_jax.labels import TARGETS, tumour_mask
from munet_jax.lesions import SIZE_CLASSES, lesion_detection
from munet_jax.metrics import DEFAULT_NSD_TOLERANCE, METRIC_NAMES, segmentation_metrics
from munet_jax.overlays import write_case_overlays
from munet_jax.postprocessing import load_choice

TABLE_METRICS = ("dsc", "voe", "rvd", "assd", "mssd")   # the paper's table, by default
# Each metric's column: scale (fractions in %, distances in mm) and header.
_COLUMNS = {"dsc": (100, "DSC %"), "voe": (100, "VOE %"), "rvd": (100, "RVD %"),
            "assd": (1, "ASSD mm"), "mssd": (1, "MSSD mm"), "rmsd": (1, "RMSD mm"),
            "hd95": (1, "HD95 mm"), "nsd": (100, "NSD %")}


def table_metrics(text: str) -> tuple[str, ...]:
  """The metrics of a comma-separated list such as 'dsc,assd,hd95,nsd', checked."""
  names = tuple(name.strip().lower() for name in text.split(",") if name.strip())
  unknown = [name for name in names if name not in _COLUMNS]
  if unknown or not names:
    raise UserError(f"unknown metric(s) {', '.join(unknown) or repr(text)}; choose from "
                    f"{','.join(METRIC_NAMES)}")
  return names


def score_case(name: str, pred: np.ndarray, ref: np.ndarray, spacing: Sequence[float],
               small_lesion_mm: float = 28.0,
               nsd_tolerance_mm: float = DEFAULT_NSD_TOLERANCE) -> dict:
  """One entry of results.json's "cases".

  Args:
    name: the case name.
    pred, ref: (X, Y, Z) labels 0/1/2 of one shape, axial slices along the last axis.
    spacing: (3,) voxel size in mm, in the arrays' axis order.
    small_lesion_mm: lesions whose largest axial cross-section is below this squared
      (mm^2) are small.
    nsd_tolerance_mm: the tolerance of the normalised surface Dice ("nsd"), in mm.
  """
  pred, ref = np.asarray(pred), np.asarray(ref)
  if pred.shape != ref.shape:
    raise ValueError(f"{name}: prediction shape {pred.shape} differs from reference {ref.shape}")
  entry = {"case": name, "spacing": [float(s) for s in spacing]}
  voxels = {}
  for target, select in TARGETS.items():
    p, r = select(pred), select(ref)
    scores = segmentation_metrics(p, r, spacing, nsd_tolerance=nsd_tolerance_mm)
    entry[target] = {k: float(v) for k, v in scores.items()}
    voxels[target] = {"both": int(np.count_nonzero(p & r)), "pred": int(np.count_nonzero(p)),
                      "ref": int(np.count_nonzero(r))}
  entry["voxels"] = voxels
  entry["lesions"] = lesion_detection(tumour_mask(pred), tumour_mask(ref), spacing,
                                      small_area_mm2=float(small_lesion_mm) ** 2)
  return entry


def _stats(values: list) -> dict:
  finite = [v for v in values if v is not None and math.isfinite(v)]
  if not finite:
    return {"mean": None, "std": None, "n": 0}
  return {"mean": float(np.mean(finite)), "std": float(np.std(finite)), "n": len(finite)}


def summarize(cases: list[dict]) -> dict:
  """{"liver": {metric: {mean, std, n}}, "tumor": {...}} over the cases' finite values."""
  return {target: {m: _stats([c[target][m] for c in cases]) for m in METRIC_NAMES}
          for target in TARGETS}


def global_dice(cases: list[dict]) -> dict:
  """LiTS's global Dice per target: all volumes pooled into one, 2|A∩B| / (|A| + |B|).

  1.0 when no volume has the target in either the reference or the prediction (the metrics'
  both-empty convention).
  """
  out = {}
  for target in TARGETS:
    both = sum(c["voxels"][target]["both"] for c in cases)
    total = sum(c["voxels"][target]["pred"] + c["voxels"][target]["ref"] for c in cases)
    out[target] = 1.0 if total == 0 else 2.0 * both / total
  return out


def lesion_summary(cases: list[dict]) -> dict:
  """Tumour detection per lesion size class, pooled over cases (see `munet_jax.lesions`).

  recall = detected / reference lesions, precision = correct / predicted lesions, and
  dice = 2 Σ|A_c∩B_c| / Σ(|A_c| + |B_c|) over cases; None where the denominator is 0.
  """
  out = {}
  if cases:
    out["small_area_mm2"] = cases[0]["lesions"]["small_area_mm2"]
    out["connectivity"] = cases[0]["lesions"]["connectivity"]
  for size in SIZE_CLASSES:
    total = lambda key: sum(c["lesions"][size][key] for c in cases)
    n_ref, n_pred = total("ref_count"), total("pred_count")
    voxels = total("ref_voxels") + total("pred_voxels")
    out[size] = {"reference_lesions": n_ref, "predicted_lesions": n_pred,
                 "detected": total("ref_detected"), "correct": total("pred_correct"),
                 "recall": total("ref_detected") / n_ref if n_ref else None,
                 "precision": total("pred_correct") / n_pred if n_pred else None,
                 "dice": 2.0 * total("intersection") / voxels if voxels else None}
  return out


def _json_value(v):
  if isinstance(v, float) and not math.isfinite(v):
    return None
  if isinstance(v, dict):
    return {k: _json_value(x) for k, x in v.items()}
  if isinstance(v, (list, tuple)):
    return [_json_value(x) for x in v]
  if isinstance(v, np.generic):
    return _json_value(v.item())
  return v


def results(cases: list[dict], source: dict | None = None) -> dict:
  """The results.json document (docs/design.md): cases, summary, global Dice, lesions.

  Non-finite values become null (JSON has no inf or NaN); the summary leaves them out.
  """
  document = {"cases": [{k: v for k, v in c.items() if not k.startswith("_")} for c in cases],
              "summary": summarize(cases), "global_dice": global_dice(cases),
              "lesion_detection": lesion_summary(cases)}
  if source is not None:
    document["source"] = source
  return _json_value(document)


def _percent(v) -> str:
  return "-" if v is None else f"{100 * v:.2f}"


def format_table(document: dict, metrics: Sequence[str] = TABLE_METRICS) -> str:
  """The paper's table (mean ± std; DSC / VOE / RVD in %, ASSD / MSSD in mm), global Dice
  and, when the document has it, the lesion detection table.

  `metrics` picks the table's columns (also "rmsd", "hd95" in mm and "nsd" in %); a
  metric the document's summary lacks (an older results file) shows as "-".
  """
  summary = document["summary"]
  columns = [(m, *_COLUMNS[m]) for m in metrics]
  rows, fewer = [], []
  for target, title in (("liver", "liver"), ("tumor", "tumour")):
    cells = []
    n = summary[target]["dsc"]["n"]   # DSC is finite for every volume
    for metric, scale, header in columns:
      s = summary[target].get(metric, {"mean": None, "n": n})
      cells.append("-" if s["mean"] is None else
                   f"{s['mean'] * scale:.2f} ± {s['std'] * scale:.2f}")
      if s["n"] < n:
        fewer.append(f"{title} {header.split()[0]} over {s['n']} of {n}")
    rows.append((title, cells, n))
  width = max([16] + [len(c) + 2 for _, cells, _ in rows for c in cells])
  head = f"{'':8s}" + "".join(f"{h:>{width}s}" for _, _, h in columns) + f"{'n':>5s}"
  lines = [head, "-" * len(head)]
  for title, cells, n in rows:
    lines.append(f"{title:8s}" + "".join(f"{c:>{width}s}" for c in cells) + f"{n:>5d}")
  if fewer:
    lines.append("infinite or undefined values left out (an empty reference or prediction): "
                 + ", ".join(fewer) + " volumes")
  g = document.get("global_dice")
  if g:
    lines.append(f"global Dice: liver {_percent(g['liver'])} %, tumour {_percent(g['tumor'])} %")
  detection = document.get("lesion_detection")
  if detection and "small_area_mm2" in detection:
    side = math.sqrt(detection["small_area_mm2"])
    lines += ["", f"tumour detection (3-D lesions, {_CONNECTIVITY[detection['connectivity']]} "
              f"connectivity; small: largest axial area < {side:g} x {side:g} mm²)",
              f"{'lesions':8s}{'reference':>10s}{'predicted':>10s}{'recall %':>10s}"
              f"{'precision %':>12s}{'Dice %':>8s}"]
    for size in SIZE_CLASSES:
      d = detection[size]
      lines.append(f"{size:8s}{d['reference_lesions']:>10d}{d['predicted_lesions']:>10d}"
                   f"{_percent(d['recall']):>10s}{_percent(d['precision']):>12s}"
                   f"{_percent(d['dice']):>8s}")
  return "\n".join(lines)


_CONNECTIVITY = {1: "face", 2: "face+edge", 3: "full"}


# ------------------------------------------------------------------------------- eval.py


def _bar(items, desc: str, progress: bool | None):
  return tqdm(items, desc=desc, unit="volume", leave=False,
              disable=None if progress is None else not progress)


# --------------------------------------------------------------- a model on a run's cases
#
# One scorer for the trainer (validation and its final table, volumes from the slice
# store) and for eval.py (volumes from NIfTI files): both hand `score_volumes` a volume
# source, an iterable of (case name, loader); a loader returns the `CaseVolume` or, for a
# case to leave out as bad, the `UserError` that says why.


def store_volumes(slice_store, names: Sequence[str]) -> list[tuple[str, Callable]]:
  """The volume source of the cases `names` of a slice store (int16 HU, as trained on).

  Cases the store left out as bad (`data.skip_bad`) come with their reason.
  """
  skipped = dict(slice_store.skipped)
  stored = set(slice_store.names)

  def loader(name):
    if name in stored:
      return lambda: slice_store.case(name)
    return lambda: UserError(skipped.get(name, f"{name}: not in the slice store"))
  return [(name, loader(name)) for name in names]


def nifti_volumes(cases: Sequence[Case], skip_bad: bool = False) -> list[tuple[str, Callable]]:
  """The volume source of NIfTI cases; with `skip_bad`, a bad case is left out, not fatal."""
  def loader(case):
    def load():
      try:
        return load_case(case)
      except WriteError:
        raise
      except UserError as e:
        if skip_bad:
          return e
        raise
    return load
  return [(case.name, loader(case)) for case in cases]


def score_volumes(segment: Callable[[np.ndarray], np.ndarray], volumes, config,
                  overlays: int = 0, overlay_dir: str | None = None,
                  progress: bool | None = None) -> tuple[list[dict], list[dict]]:
  """Segments and scores every volume of a source (`store_volumes`, `nifti_volumes`).

  Args:
    segment: (X, Y, Z) HU -> (X, Y, Z) labels (a `VolumeSegmenter`).
    volumes: (name, loader) pairs; loaders run one volume ahead, in a thread.
    config: the run's config: `eval.small_lesion_mm`, `eval.nsd_tolerance_mm`, and the HU
      window of the overlays.
    overlays: overlay PNGs per case (0: none), in `overlay_dir`.
    progress: progress bar over volumes; None: only on a terminal.

  Returns:
    (the entries of results.json's "cases", the skipped cases as {"case", "reason"}).
  """
  volumes = list(volumes)
  entries, skipped = [], []
  with _bar(volumes, "evaluate", progress) as bar:
    for (name, _), loaded in zip(bar, prefetch(loader for _, loader in volumes)):
      if isinstance(loaded, UserError):
        skipped.append({"case": name, "reason": str(loaded)})
        bar.write(f"skipped {name}: {loaded}", file=sys.stderr)
        continue
      pred = segment(loaded.hu)
      entries.append(score_case(name, pred, loaded.labels, loaded.spacing,
                                config.eval.small_lesion_mm, config.eval.nsd_tolerance_mm))
      if overlays:
        write_case_overlays(overlay_dir, name, loaded.hu, pred, loaded.labels,
                            loaded.spacing, overlays, config.data.hu_window)
  return entries, skipped


def results_path(workdir: str, split: str) -> str:
  """Where a run's results of `split` go: eval/results.json (test), eval/results-SPLIT.json."""
  return os.path.join(workdir, "eval", "results.json" if split == "test"
                      else f"results-{split}.json")


def evaluate(variables: dict, config, volumes, *, workdir: str, step: int, which: str,
             split: str, out: str | None = None, overlays: int = 0,
             batch_size: int | None = None, progress: bool | None = None,
             skipped: Sequence[tuple[str, str]] = (), allow_empty: bool = False,
             source_extra: dict | None = None,
             postprocessing: dict | None = None) -> tuple[dict, str]:
  """Segments and scores a run's volumes and writes the results document.

  The trainer's final evaluation and `eval.py --workdir` both end here, so the same
  checkpoint on the same cases gives the same document. Its "source" says what was scored:
  workdir, checkpoint_step, which, data (`config.data.root`), split, nsd_tolerance_mm,
  and "skipped" (the cases left out as bad, with the reasons) when there are any: those
  of the source, and `skipped` ((case, reason) pairs: the trainer's other bad cases).
  `source_extra` adds entries (an ensemble's runs). `variables` may be a list (an
  ensemble, `VolumeSegmenter`). `postprocessing` is the clean-up to apply ({step: value},
  a run's chosen one, `munet_jax.postprocessing.load_choice`); the config's values when
  None. The source records it ("postprocessing").

  A split whose every case was left out as bad is a `UserError`, unless `allow_empty`
  (the trainer, which has trained and must still report what it left out).

  Returns:
    (the document, the path it was written to: `out`, else `results_path(workdir, split)`).
  """
  out = out or results_path(workdir, split)
  segmenter = VolumeSegmenter(variables, config, batch_size, postprocessing=postprocessing)
  overlay_dir = os.path.join(os.path.dirname(os.path.abspath(out)), "overlays")
  entries, left_out = score_volumes(segmenter, volumes, config, overlays, overlay_dir, progress)
  for case, reason in skipped:
    if case not in {s["case"] for s in left_out}:
      left_out.append({"case": case, "reason": reason})
  if not entries and not allow_empty:
    raise UserError(f"{config.data.root}: every case of the '{split}' split was skipped as bad")
  source = {"workdir": os.path.abspath(workdir), "checkpoint_step": int(step), "which": which,
            "data": os.path.abspath(config.data.root), "split": split,
            "nsd_tolerance_mm": float(config.eval.nsd_tolerance_mm),
            "postprocessing": dict(segmenter.postprocessing)}
  source.update(source_extra or {})
  if left_out:
    source["skipped"] = left_out
  document = results(entries, source)
  write_json(out, document)
  return document, out


def evaluate_run(workdir: str | Sequence[str], data: str | None = None, split: str = "test",
                 which: str = "latest", out: str | None = None, overlays: int = 0,
                 batch_size: int | None = None, small_lesion_mm: float | None = None,
                 nsd_tolerance_mm: float | None = None,
                 progress: bool | None = None, tta: bool = False) -> tuple[dict, str]:
  """`eval.py --workdir`: a training run's checkpoint on the NIfTI cases of one split.

  Args:
    workdir: the training run (its checkpoints and config), or a list of runs: an
      ensemble (the mean of their softmax; `inference.load_runs`), scored on the split
      of the first run's config, which must hold the same cases under every run's config
      (folds of one cross-validation agree on 'test', not on 'val').
    data: the data root; the run's `data.root` when None.
    split: 'train', 'val' or 'test' by the run's config (`data.split`), or 'all' cases.
    which: 'latest' or 'best' checkpoint.
    out: the results file; `results_path(workdir, split)` when None (required for an
      ensemble, whose results belong to no single run).
    overlays: overlay PNGs per case (0: none), in `overlays/` next to `out`.
    batch_size: slices per batch; the run's `eval.batch_size` when None.
    small_lesion_mm: the small-lesion bound; the run's `eval.small_lesion_mm` when None.
    nsd_tolerance_mm: the NSD tolerance; the run's `eval.nsd_tolerance_mm` when None.
    progress: progress bar over volumes; None: only on a terminal.
    tta: mean softmax over in-plane mirrorings (`eval.tta`).

  Returns:
    (the results document, the path it was written to). An ensemble's "source" holds
    "ensemble": [{"workdir", "checkpoint_step"}, ...].
  """
  ensemble = not isinstance(workdir, (str, os.PathLike))
  if ensemble and out is None:
    raise UserError(f"{workdir[0]}: an ensemble of {len(workdir)} runs needs --out F.json "
                    "(its results belong to no single run)")
  configs, variables, steps = load_runs(workdir if ensemble else os.fspath(workdir), which)
  config = configs[0]
  if data is not None:
    config.data.root = data   # the split's messages name the folder actually used
  if small_lesion_mm is not None:
    config.eval.small_lesion_mm = float(small_lesion_mm)
  if nsd_tolerance_mm is not None:
    config.eval.nsd_tolerance_mm = float(nsd_tolerance_mm)
  if tta:
    config.eval.tta = True
  cases = cases_of_split(config, split)
  extra = {"tta": True} if config.eval.tta else {}
  if ensemble:
    names = [c.name for c in cases]
    for other, other_config in zip(workdir[1:], configs[1:]):
      other_config.data.root = config.data.root
      if [c.name for c in cases_of_split(other_config, split)] != names:
        raise UserError(f"{other}: its '{split}' split holds other cases than that of "
                        f"{workdir[0]}; an ensemble is scored on a split all its runs share")
    extra["ensemble"] = [{"workdir": os.path.abspath(w), "checkpoint_step": int(s)}
                         for w, s in zip(workdir, steps)]
  # One run: the post-processing chosen on its validation split, if it chose one.
  chosen = None if ensemble else load_choice(workdir)
  if ensemble:
    workdir = workdir[0]
  return evaluate(variables, config, nifti_volumes(cases, config.data.skip_bad),
                  workdir=workdir, step=steps[0], which=which, split=split, out=out,
                  overlays=overlays, batch_size=batch_size, progress=progress,
                  source_extra=extra, postprocessing=chosen)


# ------------------------------------------------------------------ label files, no model


def _label_key(path: str) -> str:
  """The name a label file is matched by: no .nii[.gz]; LiTS 'segmentation-N' is 'volume-N'."""
  name = case_name(path)
  return "volume-" + name[len("segmentation-"):] if name.startswith("segmentation-") else name


def label_pairs(pred: str, ref: str) -> list[tuple[str, str, str]]:
  """(case, predicted file, reference file) for eval.py --pred P --ref R.

  P and R are folders (every NIfTI file directly in P is scored against the file of the
  same name in R) or two files. Names are compared without .nii / .nii.gz, so a .nii.gz
  prediction matches a .nii reference, and LiTS's volume-N matches segmentation-N.
  Reference files without a prediction are left out, with a note on stderr.
  """
  for path, flag in ((pred, "--pred"), (ref, "--ref")):
    if not os.path.exists(path):
      raise UserError(f"{path}: {flag} not found")
  if os.path.isfile(pred) or os.path.isfile(ref):
    if not (os.path.isfile(pred) and os.path.isfile(ref)):
      raise UserError(f"{pred if os.path.isfile(pred) else ref}: --pred and --ref must be "
                      "two files or two folders")
    for path, flag in ((pred, "--pred"), (ref, "--ref")):
      if not is_nifti(path):
        raise UserError(f"{path}: {flag} must be a .nii or .nii.gz file or a folder")
    return [(_label_key(pred), pred, ref)]
  preds = list_nifti(pred)
  if not preds:
    raise UserError(f"{pred}: no NIfTI files (*.nii, *.nii.gz) in the --pred folder")
  refs: dict[str, str] = {}
  for path in list_nifti(ref):
    key = _label_key(path)
    if key in refs:
      raise UserError(f"{path}: two reference files for case '{key}', also {refs[key]}")
    refs[key] = path
  pairs, seen = [], {}
  for path in preds:
    key = _label_key(path)
    if key in seen:
      raise UserError(f"{path}: two predictions for case '{key}', also {seen[key]}")
    seen[key] = path
    if key not in refs:
      raise UserError(f"{path}: no reference file of the same name in {ref}")
    pairs.append((key, path, refs[key]))
  unmatched = len(refs) - len(pairs)
  if unmatched:
    print(f"note: {unmatched} reference file(s) in {ref} have no prediction and are not "
          "scored", file=sys.stderr)
  return pairs


def _ct_for(images: str, case: str) -> str | None:
  for path in list_nifti(images):
    name = case_name(path)
    if name == case or _label_key(path) == case:
      return path
  return None


def _check_same_grid(volume, reference, what: str = "prediction") -> None:
  """`volume` (a prediction or a CT) must lie on `reference`'s voxel grid."""
  if volume.data.shape != reference.data.shape:
    raise UserError(f"{volume.path}: {what} shape {volume.data.shape} differs "
                    f"from reference shape {reference.data.shape} of {reference.path}")
  if not np.allclose(volume.affine, reference.affine, rtol=0, atol=nifti.AFFINE_TOLERANCE):
    worst = float(np.abs(volume.affine - reference.affine).max())
    raise UserError(f"{volume.path}: {what} affine differs from the affine of "
                    f"reference {reference.path} (largest difference {worst:.4g} mm); "
                    "they are not on the same voxel grid")


def evaluate_folders(pred: str, ref: str, out: str, small_lesion_mm: float = 28.0,
                     nsd_tolerance_mm: float = DEFAULT_NSD_TOLERANCE,
                     overlays: int = 0, images: str | None = None,
                     window: Sequence[float] = (-250.0, 250.0),
                     progress: bool | None = None) -> dict:
  """Scores NIfTI label files against references of the same name (no model involved).

  Args:
    pred, ref: folders of label files (0/1/2), or two files (see `label_pairs`).
    out: the results .json file, written atomically.
    small_lesion_mm: the small-lesion bound (its square, mm^2, is the area bound).
    nsd_tolerance_mm: the tolerance of the normalised surface Dice, in mm.
    overlays: overlay PNGs per case (0: none), in `overlays/` next to `out`.
    images: a folder of the CT volumes, for the overlays' background (optional).
    window: HU window of the overlays.
    progress: progress bar over volumes; None: only on a terminal.

  Each prediction must lie on its reference's grid (shape, and affine within
  `nifti.AFFINE_TOLERANCE` mm).
  """
  pairs = label_pairs(pred, ref)
  if images is not None and not os.path.isdir(images):
    raise UserError(f"{images}: --images folder not found")
  overlay_dir = os.path.join(os.path.dirname(os.path.abspath(out)), "overlays")

  def read(pair):
    def load_pair():
      case, pred_path, ref_path = pair
      reference = nifti.read_label(ref_path)
      predicted = nifti.read_label(pred_path)
      _check_same_grid(predicted, reference)
      hu = None
      if overlays and images is not None:
        ct = _ct_for(images, case)
        if ct is None:
          raise UserError(f"{images}: no CT file for case '{case}' (needed for --overlays)")
        image = nifti.read_image(ct)
        _check_same_grid(image, reference, "CT")
        hu = nifti.to_ras(image.data, image.affine)
      affine = reference.affine
      return (nifti.to_ras(predicted.data, affine), nifti.to_ras(reference.data, affine),
              nifti.ras_spacing(affine), hu)
    return load_pair

  entries = []
  with _bar(pairs, "evaluate", progress) as bar:
    for (case, _, _), (p, r, spacing, hu) in zip(bar, prefetch(read(x) for x in pairs)):
      entries.append(score_case(case, p, r, spacing, small_lesion_mm, nsd_tolerance_mm))
      if overlays:
        write_case_overlays(overlay_dir, case, hu, p, r, spacing, overlays, window)
  source = {"pred": os.path.abspath(pred), "ref": os.path.abspath(ref),
            "nsd_tolerance_mm": float(nsd_tolerance_mm)}
  document = results(entries, source)
  write_json(out, document)
  return document
