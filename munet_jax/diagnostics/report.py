"""`diagnose`: the permeation study of a training run, as `munet-diagnose` runs it."""

from __future__ import annotations

import os

from munet_jax.checkpoints import load_variables
from munet_jax.data.splits import cases_of_split
from munet_jax.data.volumes import load_case
from munet_jax.diagnostics.objects import summarize_rates, volume_object_rates
from munet_jax.diagnostics.permeation import MIN_BEFORE, SENTINEL
from munet_jax.diagnostics.plots import plot_permeation, plot_skip_features
from munet_jax.errors import UserError
from munet_jax.preprocessing import intensity_shift
from munet_jax.atomic import write_json


def _load_run(workdir: str, which: str, flag: str):
  if not os.path.isdir(workdir):
    raise UserError(f"{workdir}: {flag} not found")
  return load_variables(workdir, which)


def _slice_score(slice_info, records) -> tuple:
  objs = [records[i] for i in slice_info["objects"]]
  small_t = [o for o in objs if o["kind"] == "tumour" and o["small"]]
  large_t = [o for o in objs if o["kind"] == "tumour" and not o["small"]]
  large = [o for o in objs if not o["small"]]
  tumour_area = sum(o["pixels"] for o in objs if o["kind"] == "tumour")
  return (bool(small_t) and bool(large_t), bool(small_t) and bool(large), bool(small_t),
          tumour_area)


def diagnose(workdir: str, data: str | None = None, split: str = "val", out: str | None = None,
             which: str = "latest", compare_workdir: str | None = None, max_slices: int = 40,
             pooling: str = "area", small_lesion_mm: float | None = None,
             batch_size: int = 8) -> tuple[dict, list[str]]:
  """Rates for every object of a run's split, the two pictures and the JSON of the numbers.

  Args:
    workdir: the training run; `which` of its checkpoints ('latest' or 'best').
    data: the data root; the run's `data.root` when None.
    split: 'train', 'val' or 'test' of the run's config, or 'all' cases.
    out: the output folder; `workdir/diagnostics` when None.
    compare_workdir: a second run (the U-Net, say), measured on the same objects.
    max_slices: slices per volume at most, tumour slices first.
    pooling: how object masks reach each stage ('area' or 'max').
    small_lesion_mm: objects below this squared in a slice are small; the run's
      `eval.small_lesion_mm` when None.
    batch_size: slices per forward pass.

  Returns:
    (the document written to OUT/permeation.json, the files written).
  """
  config, variables, step = _load_run(workdir, which, "--workdir")
  compare = None
  if compare_workdir:
    compare = _load_run(compare_workdir, which, "--compare-workdir")
  root = data or config.data.root
  if not os.path.isdir(root):
    raise UserError(f"{root}: data folder not found (give --data)")
  config.data.root = root
  small_mm = small_lesion_mm or float(config.eval.small_lesion_mm)
  chosen = cases_of_split(config, split)
  out = out or os.path.join(workdir, "diagnostics")
  stages = len(config.model.features) - 1
  if stages < 1:
    raise UserError(f"{workdir}: the model has one stage and no skip connection")
  runs = [("run", variables, config)]
  if compare is not None:
    runs.append(("compare", compare[1], compare[0]))
    if len(compare[0].model.features) - 1 != stages:
      raise UserError(f"{compare_workdir}: {len(compare[0].model.features)} stages, "
                      f"the --workdir run has {stages + 1}")

  records, best = _measure(runs, chosen, small_mm ** 2, max_slices, pooling, batch_size)
  if not records["run"]:
    raise UserError(f"{root}: no liver or tumour in the '{split}' split's labels, so "
                    "no object to measure")
  document = _document(records, runs, stages, step, compare_workdir, source={
      "workdir": os.path.abspath(workdir), "checkpoint_step": int(step), "which": which,
      "data": os.path.abspath(root), "split": split, "cases": [c.name for c in chosen],
      "max_slices": max_slices}, definition={
      "pooling": pooling, "sentinel": SENTINEL, "min_before": MIN_BEFORE,
      "small_area_mm2": small_mm ** 2, "normalisation": "min-max per channel per image",
      "rate": "masked mean of normalised r_s / masked mean of normalised x_s"})
  json_path = os.path.join(out, "permeation.json")
  write_json(json_path, document)
  pictures = _pictures(out, document, records, runs, best, stages, split, small_mm, pooling)
  return document, [json_path, *pictures]


def _measure(runs, cases, small_area: float, max_slices: int, pooling: str, batch_size: int):
  """Every object's rates per run, and the slice to picture: (records per run, best)."""
  records = {name: [] for name, _, _ in runs}
  best = None
  for case in cases:
    if case.label is None:
      continue
    volume = load_case(case)
    hu, ref, spacing = volume.hu, volume.labels, volume.spacing
    shifts = [intensity_shift(hu, c) for _, _, c in runs]   # each run's, for the picture
    for name, v, c in runs:
      recs, slices = volume_object_rates(v, c, hu, ref, spacing, small_area_mm2=small_area,
                                         max_slices=max_slices, pooling=pooling,
                                         batch_size=batch_size)
      for r in recs:
        r["case"] = case.name
      if name == "run":
        for sl in slices:
          score = _slice_score(sl, recs)
          if best is None or score > best[0]:
            best = (score, case.name, sl["slice"], hu[:, :, sl["slice"]].copy(),
                    ref[:, :, sl["slice"]].copy(), [recs[i] for i in sl["objects"]],
                    shifts)
      records[name].extend(recs)
  return records, best


def _document(records, runs, stages, step, compare_workdir, source, definition) -> dict:
  """The permeation.json document: what was measured, how, and every object's rates."""
  config = runs[0][2]
  document = {
      "source": source, "definition": definition, "stages": list(range(1, stages + 1)),
      "model": {"odu_residual": bool(config.model.odu_residual),
                "skip_conv": bool(config.model.skip_conv),
                "features": list(config.model.features)},
      "summary": summarize_rates(records["run"], stages),
      "objects": records["run"],
  }
  if len(runs) > 1:
    other = runs[1][2]
    document["compare"] = {
        "workdir": os.path.abspath(compare_workdir),
        "model": {"odu_residual": bool(other.model.odu_residual),
                  "skip_conv": bool(other.model.skip_conv)},
        "summary": summarize_rates(records["compare"], stages),
        "objects": records["compare"]}
  return document


def _pictures(out, document, records, runs, best, stages, split, small_mm, pooling) -> list[str]:
  """permeation.png (Fig. 2) and skip_features.png (Fig. 3); their paths."""
  config = runs[0][2]
  compared = len(runs) > 1
  series, dots = {}, {}
  for name, recs in records.items():
    summary = document["summary"] if name == "run" else document["compare"]["summary"]
    for group in ("small", "large"):
      label = group if not compared else (
          f"{group}, {_model_name(config)}" if name == "run"
          else f"{group}, {_model_name(runs[1][2])} (compare)")
      series[label] = summary[group]
      dots[label] = [r["rates"] for r in recs if r["small"] == (group == "small")]
  rates_png = os.path.join(out, "permeation.png")
  plot_permeation(rates_png, series, stages,
                  f"permeation rate, {_model_name(config)}, '{split}' split "
                  f"(small: < {small_mm:g} x {small_mm:g} mm²)", dots)

  _, case_name, z, hu_slice, ref_slice, objs, shifts = best
  rate_lines = []
  for kind, small in (("tumour", True), ("tumour", False), ("liver", False)):
    picked = [o for o in objs if o["kind"] == kind and o["small"] == small]
    if picked:
      o = max(picked, key=lambda o: o["pixels"]) if not small else min(picked,
                                                                     key=lambda o: o["pixels"])
      rate_lines.append((("small" if small else "large") + (" tum." if kind == "tumour"
                                                            else " liver"), o["rates"]))
  named = [(_model_name(c) + (" (compare)" if name == "compare" else ""), v, c)
           for name, v, c in runs]
  features_png = os.path.join(out, "skip_features.png")
  plot_skip_features(features_png, hu_slice, ref_slice, named,
                     f"{case_name}, axial slice {z}: skip features (channel mean of "
                     f"normalised maps)", rate_lines[:2], pooling, shifts)
  return [rates_png, features_png]


def _model_name(config) -> str:
  m = config.model
  if m.odu_residual and m.skip_conv:
    return "mU-Net"
  if m.odu_residual:
    return "U-Net + ODU residual"
  if m.skip_conv:
    return "U-Net + skip conv"
  return "U-Net"
