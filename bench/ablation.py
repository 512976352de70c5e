"""The mU-Net ablation: U-Net, U-Net + ODU residual path, mU-Net; same data, budget and seeds.

  python bench/ablation.py [--config configs/synthetic_tumours.py] [--seeds N] [--steps N]
                           [--out DIR] [--variants unet,odu,munet] [--set KEY=VALUE ...]

Does the object-dependent up-sampling keep small tumours alive (the paper's claim)? Three
networks differ only in the skip connections (`model.odu_residual`, `model.skip_conv`):
  unet   odu_residual=False, skip_conv=False   the conventional U-Net (Fig. 1a)
  odu    odu_residual=True,  skip_conv=False   U-Net with only the ODU residual path
  munet  odu_residual=True,  skip_conv=True    mU-Net (Fig. 1b-d)
Each is trained through the real trainer (`train_and_evaluate`) for every seed with the
recipe of one config file (default configs/synthetic_tumours.py, the tumour benchmark;
its docstring lists its departures from the paper): the same synthetic CT set (made once
with the data seed 2024, whatever the training seed), the same training and held-out
cases (the first `data.num_train` and the next `data.num_test`), steps, batch and
learning-rate schedule. `--set KEY=VALUE` overrides config keys (`train.steps=300`). The
seed sets the initialisation and the slice order; with one seed the layers all three
networks share start from the same weights (Flax derives them from the module path), so
the comparisons are paired by seed.

Held-out volumes are scored as eval.py scores them (`munet_jax.evaluation`): liver and
tumour DSC and ASSD per volume, tumour detection per lesion size class (`munet_jax.lesions`:
small = largest axial cross-section below eval.small_lesion_mm squared, 28 x 28 mm²).
Permeation rates (`munet_jax.diagnostics`) per stage for small and large objects come from
the first 12 of the same held-out volumes. Effect sizes are the per-seed paired differences to the U-Net,
with 95% confidence intervals from the t distribution and from a paired bootstrap over
seeds.

Writes OUT/ablation.json (every run's numbers), OUT/ablation.md (the table) and
OUT/permeation.png; runs live in OUT/runs/VARIANT/seedK and a finished run is reused
when the script is run again with the same config (delete OUT to start over).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402

VARIANTS = {"unet": ("U-Net", False, False), "odu": ("U-Net + ODU", True, False),
            "munet": ("mU-Net", True, True)}
DEFAULT_CONFIG = os.path.join(ROOT, "configs", "synthetic_tumours.py")
DEFAULT_SEEDS = 5
DATA_SEED = 2024
BOOTSTRAP = 10_000
PERMEATION_VOLUMES = 12   # permeation rates on the first 12 held-out volumes (time)


def load_recipe(path: str, overrides=()):
  """The config file with `--set` overrides applied: the recipe every run shares."""
  from munet_jax.config import apply_overrides, load_config_file
  config = load_config_file(path)
  return apply_overrides(config, list(overrides)) if overrides else config


def make_config(recipe, variant: str, seed: int, data_root: str, cache_dir: str,
                cases: list[str]):
  """The run's config: the recipe, this variant's skip switches, this seed, fixed cases."""
  from munet_jax.config import config_from_dict
  _, odu, skip_conv = VARIANTS[variant]
  values = recipe.to_dict()
  c = config_from_dict(json.loads(json.dumps(values)))
  c.seed = seed
  c.data.root = data_root
  c.data.cache_dir = cache_dir
  c.data.split = "custom"
  n_train, n_val, n_test = c.data.num_train, c.data.num_val, c.data.num_test
  c.data.train_cases = tuple(cases[:n_train])
  c.data.val_cases = tuple(cases[n_train:n_train + n_val])
  c.data.test_cases = tuple(cases[n_train + n_val:n_train + n_val + n_test])
  c.data.synthetic.cases = 0          # made by `ensure_data`, with the data seed
  c.model.odu_residual, c.model.skip_conv = odu, skip_conv
  c.train.final_eval_split = "test"
  from munet_jax.config import validate
  return validate(c)


def ensure_data(folder: str, recipe) -> list[str]:
  """The synthetic set of the recipe (made once, re-used when its settings match); case names.

  Made with `munet_jax.data.synthetic.write_dataset` and the data seed, so every seed and
  network sees the same volumes.
  """
  from munet_jax.data import synthetic
  from munet_jax.data.discovery import find_cases
  syn = recipe.data.synthetic
  n = recipe.data.num_train + recipe.data.num_val + recipe.data.num_test
  if syn.cases < n:
    from munet_jax.errors import UserError
    raise UserError(f"data.synthetic.cases is {syn.cases} but the split needs {n}")
  want = {"generator": "munet_jax.data.synthetic", "cases": n, "size": syn.size,
          "slices": syn.slices, "seed": DATA_SEED, "crop": syn.crop,
          "tumour_rate": syn.tumour_rate}
  meta = os.path.join(folder, "synthetic.json")
  have = None
  if os.path.exists(meta):
    with open(meta) as f:
      have = json.load(f)
  if have != want:
    print(f"making {n} synthetic CT volumes ({syn.size}x{syn.size}x{syn.slices}, liver "
          f"region {syn.crop or syn.size}, tumour rate {syn.tumour_rate}) in {folder}",
          flush=True)
    synthetic.write_dataset(folder, n, syn.size, seed=DATA_SEED, slices=syn.slices,
                            progress=False, crop=syn.crop, tumour_rate=syn.tumour_rate)
  return [c.name for c in find_cases(folder)]


def run_metrics(document: dict) -> dict:
  """The table's numbers for one run, from its results document."""
  cases = document["cases"]
  with_tumour = [c for c in cases if c["voxels"]["tumor"]["ref"] > 0]
  finite = lambda vs: [v for v in vs if v is not None and math.isfinite(v)]
  mean = lambda vs: float(np.mean(vs)) if vs else None
  det = document["lesion_detection"]
  return {
      "liver_dsc": document["summary"]["liver"]["dsc"]["mean"],
      "liver_assd": document["summary"]["liver"]["assd"]["mean"],
      "tumour_dsc": mean([c["tumor"]["dsc"] for c in with_tumour]),
      "tumour_global_dice": document["global_dice"]["tumor"],
      "tumour_assd": mean(finite([c["tumor"]["assd"] for c in with_tumour])),
      "tumour_assd_n": len(finite([c["tumor"]["assd"] for c in with_tumour])),
      "small_recall": det["small"]["recall"], "small_dice": det["small"]["dice"],
      "small_precision": det["small"]["precision"],
      "large_recall": det["large"]["recall"], "large_dice": det["large"]["dice"],
      "large_precision": det["large"]["precision"],
      "all_recall": det["all"]["recall"], "all_precision": det["all"]["precision"],
      "small_lesions": det["small"]["reference_lesions"],
      "large_lesions": det["large"]["reference_lesions"],
  }


def lesion_hits(document: dict) -> list[tuple[str, int, bool, bool]]:
  """(case, lesion index, small, detected) per reference lesion, for paired comparisons."""
  out = []
  for c in document["cases"]:
    for i, r in enumerate(c["lesions"]["reference"]):
      out.append((c["case"], i, bool(r["small"]), bool(r["detected"])))
  return out


def permeation_of_run(workdir: str, config, small_area_mm2: float, untrained: bool = False) -> dict:
  """Permeation rates of every object in the run's test volumes: summary and raw rates.

  With `untrained`, of the network as the trainer initialised it (the control: what the
  definition gives before any learning, same weights the run started from).
  """
  import jax
  from munet_jax import diagnostics
  from munet_jax.data import nifti
  from munet_jax.data.discovery import find_cases
  from munet_jax.checkpoints import load_variables
  from munet_jax.training.state import create_train_state, variables_of
  if untrained:
    variables = variables_of(create_train_state(config, jax.random.key(config.seed)))
  else:
    _, variables, _ = load_variables(workdir, "latest")
  stages = len(config.model.features) - 1
  cases = {c.name: c for c in find_cases(config.data.root)}
  records = []
  for name in config.data.test_cases[:PERMEATION_VOLUMES]:
    image = nifti.read_image(cases[name].image)
    label = nifti.read_label(cases[name].label, like=image)
    recs, _ = diagnostics.volume_object_rates(
        variables, config, nifti.to_ras(image.data, image.affine),
        nifti.to_ras(label.data, image.affine), nifti.ras_spacing(image.affine),
        small_area_mm2=small_area_mm2, max_slices=10 ** 6,
        batch_size=config.eval.batch_size)
    records.extend({"case": name, **r} for r in recs)
  return {"summary": diagnostics.summarize_rates(records, stages),
          "rates": {g: [r["rates"] for r in records if r["small"] == (g == "small")]
                    for g in ("small", "large")}}


def train_one(out: str, recipe, variant: str, seed: int, data: str,
              cases: list[str]) -> dict:
  """Trains (or re-uses) one run; returns its metrics, lesion hits, permeation and wall time."""
  from munet_jax.atomic import write_json
  from munet_jax.training.loop import train_and_evaluate
  workdir = os.path.join(out, "runs", variant, f"seed{seed}")
  done = os.path.join(workdir, "ablation_run.json")
  config = make_config(recipe, variant, seed, data, os.path.join(out, "cache"), cases)
  steps = int(config.train.steps)
  if os.path.exists(done):
    with open(done) as f:
      previous = json.load(f)
    if previous.get("config") == json.loads(json.dumps(config.to_dict())):
      print(f"{variant} seed {seed}: re-using the finished run in {workdir}", flush=True)
      if "permeation_untrained" not in previous:
        previous["permeation_untrained"] = permeation_of_run(
            workdir, config, float(config.eval.small_lesion_mm) ** 2, untrained=True)
        write_json(done, json.loads(json.dumps(previous, default=list)))
      return previous
  print(f"\n=== {VARIANTS[variant][0]} ({variant}), seed {seed}, {steps} steps -> {workdir}",
        flush=True)
  t0 = time.perf_counter()
  document = train_and_evaluate(config, workdir)
  t_train = time.perf_counter() - t0
  small_area = float(config.eval.small_lesion_mm) ** 2
  permeation = permeation_of_run(workdir, config, small_area)
  untrained = permeation_of_run(workdir, config, small_area, untrained=True)
  t_all = time.perf_counter() - t0
  record = {"variant": variant, "seed": seed, "steps": steps, "config": config.to_dict(),
            "metrics": run_metrics(document), "lesions": lesion_hits(document),
            "permeation": permeation, "permeation_untrained": untrained,
            "wall_s": {"train_and_test": t_train, "total": t_all}}
  write_json(done, json.loads(json.dumps(record, default=list)))
  print(f"{variant} seed {seed}: {t_train:.0f} s training + test, {t_all:.0f} s with "
        f"permeation", flush=True)
  return record


# ------------------------------------------------------------------ statistics and table

ROWS = (("liver_dsc", "liver DSC %", 100), ("liver_assd", "liver ASSD mm", 1),
        ("tumour_dsc", "tumour DSC % (volumes with tumour)", 100),
        ("tumour_global_dice", "tumour global Dice %", 100),
        ("tumour_assd", "tumour ASSD mm (finite)", 1),
        ("small_recall", "small-tumour recall %", 100),
        ("small_dice", "small-tumour Dice %", 100),
        ("small_precision", "small-tumour precision %", 100),
        ("large_recall", "large-tumour recall %", 100),
        ("large_dice", "large-tumour Dice %", 100),
        ("large_precision", "large-tumour precision %", 100),
        ("all_recall", "lesion recall %, all sizes", 100),
        ("all_precision", "lesion precision %, all sizes", 100))


def _values(records, variant, key):
  return [r["metrics"][key] for r in records if r["variant"] == variant]


def _mean_std(values, scale=1.0) -> str:
  vals = [v * scale for v in values if v is not None]
  if not vals:
    return "-"
  if len(vals) == 1:
    return f"{vals[0]:.2f}"
  return f"{np.mean(vals):.2f} ± {np.std(vals, ddof=1):.2f}"


def paired_test(records, a: str, b: str, key: str) -> dict | None:
  """b - a per seed (same seed, same data order and shared initial weights).

  Returns the mean difference with two 95% confidence intervals (t distribution with
  n - 1 degrees of freedom; paired bootstrap: seeds resampled with replacement, the
  2.5 and 97.5 percentiles of the resampled means), the paired t-test p value and the
  seeds where b is higher.
  """
  from scipy import stats
  by_seed = lambda v: {r["seed"]: r["metrics"][key] for r in records if r["variant"] == v}
  xa, xb = by_seed(a), by_seed(b)
  seeds = sorted(s for s in xa if s in xb and xa[s] is not None and xb[s] is not None)
  if len(seeds) < 2:
    return None
  d = np.array([xb[s] - xa[s] for s in seeds], float)
  n = len(d)
  sd = float(d.std(ddof=1))
  half = float(stats.t.ppf(0.975, n - 1)) * sd / math.sqrt(n)
  p = None
  if sd > 0:
    p = float(stats.ttest_rel([xb[s] for s in seeds], [xa[s] for s in seeds]).pvalue)
  rng = np.random.default_rng(0)
  means = d[rng.integers(0, n, (BOOTSTRAP, n))].mean(axis=1)
  lo, hi = np.percentile(means, [2.5, 97.5])
  return {"mean_diff": float(d.mean()), "std_diff": sd, "n": n, "p": p,
          "t_ci": [float(d.mean()) - half, float(d.mean()) + half],
          "bootstrap_ci": [float(lo), float(hi)], "wins": int((d > 0).sum())}


def mcnemar(records, a: str, b: str, small: bool) -> dict | None:
  """Lesion-level exact McNemar test of detection, pooled over seeds (same reference lesions).

  Counts lesions (of one size class) detected by b and missed by a, and the reverse, over
  every seed; the p value is the two-sided binomial test of those discordant pairs. Seeds
  re-use the same lesions, so the pairs are not fully independent: a guide, not proof.
  """
  from scipy import stats
  by = lambda v: {(r["seed"], c, i): hit for r in records if r["variant"] == v
                  for c, i, sm, hit in r["lesions"] if sm == small}
  ha, hb = by(a), by(b)
  keys = [k for k in ha if k in hb]
  if not keys:
    return None
  only_b = sum(hb[k] and not ha[k] for k in keys)
  only_a = sum(ha[k] and not hb[k] for k in keys)
  p = float(stats.binomtest(only_b, only_a + only_b).pvalue) if only_a + only_b else None
  return {"only_b": int(only_b), "only_a": int(only_a), "pairs": len(keys), "p": p}


def format_table(records, variants, stages) -> str:
  names = [VARIANTS[v][0] for v in variants]
  lines = ["| metric (mean ± std over seeds) | " + " | ".join(names) + " |",
           "| --- |" + " --- |" * len(names)]
  for key, title, scale in ROWS:
    lines.append(f"| {title} | " + " | ".join(_mean_std(_values(records, v, key), scale)
                                              for v in variants) + " |")
  counts = {k: sorted({r["metrics"][k] for r in records}) for k in ("small_lesions", "large_lesions")}
  lines.append("")
  lines.append(f"Reference lesions in the test volumes: {counts['small_lesions']} small, "
               f"{counts['large_lesions']} large.")
  base = "unet"
  others = [v for v in variants if v != base]
  if base in variants and others:
    lines += ["", "Paired by seed, difference to the U-Net: mean of the per-seed "
              "differences [95% CI, t] [95% CI, paired bootstrap over seeds] (paired t-test "
              "p, seeds where the variant is higher):", "",
              "| metric | " + " | ".join(f"{VARIANTS[v][0]} - U-Net" for v in others) + " |",
              "| --- |" + " --- |" * len(others)]
    for key, title, scale in ROWS:
      cells = []
      for v in others:
        t = paired_test(records, base, v, key)
        if t is None:
          cells.append("-")
        else:
          p = "-" if t["p"] is None else f"{t['p']:.2f}"
          (tl, th), (bl, bh) = t["t_ci"], t["bootstrap_ci"]
          cells.append(f"{t['mean_diff'] * scale:+.2f} [{tl * scale:+.2f}, {th * scale:+.2f}] "
                       f"[{bl * scale:+.2f}, {bh * scale:+.2f}] (p {p}, {t['wins']}/{t['n']})")
      lines.append(f"| {title} | " + " | ".join(cells) + " |")
    lines += ["", "Lesion detection, paired by lesion and seed (exact McNemar): lesions found "
              "only by the variant / only by the U-Net, p:", ""]
    for v in others:
      parts = []
      for small in (True, False):
        m = mcnemar(records, base, v, small)
        if m is not None:
          p = "-" if m["p"] is None else f"{m['p']:.2f}"
          parts.append(f"{'small' if small else 'large'} {m['only_b']} / {m['only_a']} "
                       f"of {m['pairs']} (p {p})")
      lines.append(f"- {VARIANTS[v][0]}: " + "; ".join(parts))
  lines += ["", "Permeation rate per stage on the test volumes' objects (mean over seeds ± "
            "std over seeds of each run's mean over objects; in brackets the share of "
            "objects at -0.5). 'untrained': the same networks as initialised, the control:", "",
            "| variant | objects | " + " | ".join(f"stage {s}" for s in range(1, stages + 1))
            + " |", "| --- | --- |" + " --- |" * stages]
  for v in variants:
    for key, when in (("permeation", "trained"), ("permeation_untrained", "untrained")):
      for group in ("small", "large", "tumour_small", "tumour_large"):
        runs = [r[key]["summary"][group] for r in records if r["variant"] == v and key in r]
        if not runs:
          continue
        cells = []
        for s in range(stages):
          means = [e["mean"][s] for e in runs if e["mean"][s] is not None]
          vanished = [e["vanished"][s] for e in runs if e["vanished"][s] is not None]
          cell = _mean_std(means)
          if vanished:
            cell += f" ({100 * np.mean(vanished):.0f}%)"
          cells.append(cell)
        lines.append(f"| {VARIANTS[v][0]}, {when}, {group.replace('_', ' ')} | "
                     f"{runs[0]['objects']} | " + " | ".join(cells) + " |")
  lines += ["", "The paper's claim in numbers: permeation of small minus large tumours, per "
            "run, then mean ± std over seeds (seeds where small > large):", "",
            "| variant | " + " | ".join(f"stage {s}" for s in range(1, stages + 1)) + " |",
            "| --- |" + " --- |" * stages]
  for v in variants:
    for key, when in (("permeation", "trained"), ("permeation_untrained", "untrained")):
      diffs = []
      for r in records:
        if r["variant"] != v or key not in r:
          continue
        sm, lg = r[key]["summary"]["tumour_small"]["mean"], r[key]["summary"]["tumour_large"]["mean"]
        diffs.append([None if a is None or b is None else a - b for a, b in zip(sm, lg)])
      if not diffs:
        continue
      cells = []
      for s in range(stages):
        col = [d[s] for d in diffs if d[s] is not None]
        cells.append(_mean_std(col) + f" ({sum(c > 0 for c in col)}/{len(col)})" if col else "-")
      lines.append(f"| {VARIANTS[v][0]}, {when} | " + " | ".join(cells) + " |")
  return "\n".join(lines)


def plot(records, variants, stages, path: str, title: str) -> None:
  """Permeation rate per stage of small tumours, large tumours and the liver, one panel per
  variant: trained (mean ± std over seeds, thin lines per seed) and untrained (dashed)."""
  from matplotlib.figure import Figure
  from munet_jax.atomic import write_png
  from munet_jax.diagnostics import SENTINEL
  groups = (("tumour_small", "#1f77b4", "small tumours"), ("tumour_large", "#d62728", "large tumours"),
            ("liver_large", "#2ca02c", "liver (large)"))
  fig = Figure(figsize=(3.3 * len(variants), 3.5), dpi=90)
  axes = np.atleast_1d(fig.subplots(1, len(variants), sharey=True))
  x = np.arange(1, stages + 1)
  for ax, v in zip(axes, variants):
    for k, (group, colour, label) in enumerate(groups):
      runs = [r["permeation"]["summary"][group] for r in records if r["variant"] == v]
      per_run = np.array([[np.nan if m is None else m for m in e["mean"]] for e in runs], float)
      vanished = np.array([[np.nan if m is None else m for m in e["vanished"]] for e in runs])
      mean = np.nanmean(per_run, axis=0)
      std = np.nanstd(per_run, axis=0, ddof=1) if len(runs) > 1 else np.zeros(stages)
      offset = (k - 1) * 0.1
      for row in per_run:
        ax.plot(x + offset, row, color=colour, alpha=0.25, lw=0.8)
      ax.errorbar(x + offset, mean, yerr=std, marker="o", capsize=3, color=colour,
                  label=f"{label} (n={runs[0]['objects']})")
      before = [r["permeation_untrained"]["summary"][group] for r in records
                if r["variant"] == v and "permeation_untrained" in r]
      if before:
        init = np.nanmean([[np.nan if m is None else m for m in e["mean"]] for e in before], 0)
        ax.plot(x + offset, init, color=colour, ls="--", lw=1.0, marker="x", ms=4,
                label=f"{label}, untrained")
      for xs, share in zip(x + offset, np.nanmean(vanished, axis=0)):
        if share > 0:
          ax.annotate(f"{100 * share:.0f}%", (xs, SENTINEL), ha="center", fontsize=7,
                      color=colour, textcoords="offset points", xytext=(0, 3 + 9 * k))
    ax.axhline(1.0, color="grey", lw=0.8, ls=":")
    ax.axhline(SENTINEL, color="grey", lw=0.8, ls="--")
    ax.set_title(VARIANTS[v][0], fontsize=9)
    ax.set_xticks(x)
    ax.set_xlabel("stage", fontsize=8)
  axes[0].set_ylabel("permeation rate", fontsize=8)
  axes[0].legend(fontsize=6, loc="lower left", ncol=2)
  fig.suptitle(title, fontsize=9)
  fig.tight_layout()
  write_png(fig, path)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--config", default=DEFAULT_CONFIG,
                      help="the recipe every run shares (default configs/synthetic_tumours.py)")
  parser.add_argument("--seeds", type=int, default=DEFAULT_SEEDS,
                      help=f"seeds per variant, 0..N-1 (default {DEFAULT_SEEDS})")
  parser.add_argument("--steps", type=int, help="training steps per run (default: the config's)")
  parser.add_argument("--out", help="output folder (default runs/ablation-CONFIGNAME)")
  parser.add_argument("--variants", default="unet,odu,munet",
                      help="comma-separated subset of unet,odu,munet")
  parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                      help="override a config key (e.g. train.learning_rate=1e-3)")
  args = parser.parse_args(argv)
  from munet_jax.errors import UserError
  from munet_jax.runtime import configure_jax
  configure_jax()
  import jax
  from munet_jax.atomic import write_json

  overrides = list(args.set) + ([f"train.steps={args.steps}"] if args.steps else [])
  recipe = load_recipe(args.config, overrides)
  seeds = args.seeds
  if seeds < 1:
    raise UserError(f"--seeds must be >= 1, got {seeds}")
  variants = [v for v in args.variants.split(",") if v]
  for v in variants:
    if v not in VARIANTS:
      raise UserError(f"--variants: unknown variant '{v}' (unet, odu, munet)")
  name = os.path.splitext(os.path.basename(args.config))[0]
  out = args.out or os.path.join(ROOT, "runs", f"ablation-{name}")
  os.makedirs(out, exist_ok=True)
  started = datetime.datetime.now().astimezone()
  load_start = os.getloadavg()
  t0 = time.perf_counter()
  cases = ensure_data(os.path.join(out, "data"), recipe)
  records = []
  # Seeds outermost: an interrupted ablation still has every variant for the seeds done.
  for seed in range(seeds):
    for v in variants:
      records.append(train_one(out, recipe, v, seed, os.path.join(out, "data"), cases))
  wall = time.perf_counter() - t0
  stages = len(recipe.model.features) - 1
  command = "python bench/ablation.py " + " ".join(argv if argv is not None else sys.argv[1:])
  device = f"{jax.devices()[0].device_kind} ({jax.default_backend()}), {os.cpu_count()} CPU cores"
  table = format_table(records, variants, stages)
  syn, data, train = recipe.data.synthetic, recipe.data, recipe.train
  header = (f"command: {command.strip()}\n"
            f"device: {device}, {platform.node()}\n"
            f"date: {started.isoformat(timespec='seconds')}; wall time {wall / 60:.1f} min "
            f"(load average at start {load_start[0]:.1f}, at end {os.getloadavg()[0]:.1f}); "
            f"the runs' own time, summed (re-used runs included): "
            f"{sum(r['wall_s']['total'] for r in records) / 60:.1f} min\n"
            f"recipe {os.path.relpath(args.config, ROOT)}"
            f"{' with ' + ', '.join(overrides) if overrides else ''}: {data.num_train} "
            f"training / {data.num_test} test volumes drawn at {syn.size}x{syn.size}x"
            f"{syn.slices}, liver region {syn.crop or syn.size}, tumour rate "
            f"{syn.tumour_rate}; {data.image_size}x{data.image_size} {data.train_crop} crops; "
            f"widths {tuple(recipe.model.features)}, batch {train.batch_size}, {train.steps} "
            f"steps, lr {train.learning_rate}; seeds 0..{seeds - 1}")
  print("\n" + header + "\n\n" + table)
  with open(os.path.join(out, "ablation.md.tmp"), "w") as f:
    f.write(header + "\n\n" + table + "\n")
  os.replace(os.path.join(out, "ablation.md.tmp"), os.path.join(out, "ablation.md"))
  summary = {"command": command, "device": device, "date": started.isoformat(),
             "wall_s": wall, "load_average": [load_start, os.getloadavg()],
             "recipe": recipe.to_dict(), "seeds": seeds, "variants": variants,
             "runs": records}
  write_json(os.path.join(out, "ablation.json"), json.loads(json.dumps(summary, default=list)))
  plot(records, variants, stages, os.path.join(out, "permeation.png"),
       f"permeation rate on held-out objects, {seeds} seeds (small: < 28 x 28 mm² "
       f"in the slice; dashed: untrained)")
  print(f"\nwrote {out}/ablation.md, ablation.json, permeation.png")
  return 0


if __name__ == "__main__":
  from munet_jax.cli import run
  sys.exit(run(main))
