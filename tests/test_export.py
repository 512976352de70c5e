"""The exported model: ONNX (python -m munet_jax.export, predict.py --onnx) and jax.export.

Logits are compared with `munet_jax.apply` within a tolerance from the arithmetic
(`rounding.spread`): the two implementations' logits are each one draw of float32's
rounding, so their difference has a standard deviation of sqrt(2) times the spread;
that sum of many independent roundings is close to normal, and 8 standard deviations are
passed with a probability far below one in the number of logits compared, even where 16
samples underestimate the spread by half. Labels must agree wherever the two top logits
are further apart than the tolerances of both.
"""

import json
import os
import subprocess
import sys

import jax
import nibabel as nib
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import helper

import munet_jax
from munet_jax.cli import export as export_cli
from munet_jax.cli import predict as predict_cli
from munet_jax.cli import run as run_cli
from munet_jax.data import nifti, synthetic
from munet_jax import export as export_pkg
from munet_jax.export import jaxpr_onnx, onnx_model
from munet_jax.models import from_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests", "helpers"))
from rounding import U, spread  # noqa: E402
from tiny_run import tiny_run_config  # noqa: E402
from varied_run import make_varied_run  # noqa: E402

SIGMAS = 8
# The preprocessing, (clip(hu) - lo) * scale + out_lo with |result| <= 1, rounded by numpy
# on one side and XLA (perhaps with a fused multiply-add) on the other: a few u each.
PREPROCESSING_ERROR = 8 * U


def tolerance(sd, reference):
  """The largest difference allowed between two implementations' logits, per element."""
  return SIGMAS * np.sqrt(2) * sd + 2 * U * np.abs(reference)


def _config(**model):
  c = tiny_run_config()
  c.model.features = (4, 8, 16)   # pooling factor 4: slices of 30 x 37 get padded
  for key, value in model.items():
    c.model[key] = value
  return c


def _lively(variables):
  """`variables` with every kernel scaled to unit gain (std 1 / sqrt(fan-in)), so that each
  layer passes on signal of the input's scale: freshly initialised (std 0.05), the deeper
  layers' outputs fade, and an error there would hardly reach the logits."""
  def scale(path, leaf):
    if path[-1].key != "kernel":
      return leaf
    return leaf / (np.std(leaf) * np.sqrt(np.prod(leaf.shape[:-1])))
  return jax.tree_util.tree_map_with_path(scale, variables)


def _images(shape, seed=0):
  return np.random.default_rng(seed).uniform(-1, 1, shape).astype(np.float32)


def _session(proto):
  return ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])


def _cli(module, capsys, *args):
  capsys.readouterr()
  status = run_cli(module.main, [str(a) for a in args])
  out, err = capsys.readouterr()
  return status, out, err


VARIANTS = {
    "mU-Net": (dict(), dict()),
    "mU-Net, not reformulated": (dict(), dict(reformulated=False)),
    "U-Net (no ODU residual, no skip conv)": (dict(odu_residual=False, skip_conv=False), {}),
}


@pytest.mark.parametrize("variant", VARIANTS)
def test_onnx_logits_are_apply_s_within_float32_rounding(variant, run):
  config_keys, module_fields = VARIANTS[variant]
  config = _config(**config_keys)
  x = _images((3, 30, 37, 1))   # padded to 32 x 40 inside, cropped back
  variables = _lively(run[3])   # a U-Net leaves the skip paths' parameters unused
  model = from_config(config).clone(**module_fields)
  fn = lambda images: model.apply(variables, images, train=False)   # noqa: E731
  session = _session(onnx_model(variables, config, model=model if module_fields else None))
  logits, sd = spread(fn, x)
  got = session.run(None, {"images": x})[0]
  assert got.shape == logits.shape == (3, 30, 37, 3)
  assert np.all(np.abs(got - logits) <= tolerance(sd, logits)), (
      f"max abs difference {np.abs(got - logits).max():.3g}")


def test_a_bfloat16_run_is_exported_with_float32_compute(run):
  # onnxruntime's CPU convolutions take no bfloat16; the parameters are float32 anyway.
  config, variables = _config(), run[3]
  plain = onnx_model(variables, config)
  config.model.dtype = "bfloat16"
  exported = onnx_model(variables, config)
  assert exported.graph == plain.graph


def test_a_primitive_without_a_translation_is_named():
  closed = jax.make_jaxpr(lambda x: jax.numpy.sin(x) + 1)(np.zeros((2,), np.float32))
  with pytest.raises(jaxpr_onnx.UnsupportedPrimitive, match="'sin'"):
    jaxpr_onnx.translate(closed, jaxpr_onnx.Graph(), ["x"], {})


# -- a run on disk, exported by the tool ---------------------------------------------------

@pytest.fixture(scope="module")
def run(tmp_path_factory):
  """A varied tiny run (its labels differ from voxel to voxel), its ONNX and jax exports,
  and a liver-region synthetic CT (37 x 37 x 5) as NIfTI."""
  base = tmp_path_factory.mktemp("export")
  workdir = base / "run"
  config, variables = make_varied_run(str(workdir), config=_config())
  assert run_cli(export_cli.main, ["--workdir", str(workdir), "--out", str(base / "m.onnx")]) == 0
  assert run_cli(export_cli.main, ["--workdir", str(workdir), "--out",
                                   str(base / "m.jaxexport"), "--format", "jax",
                                   "--shape", "37", "37"]) == 0
  hu, _, affine = synthetic.make_case(np.random.default_rng(3), 48, slices=5, crop=37)
  nifti.write_image(str(base / "ct.nii.gz"), hu, affine)
  variables = jax.tree_util.tree_map(np.asarray, variables)
  return base, workdir, config, variables


@pytest.fixture(scope="module")
def reference(run):
  """The CT's slices in RAS, (Z, X, Y, 1) preprocessed, their logits by `munet_jax.apply`
  and the logits' tolerance; the exported ONNX file's logits checked against them (on
  another batch and slice size than the other tests')."""
  base, _, config, variables = run
  image = nifti.read_image(str(base / "ct.nii.gz"))
  hu = nifti.to_ras(image.data, image.affine)
  images = munet_jax.preprocess(np.moveaxis(hu, -1, 0).astype(np.float32), config)[..., None]
  fn = lambda x: munet_jax.apply(variables, x, config)   # noqa: E731
  logits, sd = spread(fn, images, input_error=PREPROCESSING_ERROR)
  tol = tolerance(sd, logits)
  got = _session(onnx.load(str(base / "m.onnx"))).run(None, {"images": images})[0]
  assert np.all(np.abs(got - logits) <= tol), f"max abs difference {np.abs(got - logits).max()}"
  return images, logits, tol, image.affine


def _clear(logits, tol):
  """Where the argmax is beyond doubt: the top two logits apart by more than both
  tolerances (a difference of logits moves by at most the sum)."""
  order = np.argsort(logits, axis=-1)
  top = np.take_along_axis(logits, order[..., -2:], -1)
  slack = np.take_along_axis(tol, order[..., -2:], -1).sum(-1)
  return top[..., 1] - top[..., 0] > slack


def test_the_onnx_file_holds_what_predict_needs(run):
  base, _, config, _ = run
  props = {p.key: p.value for p in onnx.load(str(base / "m.onnx")).metadata_props}
  assert json.loads(props["munet_jax.hu_window"]) == list(config.data.hu_window)
  assert json.loads(props["munet_jax.scaled_range"]) == list(config.data.scaled_range)
  assert json.loads(props["munet_jax.class_names"]) == ["background", "liver", "tumour"]
  assert props["munet_jax.num_classes"] == "3"
  assert props["munet_jax.version"] == munet_jax.__version__
  assert len(props["munet_jax.config_sha256"]) == 64
  assert json.loads(props["munet_jax.postprocessing"]) == {
      "largest_liver_component": False, "tumour_inside_liver": False,
      "min_tumour_liver_share": 0.0, "min_tumour_voxels": 0}


def test_predict_onnx_gives_the_labels_of_predict_workdir(run, reference, capsys):
  base, workdir, _, _ = run
  ct = base / "ct.nii.gz"
  status, _, err = _cli(predict_cli, capsys, "--workdir", workdir, "--input", ct,
                        "--output", base / "jax.nii.gz")
  assert status == 0, err
  status, out, err = _cli(predict_cli, capsys, "--onnx", base / "m.onnx", "--input", ct,
                          "--output", base / "onnx.nii.gz")
  assert status == 0, err
  assert "wrote 1 label volume" in out
  jax_labels = nib.load(base / "jax.nii.gz")
  onnx_labels = nib.load(base / "onnx.nii.gz")
  np.testing.assert_array_equal(onnx_labels.affine, jax_labels.affine)
  _, logits, tol, affine = reference
  ras = _clear(np.moveaxis(logits, 0, 2), np.moveaxis(tol, 0, 2))   # (X, Y, Z) in RAS
  clear = nifti.from_ras(ras, affine)
  a, b = np.asarray(jax_labels.dataobj), np.asarray(onnx_labels.dataobj)
  assert clear.mean() > 0.95 and len(np.unique(a)) == 3
  np.testing.assert_array_equal(a[clear], b[clear])


def test_predict_onnx_tta_and_probabilities_are_the_jax_path_s(run, capsys):
  base, workdir, _, _ = run
  ct = base / "ct.nii.gz"
  for flag, out in (("--workdir", "jax_tta.nii.gz"), ("--onnx", "onnx_tta.nii.gz")):
    model = workdir if flag == "--workdir" else base / "m.onnx"
    status, _, err = _cli(predict_cli, capsys, flag, model, "--input", ct, "--output",
                          base / out, "--tta", "--save-probabilities")
    assert status == 0, err
  p_jax = np.asarray(nib.load(base / "jax_tta_probabilities.nii.gz").dataobj.get_unscaled(), np.int16)
  p_onnx = np.asarray(nib.load(base / "onnx_tta_probabilities.nii.gz").dataobj.get_unscaled(), np.int16)
  # Softmaxes move by at most half the largest move of the logits, far below a step of
  # 1/255 here: round(255 p) of the two differ by one step at most.
  assert np.abs(p_jax - p_onnx).max() <= 1
  a = np.asarray(nib.load(base / "jax_tta.nii.gz").dataobj)
  b = np.asarray(nib.load(base / "onnx_tta.nii.gz").dataobj)
  # Two steps between the top two rounded probabilities: more than 1/255 apart unrounded.
  top = np.sort(p_jax, axis=-1)
  clear = top[..., -1] - top[..., -2] >= 2
  assert clear.mean() > 0.5   # the mirrorings' mean of this untrained network is often close
  np.testing.assert_array_equal(a[clear], b[clear])


def test_predict_onnx_imports_no_jax(run, tmp_path):
  base, _, _, _ = run
  code = ("import sys\n"
          "from munet_jax.cli import predict, run\n"
          f"status = run(predict.main, ['--onnx', {str(base / 'm.onnx')!r}, '--input', "
          f"{str(base / 'ct.nii.gz')!r}, '--output', {str(tmp_path / 'l.nii.gz')!r}])\n"
          "assert status == 0, status\n"
          "print(sorted(m for m in sys.modules if m.split('.')[0] in ('jax', 'jaxlib', "
          "'flax', 'optax', 'orbax')))\n")
  result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=ROOT, timeout=120)
  assert result.returncode == 0, result.stderr
  assert result.stdout.strip().splitlines()[-1] == "[]"
  assert (tmp_path / "l.nii.gz").exists()


def test_the_jax_export_is_apply_with_any_batch(run, reference):
  base = run[0]
  images, logits, tol, _ = reference
  exported = jax.export.deserialize(bytearray((base / "m.jaxexport").read_bytes()))
  # A slice's logits do not depend on the rest of its batch (batch norm uses the running
  # statistics), and the tolerance holds for any order of the sums.
  for n in (1, len(images)):
    got = np.asarray(exported.call(images[:n]))
    assert np.all(np.abs(got - logits[:n]) <= tol[:n])


def _other_onnx(path, inputs=(("x", [1, 4]),), outputs=(("y", [1, 4]),), props=None):
  nodes = [helper.make_node("Identity", [inputs[0][0]], [outputs[0][0]])]
  graph = helper.make_graph(
      nodes, "other", [helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, s) for n, s in inputs],
      [helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, s) for n, s in outputs])
  model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
  model.ir_version = 9
  helper.set_model_props(model, props or {})
  onnx.save(model, str(path))
  return path


def test_an_onnx_file_of_another_model_is_exit_2_naming_it(run, tmp_path, capsys):
  base, _, _, _ = run
  props = {p.key: p.value for p in onnx.load(str(base / "m.onnx")).metadata_props}
  cases = {
      "no munet-jax metadata": _other_onnx(tmp_path / "other.onnx"),
      "not ONNX": tmp_path / "notes.onnx",
      "munet-jax metadata, another signature": _other_onnx(tmp_path / "sig.onnx", props=props),
  }
  (tmp_path / "notes.onnx").write_text("not a model\n")
  for why, path in cases.items():
    status, out, err = _cli(predict_cli, capsys, "--onnx", path, "--input",
                            base / "ct.nii.gz", "--output", tmp_path / "o.nii.gz")
    assert status == 2, why
    assert len(err.strip().splitlines()) == 1 and err.startswith(f"error: {path}: "), (why, err)
  assert not (tmp_path / "o.nii.gz").exists()


def test_onnx_with_a_workdir_or_a_checkpoint_choice_is_refused(run, capsys):
  base, workdir, _, _ = run
  common = ["--input", base / "ct.nii.gz", "--output", base / "x.nii.gz"]
  for extra in (["--workdir", workdir], ["--which", "best"]):
    status, _, err = _cli(predict_cli, capsys, "--onnx", base / "m.onnx", *extra, *common)
    assert status == 2 and len(err.strip().splitlines()) == 1, err
  status, _, err = _cli(predict_cli, capsys, *common)
  assert status == 2 and "--workdir" in err and "--onnx" in err


def test_export_refuses_a_shape_for_onnx_and_a_missing_run(tmp_path, capsys):
  status, _, err = _cli(export_cli, capsys, "--workdir", tmp_path, "--out", tmp_path / "m.onnx",
                        "--shape", "64", "64")
  assert status == 2 and "--shape is for --format jax" in err
  status, _, err = _cli(export_cli, capsys, "--workdir", tmp_path / "none", "--out",
                        tmp_path / "m.onnx")
  assert status == 2 and err.startswith(f"error: {tmp_path / 'none'}: ")
  assert not (tmp_path / "m.onnx").exists()


def test_an_export_of_a_run_with_a_reference_hu_shifts_each_volume(run, tmp_path):
  """data.reference_hu travels in the metadata; the ONNX segmenter shifts as the JAX one."""
  from munet_jax import onnx_inference
  from munet_jax.preprocessing import intensity_shift, shifted
  base, _, config, _ = run
  on = config.copy_and_resolve_references()
  on.data.reference_hu = 300.0
  proto = onnx.load(str(base / "m.onnx"))
  meta = export_pkg.metadata(on, {})
  assert json.loads(meta["munet_jax.reference"]) == {"hu": 300.0, "window": [-30.0, 250.0],
                                                     "percentile": 75.0}
  assert json.loads(export_pkg.metadata(config, {})["munet_jax.reference"]) is None
  assert meta["munet_jax.config_sha256"] != export_pkg.metadata(config, {})["munet_jax.config_sha256"]
  for p in proto.metadata_props:
    if p.key == "munet_jax.reference":
      p.value = meta["munet_jax.reference"]
  onnx.save(proto, str(tmp_path / "shifted.onnx"))
  hu = np.asarray(nib.load(base / "ct.nii.gz").dataobj).astype(np.int16)
  shift = intensity_shift(hu, on)
  assert abs(shift) > 100
  moved = onnx_inference.OnnxSegmenter(onnx_inference.OnnxModel(str(tmp_path / "shifted.onnx")))
  plain = onnx_inference.OnnxSegmenter(onnx_inference.OnnxModel(str(base / "m.onnx")))
  got = moved.segment(hu, probabilities=True)
  want = plain.segment(shifted(hu, shift), probabilities=True)
  np.testing.assert_array_equal(got[1], want[1])
  np.testing.assert_array_equal(got[0], want[0])
  assert np.any(got[1] != plain.segment(hu, probabilities=True)[1])
