"""predict.py wall time per volume: NIfTI, DICOM, DICOM-SEG, --tta, an ensemble of 3, ONNX.

  python bench/predict_speed.py [--demo-workdir W] [--skip-table-one] [--modes M1,M2]

Two models, side by side in one process: the demo's (configs/demo.py; a trained run when
--demo-workdir is given, else untrained weights) and Table I's (configs/lits.py, widths
64..1024; untrained weights: the time does not depend on the values). The volume is the
real CT of ../shared/data/real_ct (122 x 101 x 30, 3 mm), read as its NIfTI file or as a
DICOM series written from it. Each mode runs predict.py's `main` twice: "first" includes
reading the checkpoint and compiling for this slice shape, "again" finds the program
compiled (a second volume of a folder pays only this). The ensemble is one run given three
times (--workdir W W W): three models' work, for timing only. "onnxruntime" is
`predict.py --onnx` on the model exported from the same checkpoint (`python -m
munet_jax.export`, timed on its own), and the largest difference between its logits and
`munet_jax.apply`'s on the CT's slices is printed. --modes keeps only the rows named,
separated by semicolons (e.g. --modes "NIfTI;NIfTI, onnxruntime").
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests", "helpers")]
CT = os.path.join(os.path.dirname(ROOT), "shared", "data", "real_ct", "ct_abdomen_3mm.nii.gz")


def _untrained_run(config_file: str, workdir: str) -> str:
  import jax
  from munet_jax.checkpoints import Checkpointer
  from munet_jax.config import load_config_file
  from munet_jax.training.state import create_train_state
  config = load_config_file(os.path.join(ROOT, "configs", config_file))
  state = jax.jit(lambda key: create_train_state(config, key))(jax.random.key(0))
  ckpt = Checkpointer(workdir)
  ckpt.save(1, state, {}, config)
  ckpt.wait()
  ckpt.close()
  return workdir


def _dicom_series(folder: str) -> str:
  import nibabel as nib
  import numpy as np
  from dicom_series import write_series
  from munet_jax.data import nifti
  image = nib.load(CT)
  hu = np.asanyarray(image.dataobj)
  corner = image.affine @ np.array([hu.shape[0] - 1, hu.shape[1] - 1, 0, 1.0])
  write_series(folder, hu[::-1, ::-1, :], spacing=nifti.ras_spacing(image.affine),
               origin=(-corner[0], -corner[1], corner[2]))
  return folder


def _export_and_compare(workdir: str) -> str:
  """Exports WORKDIR.onnx; returns a line with the export time and the logits' difference."""
  import jax
  import nibabel as nib
  import numpy as np
  import munet_jax
  from munet_jax.cli import export, run
  from munet_jax.data import nifti
  from munet_jax.onnx_inference import OnnxModel
  start = time.perf_counter()
  if run(export.main, ["--workdir", workdir, "--out", f"{workdir}.onnx"]):
    raise SystemExit("export failed")
  seconds = time.perf_counter() - start
  config, variables = munet_jax.load(workdir)
  image = nib.load(CT)
  hu = nifti.to_ras(np.asanyarray(image.dataobj), image.affine)
  images = munet_jax.preprocess(np.moveaxis(hu, -1, 0).astype(np.float32), config)[..., None]
  apply = jax.jit(lambda v, x: munet_jax.apply(v, x, config))
  model = OnnxModel(f"{workdir}.onnx")
  worst, scale = 0.0, 0.0
  for start in range(0, len(images), 8):
    batch = images[start:start + 8]
    reference = np.asarray(apply(variables, batch))
    worst = max(worst, float(np.abs(model.logits(batch) - reference).max()))
    scale = max(scale, float(np.abs(reference).max()))
  return (f"export {seconds:.1f} s, {os.path.getsize(workdir + '.onnx') / 2**20:.1f} MiB; "
          f"onnxruntime vs munet_jax.apply on the CT's {len(images)} slices: max abs logit "
          f"difference {worst:.2e} (max |logit| {scale:.2f})")


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--demo-workdir", help="a trained demo run (default: untrained weights)")
  parser.add_argument("--skip-table-one", action="store_true")
  parser.add_argument("--modes", help="only these rows, by name, separated by ';'")
  args = parser.parse_args()
  from munet_jax.runtime import configure_jax
  configure_jax()
  import jax
  from munet_jax.cli import predict, run
  tmp = tempfile.mkdtemp(prefix="predict-speed-")
  load_before = os.getloadavg()
  series = _dicom_series(os.path.join(tmp, "dicom"))
  models = [("demo" + ("" if args.demo_workdir else " (untrained)"),
             args.demo_workdir or _untrained_run("demo.py", os.path.join(tmp, "demo")))]
  if not args.skip_table_one:
    models.append(("Table I (untrained)", _untrained_run("lits.py", os.path.join(tmp, "lits"))))
  out = os.path.join(tmp, "out")
  modes = [
      ("NIfTI", lambda w: ["--workdir", w, "--input", CT, "--output", f"{out}/n.nii.gz"]),
      ("DICOM", lambda w: ["--workdir", w, "--input", series, "--output", f"{out}/d.nii.gz"]),
      ("DICOM -> DICOM-SEG", lambda w: ["--workdir", w, "--input", series, "--output",
                                        f"{out}/s.dcm", "--output-format", "dicom-seg"]),
      ("NIfTI --tta", lambda w: ["--workdir", w, "--input", CT, "--output", f"{out}/t.nii.gz",
                                 "--tta"]),
      ("NIfTI --save-probabilities", lambda w: ["--workdir", w, "--input", CT, "--output",
                                                f"{out}/p.nii.gz", "--save-probabilities"]),
      ("NIfTI, ensemble of 3", lambda w: ["--workdir", w, w, w, "--input", CT, "--output",
                                          f"{out}/e.nii.gz"]),
      ("NIfTI, onnxruntime", lambda w: ["--onnx", f"{w}.onnx", "--input", CT, "--output",
                                        f"{out}/o.nii.gz"]),
  ]
  if args.modes:
    wanted = [m.strip() for m in args.modes.split(";") if m.strip()]
    unknown = set(wanted) - {m for m, _ in modes}
    if unknown:
      raise SystemExit(f"--modes: no row named {', '.join(sorted(unknown))}")
    modes = [(m, a) for m, a in modes if m in wanted]
  rows, notes = [], []
  for name, workdir in models:
    if any("onnx" in m for m, _ in modes):
      notes.append(f"{name}: " + _export_and_compare(workdir))
      print(notes[-1], flush=True)
    for mode, argv in modes:
      times = []
      for _ in range(2):
        start = time.perf_counter()
        status = run(predict.main, argv(workdir))
        times.append(time.perf_counter() - start)
        if status:
          raise SystemExit(f"{mode}: predict.py exit status {status}")
      rows.append((name, mode, *times))
      print(f"{name:22s} {mode:28s} first {times[0]:7.2f} s  again {times[1]:7.2f} s",
            flush=True)
  load_after = os.getloadavg()
  print()
  print(f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, "
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
        f"jax {jax.__version__} on {jax.devices()[0].platform}; load average "
        f"before {load_before[0]:.2f} / after {load_after[0]:.2f} (1 min)")
  print()
  print("| model | input / mode | first call, s | again, s |")
  print("| --- | --- | --- | --- |")
  for name, mode, first, again in rows:
    print(f"| {name} | {mode} | {first:.2f} | {again:.2f} |")
  for note in notes:
    print(note)


if __name__ == "__main__":
  main()
