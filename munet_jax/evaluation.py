"""Scoring label volumes the way the paper reports them, and the results file.

Liver is labels 1 and 2 together, tumour is label 2 (PAPER.md, section II.F). Each case
gets `segmentation_metrics` for both; the summary is mean ± std over cases, leaving
out non-finite values (an empty reference, say), as SPEC.md asks.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from typing import Sequence

import numpy as np

from munet_jax.metrics import lesion_detection, segmentation_metrics

TARGETS = {"liver": lambda labels: labels > 0, "tumor": lambda labels: labels == 2}
METRICS = ("dsc", "voe", "rvd", "assd", "mssd", "rmsd")


def score_case(name: str, pred: np.ndarray, ref: np.ndarray, spacing: Sequence[float],
               small_lesion_mm: float = 28.0) -> dict:
  """One entry of results.json's "cases", plus the counts the pooled figures need."""
  entry = {"case": name, "spacing": [float(s) for s in spacing]}
  pooled = {}
  for target, select in TARGETS.items():
    p, r = select(pred), select(ref)
    entry[target] = segmentation_metrics(p, r, spacing)
    pooled[target] = (int(np.count_nonzero(p & r)), int(np.count_nonzero(p)),
                      int(np.count_nonzero(r)))
  entry["lesions"] = lesion_detection(pred == 2, ref == 2, spacing,
                                      small_area_mm2=small_lesion_mm ** 2)
  entry["_pooled"] = pooled
  return entry


def _stats(values: list) -> dict:
  finite = [v for v in values if v is not None and math.isfinite(v)]
  if not finite:
    return {"mean": None, "std": None, "n": 0}
  return {"mean": float(np.mean(finite)), "std": float(np.std(finite)), "n": len(finite)}


def summarize(cases: list[dict]) -> dict:
  """{"liver": {metric: {mean, std, n}}, "tumor": {...}} over the cases' finite values."""
  return {target: {m: _stats([c[target][m] for c in cases]) for m in METRICS}
          for target in TARGETS}


def global_dice(cases: list[dict]) -> dict:
  """LiTS's global Dice: all volumes pooled into one, 2|A∩B| / (|A| + |B|)."""
  out = {}
  for target in TARGETS:
    inter = sum(c["_pooled"][target][0] for c in cases)
    total = sum(c["_pooled"][target][1] + c["_pooled"][target][2] for c in cases)
    out[target] = 1.0 if total == 0 else 2.0 * inter / total
  return out


def lesion_summary(cases: list[dict]) -> dict:
  """Detection recall / precision per lesion size class, pooled over cases."""
  out = {}
  for size in ("small", "large", "all"):
    hit = sum(c["lesions"][size]["ref_detected"] for c in cases)
    n_ref = sum(c["lesions"][size]["ref_count"] for c in cases)
    correct = sum(c["lesions"][size]["pred_correct"] for c in cases)
    n_pred = sum(c["lesions"][size]["pred_count"] for c in cases)
    out[size] = {"reference_lesions": n_ref, "predicted_lesions": n_pred,
                 "recall": hit / n_ref if n_ref else None,
                 "precision": correct / n_pred if n_pred else None}
  return out


def _json_value(v):
  if isinstance(v, float) and not math.isfinite(v):
    return None
  if isinstance(v, dict):
    return {k: _json_value(x) for k, x in v.items()}
  if isinstance(v, (list, tuple)):
    return [_json_value(x) for x in v]
  return v


def results(cases: list[dict]) -> dict:
  """The results.json document of SPEC.md (plus global Dice and lesion detection)."""
  public = [{k: v for k, v in c.items() if not k.startswith("_")} for c in cases]
  return _json_value({"cases": public, "summary": summarize(cases),
                      "global_dice": global_dice(cases), "lesion_detection": lesion_summary(cases)})


def write_json(path: str, document: dict) -> None:
  """Writes JSON atomically: a temporary file in the same folder, then a rename."""
  folder = os.path.dirname(os.path.abspath(path))
  os.makedirs(folder, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=".json")
  try:
    with os.fdopen(fd, "w") as f:
      json.dump(document, f, indent=1, allow_nan=False)
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


def format_table(document: dict) -> str:
  """The paper's table: mean ± std, DSC / VOE / RVD in %, ASSD / MSSD in mm."""
  summary = document["summary"]
  head = f"{'':8s}{'DSC %':>16s}{'VOE %':>16s}{'RVD %':>16s}{'ASSD mm':>16s}{'MSSD mm':>16s}{'n':>4s}"
  lines = [head, "-" * len(head)]
  for target, title in (("liver", "liver"), ("tumor", "tumour")):
    cells = []
    for metric, scale in (("dsc", 100), ("voe", 100), ("rvd", 100), ("assd", 1), ("mssd", 1)):
      s = summary[target][metric]
      cells.append(f"{'-':>16s}" if s["mean"] is None else
                   f"{s['mean'] * scale:>8.2f} ± {s['std'] * scale:<5.2f}")
    n = summary[target]["dsc"]["n"]
    lines.append(f"{title:8s}" + "".join(cells) + f"{n:>4d}")
  g = document.get("global_dice")
  if g:
    lines.append(f"global Dice: liver {100 * g['liver']:.2f} %, tumour {100 * g['tumor']:.2f} %")
  return "\n".join(lines)
