"""The same mU-Net in PyTorch, timed side by side with munet_jax (training step and inference).

  python bench/torch_reference.py                      # the issue's table, 2 threads
  python bench/torch_reference.py --rounds 7 --only train

Both frameworks run in this one process, alternating round by round (a few steps of
munet_jax, then the same number of PyTorch, ...), on the same float32 batch, so machine
drift hits both alike; the ratio is taken round by round and its median printed. The
network: residual learning, the ODU path and skip convolutions, batch norm, PReLU,
no dropout, MSE on softmax probabilities, Adam. Before timing, the PyTorch network is
loaded with munet_jax's initial parameters and its inference logits are checked
against munet_jax's (the same function, not merely the same shapes).

PyTorch is a benchmark-only extra (`pip install -e ".[bench]"`).
"""

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from munet_jax.config import base_config  # noqa: E402
from munet_jax.models import from_config  # noqa: E402
from munet_jax.runtime import configure_jax  # noqa: E402
from munet_jax.training.state import create_train_state, make_train_step  # noqa: E402

# (kind, widths, size, batch): the three training configurations, inference on
# them and on Table I's widths at a size two cores get through in seconds.
CONFIGS = [
    ("train", (16, 32, 64, 128), 80, 8),
    ("train", (16, 32, 64, 128), 128, 8),
    ("train", (8, 16, 32, 64, 128), 128, 8),
    ("infer", (16, 32, 64, 128), 80, 8),
    ("infer", (16, 32, 64, 128), 128, 8),
    ("infer", (8, 16, 32, 64, 128), 128, 8),
    ("infer", (64, 128, 256, 512, 1024), 128, 2),
]


class Block(nn.Module):
  """Conv3x3 -> batch norm -> PReLU (munet_jax ConvBlock without dropout)."""

  def __init__(self, c_in, c_out):
    super().__init__()
    self.conv = nn.Conv2d(c_in, c_out, 3, padding=1)
    self.bn = nn.BatchNorm2d(c_out, momentum=0.1, eps=1e-5)   # flax momentum 0.9
    self.act = nn.PReLU(init=0.25)

  def forward(self, x):
    return self.act(self.bn(self.conv(x)))


class Encoder(nn.Module):
  def __init__(self, c_in, c_out):
    super().__init__()
    self.b1, self.b2 = Block(c_in, c_out), Block(c_out, c_out)
    self.proj = nn.Conv2d(c_in, c_out, 1, bias=False) if c_in != c_out else None

  def forward(self, x):
    y = self.b2(self.b1(x))
    return y + (self.proj(x) if self.proj is not None else x)


class Skip(nn.Module):
  """r = x - PReLU(TConv3x3/2(maxpool x)), then Conv3x3 + BN + PReLU."""

  def __init__(self, c):
    super().__init__()
    # padding=0 gives 2H+1 rows; the first 2H are flax's "SAME" transposed convolution.
    self.tconv = nn.ConvTranspose2d(c, c, 3, stride=2)
    self.act = nn.PReLU(init=0.25)
    self.conv = Block(c, c)

  def forward(self, x, pooled):
    h, w = x.shape[-2:]
    u = self.act(self.tconv(pooled)[..., :h, :w])
    return self.conv(x - u)


class Decoder(nn.Module):
  def __init__(self, c_below, c):
    super().__init__()
    self.up = nn.ConvTranspose2d(c_below, c, 2, stride=2)
    self.act = nn.PReLU(init=0.25)
    self.b1, self.b2 = Block(2 * c, c), Block(c, c)

  def forward(self, x, skip):
    x = torch.cat([skip, self.act(self.up(x))], dim=1)
    return self.b2(self.b1(x))


class TorchMUNet(nn.Module):
  """munet_jax.models.MUNet(odu_residual=True, skip_conv=True, residual_learning=True), NCHW."""

  def __init__(self, features, num_classes=3):
    super().__init__()
    ins = (1,) + tuple(features[:-1])
    self.enc = nn.ModuleList(Encoder(i, f) for i, f in zip(ins, features))
    self.skip = nn.ModuleList(Skip(f) for f in features[:-1])
    self.dec = nn.ModuleList(Decoder(features[s + 1], features[s])
                             for s in range(len(features) - 1))
    self.out = nn.Conv2d(features[0], num_classes, 1)

  def forward(self, x):
    skips = []
    for s, enc in enumerate(self.enc):
      x = enc(x)
      if s == len(self.enc) - 1:
        break
      pooled = nn.functional.max_pool2d(x, 2)
      skips.append(self.skip[s](x, pooled))
      x = pooled
    for s in reversed(range(len(skips))):
      x = self.dec[s](x, skips[s])
    return self.out(x)


def load_flax(net: TorchMUNet, params) -> None:
  """Copies munet_jax parameters into `net` (HWIO -> OIHW; transposed kernels flipped)."""
  def conv(m, p):
    m.weight.copy_(torch.from_numpy(np.asarray(p["kernel"]).transpose(3, 2, 0, 1).copy()))
    if m.bias is not None:
      m.bias.copy_(torch.from_numpy(np.array(p["bias"])))

  def tconv(m, p):
    # flax applies the kernel unflipped to the dilated input; torch's is the adjoint of conv.
    k = np.asarray(p["kernel"])[::-1, ::-1].transpose(2, 3, 0, 1)
    m.weight.copy_(torch.from_numpy(k.copy()))
    m.bias.copy_(torch.from_numpy(np.array(p["bias"])))

  def prelu(m, p):
    m.weight.copy_(torch.from_numpy(np.array(p["negative_slope"]).reshape(1)))

  def block(b, p):
    conv(b.conv, p["Conv_0"])
    b.bn.weight.copy_(torch.from_numpy(np.array(p["BatchNorm_0"]["scale"])))
    b.bn.bias.copy_(torch.from_numpy(np.array(p["BatchNorm_0"]["bias"])))
    prelu(b.act, p["PReLU_0"])

  with torch.no_grad():
    for s, enc in enumerate(net.enc):
      p = params[f"encoder_{s + 1}"]
      block(enc.b1, p["ConvBlock_0"])
      block(enc.b2, p["ConvBlock_1"])
      if enc.proj is not None:
        conv(enc.proj, p["projection"])
    for s, sk in enumerate(net.skip):
      p = params[f"skip_{s + 1}"]
      tconv(sk.tconv, p["odu"]["ConvTranspose_0"])
      prelu(sk.act, p["odu"]["PReLU_0"])
      block(sk.conv, p["conv"])
    for s, dec in enumerate(net.dec):
      p = params[f"decoder_{s + 1}"]
      tconv(dec.up, p["ConvTranspose_0"])
      prelu(dec.act, p["PReLU_0"])
      block(dec.b1, p["ConvBlock_0"])
      block(dec.b2, p["ConvBlock_1"])
    conv(net.out, params["output"])


def config_for(features, batch):
  c = base_config()
  c.model.features = features
  c.model.dropout_rate = 0.0
  c.train.batch_size = batch
  c.train.loss = "mse"
  return c


def check_same_function(features, size):
  """Largest |logit difference| of the two networks, and the logits' standard deviation.

  In training mode (batch statistics), where batch norm keeps the activations O(1): with
  the running statistics of a fresh network the logits are little more than the bias.
  """
  c = config_for(features, 2)
  state = create_train_state(c, jax.random.key(0))
  x = np.random.default_rng(1).normal(size=(2, size, size, 1)).astype(np.float32)
  ours, _ = from_config(c).apply({"params": state.params, "batch_stats": state.batch_stats},
                                 x, train=True, mutable=["batch_stats"])
  ours = np.asarray(ours)
  net = TorchMUNet(features)
  load_flax(net, state.params)
  net.train()
  with torch.no_grad():
    theirs = net(torch.from_numpy(x.transpose(0, 3, 1, 2))).numpy().transpose(0, 2, 3, 1)
  return float(np.max(np.abs(ours - theirs))), float(np.std(ours))


def setups(kind, features, size, batch):
  """Two callables running `k` steps (training) or forward passes (inference), blocking."""
  rng = np.random.default_rng(0)
  images = rng.normal(size=(batch, size, size, 1)).astype(np.float32)
  labels = rng.integers(0, 3, (batch, size, size)).astype(np.int32)
  c = config_for(features, batch)
  state = create_train_state(c, jax.random.key(0))
  net = TorchMUNet(features)
  x_t = torch.from_numpy(images.transpose(0, 3, 1, 2).copy())
  if kind == "train":
    box = {"state": state}
    step = jax.jit(make_train_step(c), donate_argnums=0)
    batch_j = jax.device_put(dict(image=images, label=labels, mask=np.ones(batch, bool)))
    onehot = nn.functional.one_hot(torch.from_numpy(labels).long(), 3).permute(0, 3, 1, 2).float()
    opt = torch.optim.Adam(net.parameters(), lr=1e-4)
    net.train()

    def run_jax(k):
      s = box["state"]
      for _ in range(k):
        s, metrics = step(s, batch_j)
      jax.block_until_ready(metrics["loss"])
      box["state"] = s

    def run_torch(k):
      for _ in range(k):
        opt.zero_grad(set_to_none=True)
        loss = ((torch.softmax(net(x_t), dim=1) - onehot) ** 2).mean()
        loss.backward()
        opt.step()
      loss.item()
  else:
    model = from_config(c)
    variables = {"params": state.params, "batch_stats": state.batch_stats}
    forward = jax.jit(lambda v, x: model.apply(v, x))
    x_j = jax.device_put(images)
    net.eval()

    def run_jax(k):
      for _ in range(k):
        out = forward(variables, x_j)
      jax.block_until_ready(out)

    def run_torch(k):
      with torch.inference_mode():
        for _ in range(k):
          net(x_t)
  return run_jax, run_torch


def timed(fn, k):
  t0 = time.perf_counter()
  fn(k)
  return time.perf_counter() - t0


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--rounds", type=int, default=5, help="alternating rounds per configuration")
  p.add_argument("--seconds", type=float, default=1.5, help="about this long per timed block")
  p.add_argument("--threads", type=int, default=2, help="PyTorch's threads (1 is timed too)")
  p.add_argument("--only", choices=("train", "infer"), default=None)
  args = p.parse_args()
  configure_jax()
  # PyTorch's OpenMP threads busy-wait; on a loaded 2-core machine 2 threads can be far
  # slower than 1, so it is timed with both and the ratio taken against the faster.
  torch_threads = sorted({args.threads, 1}, reverse=True)
  print(f"# jax {jax.__version__} ({jax.default_backend()}, {os.cpu_count()} CPUs), "
        f"torch {torch.__version__}; float32; {args.rounds} alternating rounds; "
        f"load {os.getloadavg()[0]:.2f}")
  # munet_jax's import sets this (munet_jax/_xla_cpu.py) unless MUNET_JAX_YNN_CONVOLUTIONS=1.
  print(f"# XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}")
  heads = " | ".join(f"PyTorch {t} thr. slices/s" for t in torch_threads)
  print(f"| kind | widths | size | batch | munet_jax slices/s | {heads} | ratio to faster "
        "PyTorch (median, min-max) | max logit diff |")
  print("| --- " * (7 + len(torch_threads)) + "|")
  for kind, features, size, batch in CONFIGS:
    if args.only and kind != args.only:
      continue
    diff, scale = check_same_function(features, min(size, 64))
    run_jax, run_torch = setups(kind, features, size, batch)
    torch.set_num_threads(args.threads)
    run_jax(2), run_torch(2)   # compile, warm caches
    k = max(1, round(args.seconds / timed(run_jax, 1)))
    jax_rates, torch_rates = [], {t: [] for t in torch_threads}
    for _ in range(args.rounds):
      jax_rates.append(k * batch / timed(run_jax, k))
      for t in torch_threads:
        torch.set_num_threads(t)
        torch_rates[t].append(k * batch / timed(run_torch, k))
    # Against PyTorch's faster thread count in each round.
    best = [max(r[i] for r in torch_rates.values()) for i in range(args.rounds)]
    ratios = [a / b for a, b in zip(jax_rates, best)]
    torch_cols = " | ".join(f"{statistics.median(torch_rates[t]):.2f}" for t in torch_threads)
    print(f"| {kind} | {','.join(map(str, features))} | {size} | {batch} | "
          f"{statistics.median(jax_rates):.2f} | {torch_cols} | "
          f"{statistics.median(ratios):.2f} ({min(ratios):.2f}-{max(ratios):.2f}) | "
          f"{diff:.1e} (logit std {scale:.2f}) |", flush=True)
  print(f"# load {os.getloadavg()[0]:.2f} at the end")


if __name__ == "__main__":
  main()
