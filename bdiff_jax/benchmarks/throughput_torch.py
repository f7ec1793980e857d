"""The PyTorch side of the throughput benchmark (`throughput.py`): the same model and loss as
../shared/bench/torch_reference.py, as a worker that compiles and times it.

Loaded by `throughput.py` by its path, in a worker process that never imports JAX (needs torch:
requirements-bench.txt).
"""

import json
import sys
import time
from typing import Any

import torch
from torch import nn
import torch.nn.functional as F


def worker(args: dict[str, Any], reply, *, max_rss_mib, preset_config=None,
           profile_steps=None) -> None:
  """The worker protocol of `throughput.py` for a PyTorch system (`args["kind"] == "torch"`):
  compile (torch_compile) and warm up, reply with its info, then answer "steps" commands."""
  del preset_config  # the PyTorch model has the reference architecture at every shape
  del profile_steps  # the XLA breakdown is ours only
  s = args["shape"]
  d, heads, length, vocab = s["d"], s["heads"], s["seq"], s["vocab"]
  torch.manual_seed(0)

  class Layer(nn.Module):
    def __init__(self):
      super().__init__()
      self.norm_attn, self.norm_mlp = nn.LayerNorm(d), nn.LayerNorm(d)
      self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
      self.up, self.down = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x):
      b = x.shape[0]
      qkv = self.qkv(self.norm_attn(x)).reshape(b, length, 3, heads, d // heads)
      q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))
      y = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, length, d)
      x = x + self.proj(y)
      return x + self.down(F.gelu(self.up(self.norm_mlp(x))))

  class Denoiser(nn.Module):
    def __init__(self):
      super().__init__()
      self.embed = nn.Embedding(vocab + 1, d)
      self.positions = nn.Parameter(torch.zeros(length, d))
      self.time = nn.Linear(1, d)
      self.layers = nn.ModuleList([Layer() for _ in range(s["layers"])])
      self.norm = nn.LayerNorm(d)
      self.head = nn.Linear(d, vocab)

    def hidden(self, tokens, t):
      h = self.embed(tokens) + self.positions + self.time(t[:, None])[:, None]
      for layer in self.layers:
        h = layer(h)
      return self.norm(h)

  model = Denoiser()
  opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
  batch_size = s["batch"]

  def step(tokens):
    offset = torch.rand(1)
    t = ((offset + torch.arange(batch_size) / batch_size) % 1.0).clamp_min(1e-3)
    masked = torch.rand(batch_size, length) < t[:, None]
    h = model.hidden(torch.where(masked, vocab, tokens), t)
    nll = F.cross_entropy(model.head(h[masked]), tokens[masked], reduction="none")
    weight = (1.0 / t)[:, None].expand(batch_size, length)[masked]
    loss = (nll * weight).sum() / (batch_size * length)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    return loss

  if args["compile"]:
    step = torch.compile(step)
  tokens = torch.randint(0, vocab, (batch_size, length))
  t0 = time.perf_counter()
  for _ in range(3):  # compile / warm up
    step(tokens)
  reply({"compile_s": time.perf_counter() - t0, "torch": torch.__version__,
         "threads": torch.get_num_threads(), "allocator": args["allocator_applied"]})
  for line in sys.stdin:
    cmd = json.loads(line)
    if cmd["cmd"] != "steps":
      return
    times = []
    for _ in range(cmd["n"]):
      t0 = time.perf_counter()
      loss = float(step(tokens).detach())
      times.append(time.perf_counter() - t0)
    reply({"times": times, "loss": loss, "max_rss_mib": max_rss_mib()})
