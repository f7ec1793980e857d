"""Loads a Hugging Face OPT checkpoint directory into `bdiff_jax.models.opt.OPT`, without PyTorch.

Getting a checkpoint (needs network access once; afterwards everything is local):

    pip install -U huggingface_hub
    hf download facebook/opt-125m --local-dir /data/opt-125m     # 250 MB
    hf download facebook/opt-1.3b --local-dir /data/opt-1.3b     # 2.6 GB
    # (`hf` is huggingface-hub's CLI; 2.x has no `huggingface-cli`)

then

    from bdiff_jax.models.hf_checkpoint import load_opt
    from bdiff_jax.data.bpe_tokenizer import load_bpe_tokenizer
    config, params = load_opt("/data/opt-125m")          # OPTConfig, nested dict of jnp arrays
    tokenizer = load_bpe_tokenizer("/data/opt-125m")

The directory needs `config.json` and one of (tried in this order):

  * `model.safetensors`, or sharded `model-0000i-of-0000n.safetensors` +
    `model.safetensors.index.json` (read with the `safetensors` numpy API);
  * `pytorch_model.bin`, or shards + `pytorch_model.bin.index.json`. These are PyTorch zip
    archives holding a pickle whose tensors point into raw storage files `<archive>/data/<key>`.
    They are read with a restricted unpickler that knows only `collections.OrderedDict`,
    `torch._utils._rebuild_tensor_v2` / `_rebuild_parameter` and the `torch.*Storage` dtypes
    (float32/float16/bfloat16/float64, int64/int32/int16/int8/uint8, bool) and turns each tensor
    into a numpy strided view of its storage; any other global is refused, so no code from the
    file runs. Old non-zip (PyTorch < 1.6) files are not supported.

Tensor names may carry the `model.` prefix (`model.decoder.layers.0.fc1.weight`, transformers'
own saves) or not (`decoder.layers.0.fc1.weight`, the original facebook/opt-* uploads).
PyTorch `Linear` weights are [out, in] and are transposed to Flax's [in, out] kernels; layer
tensors are stacked on a leading layer axis (the `nn.scan` layout). `lm_head.weight`, if stored,
must equal the token embedding (OPT ties them). A tensor the model does not expect, a missing one,
or one with the wrong shape raises `HFCheckpointError` naming it.
"""

import functools
import json
import os
import pickle
import zipfile
from typing import Any, Optional

import jax.numpy as jnp
import ml_dtypes
import numpy as np
from safetensors import safe_open

from bdiff_jax.errors import CheckpointError
from bdiff_jax.models.opt import OPTConfig, OPTConfigError

_DOWNLOAD_FIX = ("download the checkpoint with `hf download facebook/opt-125m "
                 "--local-dir DIR` and pass DIR.")
_STORAGE_DTYPES = {
    "FloatStorage": np.float32, "HalfStorage": np.float16, "BFloat16Storage": ml_dtypes.bfloat16,
    "DoubleStorage": np.float64, "LongStorage": np.int64, "IntStorage": np.int32,
    "ShortStorage": np.int16, "CharStorage": np.int8, "ByteStorage": np.uint8,
    "BoolStorage": np.bool_,
}


class HFCheckpointError(CheckpointError):
  """A Hugging Face checkpoint directory that cannot be loaded into our OPT."""


# ----------------------------------------------------------------------------- reading tensors


class _StorageType:
  """Stands in for `torch.<Name>Storage`: only carries the numpy dtype."""

  def __init__(self, dtype):
    self.dtype = np.dtype(dtype)


def _rebuild_tensor(storage, offset, size, stride, *unused, max_elements=None):
  """`torch._utils._rebuild_tensor_v2` for numpy: a strided view (then copied, contiguous).

  Every claim of the pickle is checked against the storage it views before anything is
  allocated: a tensor has no more elements than its storage (a zero or overlapping stride
  cannot make a few bytes claim gigabytes) and, with `max_elements` (the model's largest
  tensor, from config.json), no more than that."""
  size, stride = tuple(size), tuple(stride)
  if not all(isinstance(n, int) for n in size + stride) or not isinstance(offset, int):
    raise HFCheckpointError(f"a tensor has a non-integer size {size}, stride {stride} or "
                            f"offset {offset!r}.", "re-download the checkpoint file.")
  if len(size) != len(stride):
    raise HFCheckpointError(f"a tensor has size {size} but stride {stride}.",
                            "re-download the checkpoint file.")
  if not size:
    if not 0 <= offset < storage.size:
      raise HFCheckpointError(f"a scalar tensor at offset {offset} lies outside its storage of "
                              f"{storage.size} elements.", "re-download the checkpoint file.")
    return storage[offset:offset + 1].reshape(()).copy()
  if any(n < 0 for n in size) or any(s < 0 for s in stride):
    raise HFCheckpointError(f"a tensor has negative size {size} or stride {stride}.",
                            "re-download the checkpoint file.")
  numel = 1
  for n in size:
    numel *= n
  if numel > storage.size:
    raise HFCheckpointError(f"a tensor of size {size} (stride {stride}) claims {numel:,} "
                            f"elements over a storage of {storage.size:,}.",
                            "re-download the checkpoint file (a state dict's tensors never "
                            "repeat storage elements).")
  if max_elements is not None and numel > max_elements:
    raise HFCheckpointError(f"a tensor of size {size} has {numel:,} elements, more than the "
                            f"largest tensor config.json implies ({max_elements:,}).",
                            "use the config.json that came with the weights.")
  last = offset + sum((n - 1) * s for n, s in zip(size, stride)) if all(size) else offset - 1
  if offset < 0 or last >= storage.size:
    raise HFCheckpointError(f"a tensor of size {size} reaches past its storage of "
                            f"{storage.size} elements.", "re-download the checkpoint file.")
  itemsize = storage.dtype.itemsize
  view = np.lib.stride_tricks.as_strided(storage[offset:], shape=size,
                                         strides=tuple(s * itemsize for s in stride),
                                         writeable=False)
  return np.ascontiguousarray(view)


def _rebuild_parameter(data, *unused):
  return data


class _TorchUnpickler(pickle.Unpickler):
  """Unpickles a PyTorch state dict into numpy arrays, refusing every other global."""

  def __init__(self, file, archive: zipfile.ZipFile, prefix: str, path: str,
               max_elements: Optional[int] = None, max_storage_elements: Optional[int] = None):
    super().__init__(file)
    self._archive, self._prefix, self._path = archive, prefix, path
    self._max_elements = max_elements
    self._max_storage_elements = max_storage_elements
    self._storages: dict[str, np.ndarray] = {}

  def _rebuild(self, *args):
    return _rebuild_tensor(*args, max_elements=self._max_elements)

  def find_class(self, module, name):
    if (module, name) == ("collections", "OrderedDict"):
      return dict
    if module == "torch._utils" and name == "_rebuild_tensor_v2":
      return self._rebuild
    if module == "torch._utils" and name == "_rebuild_parameter":
      return _rebuild_parameter
    if module == "torch" and name in _STORAGE_DTYPES:
      return _StorageType(_STORAGE_DTYPES[name])
    raise HFCheckpointError(f"{self._path} refers to {module}.{name}, which a plain tensor state "
                            "dict does not contain; refusing to unpickle it.",
                            "use a model.safetensors or a pytorch_model.bin of tensors only.")

  def persistent_load(self, pid):
    if not (isinstance(pid, tuple) and pid and pid[0] == "storage"
            and isinstance(pid[1], _StorageType)):
      raise HFCheckpointError(f"{self._path} has an unsupported storage record {pid!r}.",
                              "re-save it with a current PyTorch, or use model.safetensors.")
    _, storage_type, key, _, numel = pid
    if key not in self._storages:
      name = f"{self._prefix}data/{key}"
      try:
        info = self._archive.getinfo(name)
      except KeyError:
        raise HFCheckpointError(f"{self._path} lacks the storage {name} a tensor refers to.",
                                "re-download the checkpoint file.") from None
      if (not isinstance(numel, int) or numel < 0 or
          info.file_size < numel * storage_type.dtype.itemsize):
        raise HFCheckpointError(f"storage {name} of {self._path} holds {info.file_size:,} bytes "
                                f"but claims {numel!r} elements of {storage_type.dtype}.",
                                "re-download the checkpoint file.")
      limit = self._max_storage_elements
      if limit is not None and info.file_size > limit * storage_type.dtype.itemsize:
        raise HFCheckpointError(  # before decompressing it
            f"storage {name} of {self._path} holds {info.file_size:,} bytes, more than all the "
            f"tensors config.json implies ({limit:,} elements).",
            "use the config.json that came with the weights.")
      raw = self._archive.read(name)
      self._storages[key] = np.frombuffer(raw, storage_type.dtype, count=numel)
    return self._storages[key]


def read_pytorch_bin(path: str, max_elements: Optional[int] = None,
                     max_storage_elements: Optional[int] = None) -> dict[str, np.ndarray]:
  """A `torch.save`d state dict (zip format) as {name: numpy array}, without importing torch.

  Each tensor's size and strides are checked against the storage it views (and, with
  `max_elements`, against the model's largest tensor) before it is materialised, and each raw
  storage file's size against `max_storage_elements` (all the model's tensors together) before it
  is decompressed, so a small crafted file cannot make the reader allocate gigabytes."""
  if not zipfile.is_zipfile(path):
    raise HFCheckpointError(f"{path} is not a zip-format PyTorch file (legacy format?).",
                            "use the checkpoint's model.safetensors instead.")
  with zipfile.ZipFile(path) as archive:
    pickles = [n for n in archive.namelist() if n.endswith("data.pkl")]
    if len(pickles) != 1:
      raise HFCheckpointError(f"{path} holds {len(pickles)} data.pkl entries, expected 1.",
                              "re-download the checkpoint file.")
    prefix = pickles[0][:-len("data.pkl")]
    with archive.open(pickles[0]) as f:
      try:
        state = _TorchUnpickler(f, archive, prefix, path, max_elements,
                                max_storage_elements).load()
      except HFCheckpointError:
        raise
      except Exception as e:
        raise HFCheckpointError(f"cannot read {path}: {e}", "re-download the checkpoint file.") from e
  if not isinstance(state, dict) or not all(isinstance(v, np.ndarray) for v in state.values()):
    raise HFCheckpointError(f"{path} is not a dict of tensors.", "point at a model state dict.")
  return state


def read_safetensors(path: str) -> dict[str, np.ndarray]:
  """A `.safetensors` file as {name: numpy array} (bfloat16 via ml_dtypes)."""
  try:
    with safe_open(path, framework="np") as f:
      return {k: f.get_tensor(k) for k in f.keys()}
  except Exception as e:  # safetensors raises its own SafetensorError / OSError
    raise HFCheckpointError(f"cannot read {path}: {e}", "re-download the checkpoint file.") from e


def _read_sharded(directory: str, index_name: str, reader) -> dict[str, np.ndarray]:
  index_path = os.path.join(directory, index_name)
  try:
    with open(index_path, encoding="utf-8") as f:
      weight_map = json.load(f)["weight_map"]
  except (OSError, ValueError, KeyError, TypeError) as e:
    raise HFCheckpointError(f"{index_path} is not a valid shard index ({e}).",
                            "re-download the checkpoint.") from e
  state = {}
  for shard in sorted(set(weight_map.values())):
    shard_path = os.path.join(directory, shard)
    if not os.path.isfile(shard_path):
      raise HFCheckpointError(f"shard {shard_path} listed in {index_name} is missing.",
                              "download all shards of the checkpoint.")
    state.update(reader(shard_path))
  return state


def read_state_dict(directory: str | os.PathLike, max_elements: Optional[int] = None,
                    max_storage_elements: Optional[int] = None) -> dict[str, np.ndarray]:
  """All tensors of a HF checkpoint directory (safetensors preferred over pytorch_model.bin);
  the bounds apply to a pytorch_model.bin (see `read_pytorch_bin`)."""
  directory = os.fspath(directory)
  read_bin = functools.partial(read_pytorch_bin, max_elements=max_elements,
                               max_storage_elements=max_storage_elements)
  candidates = (
      ("model.safetensors", lambda: read_safetensors(os.path.join(directory, "model.safetensors"))),
      ("model.safetensors.index.json",
       lambda: _read_sharded(directory, "model.safetensors.index.json", read_safetensors)),
      ("pytorch_model.bin", lambda: read_bin(os.path.join(directory, "pytorch_model.bin"))),
      ("pytorch_model.bin.index.json",
       lambda: _read_sharded(directory, "pytorch_model.bin.index.json", read_bin)),
  )
  for name, read in candidates:
    if os.path.isfile(os.path.join(directory, name)):
      return read()
  present = sorted(os.listdir(directory)) if os.path.isdir(directory) else "no such directory"
  raise HFCheckpointError(f"{directory} has no model.safetensors or pytorch_model.bin "
                          f"(found: {present}).", _DOWNLOAD_FIX)


# ----------------------------------------------------------------------------- config and params


def load_opt_config(directory: str | os.PathLike) -> OPTConfig:
  """`OPTConfig` from `<directory>/config.json`; raises OPTConfigError / HFCheckpointError."""
  path = os.path.join(os.fspath(directory), "config.json")
  try:
    with open(path, encoding="utf-8") as f:
      data = json.load(f)
  except FileNotFoundError as e:
    raise HFCheckpointError(f"{path} does not exist.", _DOWNLOAD_FIX) from e
  except (OSError, ValueError) as e:
    raise OPTConfigError(f"{path} is not valid JSON ({e}).", "re-download config.json.") from e
  if not isinstance(data, dict):
    raise OPTConfigError(f"{path} does not hold a JSON object.", "re-download config.json.")
  return OPTConfig.from_hf_dict(data)


def _expected_shapes(cfg: OPTConfig) -> dict[str, tuple[int, ...]]:
  """HF tensor name (without prefix) -> PyTorch shape, for every tensor the model needs."""
  d, e, f = cfg.hidden_size, cfg.word_embed_proj_dim, cfg.ffn_dim
  shapes = {"decoder.embed_tokens.weight": (cfg.vocab_size, e),
            "decoder.embed_positions.weight": (cfg.max_position_embeddings + 2, d)}
  if cfg.has_projections:
    shapes["decoder.project_in.weight"] = (d, e)
    shapes["decoder.project_out.weight"] = (e, d)
  ln = ("weight", "bias") if cfg.layer_norm_elementwise_affine else ()
  if cfg.has_final_layer_norm:
    shapes.update({f"decoder.final_layer_norm.{p}": (d,) for p in ln})
  linear = ("weight", "bias") if cfg.enable_bias else ("weight",)
  for i in range(cfg.num_hidden_layers):
    layer = f"decoder.layers.{i}."
    for name, (n_out, n_in) in (("self_attn.q_proj", (d, d)), ("self_attn.k_proj", (d, d)),
                                ("self_attn.v_proj", (d, d)), ("self_attn.out_proj", (d, d)),
                                ("fc1", (f, d)), ("fc2", (d, f))):
      for p in linear:
        shapes[f"{layer}{name}.{p}"] = (n_out, n_in) if p == "weight" else (n_out,)
    for name in ("self_attn_layer_norm", "final_layer_norm"):
      shapes.update({f"{layer}{name}.{p}": (d,) for p in ln})
  return shapes


def _flax_leaf(path: list[str], array: np.ndarray) -> tuple[list[str], np.ndarray]:
  """HF module path + param name -> Flax path, converting the array layout."""
  *module, kind = path
  if kind == "bias":
    return module + ["bias"], array
  if module[-1] in ("embed_tokens", "embed_positions"):
    return module + ["embedding"], array
  if module[-1].endswith("layer_norm"):
    return module + ["scale"], array
  return module + ["kernel"], array.T  # Linear: [out, in] -> [in, out]


def hf_to_flax_params(state: dict[str, np.ndarray], cfg: OPTConfig,
                      dtype: Any = jnp.float32) -> dict[str, Any]:
  """Maps a HF OPT state dict onto the `OPT` param tree (arrays cast to `dtype`).

  Raises:
    HFCheckpointError: a tensor is missing, unexpected or mis-shaped (the message names it), or
      a stored `lm_head.weight` differs from the token embedding.
  """
  stripped = {}
  for name, array in state.items():
    key = name[len("model."):] if name.startswith("model.") else name
    if key in stripped:
      raise HFCheckpointError(f"the checkpoint holds {name} twice (with and without 'model.').",
                              "use a checkpoint with one copy of each tensor.")
    stripped[key] = array
  lm_head = stripped.pop("lm_head.weight", None)
  expected = _expected_shapes(cfg)
  missing = [k for k in expected if k not in stripped]
  unexpected = sorted(k for k in stripped if k not in expected)
  if missing:
    raise HFCheckpointError(
        f"the checkpoint lacks tensor {missing[0]}" + (f" (and {len(missing) - 1} more)"
                                                       if len(missing) > 1 else "") + ".",
        "check that config.json belongs to these weights, or re-download the checkpoint.")
  if unexpected:
    raise HFCheckpointError(
        f"the checkpoint has unexpected tensor {unexpected[0]}" + (
            f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else "") + ".",
        "check that config.json belongs to these weights (an OPT checkpoint).")
  for name, shape in expected.items():
    if tuple(stripped[name].shape) != shape:
      raise HFCheckpointError(f"tensor {name} has shape {tuple(stripped[name].shape)}, config.json "
                              f"implies {shape}.", "use the config.json that came with the weights.")
  embedding = stripped["decoder.embed_tokens.weight"]
  if lm_head is not None and (lm_head.shape != embedding.shape or not np.array_equal(
      lm_head.astype(np.float32), embedding.astype(np.float32))):
    raise HFCheckpointError("tensor lm_head.weight differs from decoder.embed_tokens.weight; "
                            "only OPT's tied LM head is supported.", "use a tied OPT checkpoint.")

  params: dict[str, Any] = {}
  layers: dict[tuple[str, ...], list[np.ndarray]] = {}
  for name in expected:
    parts = name.split(".")[1:]  # drop "decoder"
    if parts[0] == "layers":
      flax_path, array = _flax_leaf(parts[2:], stripped[name])
      layers.setdefault(tuple(flax_path), []).append(array)  # layer order: expected is sorted
    else:
      flax_path, array = _flax_leaf(parts, stripped[name])
      _set(params, flax_path, jnp.asarray(array.astype(np.float32), dtype))
  for flax_path, arrays in layers.items():
    stacked = np.stack([a.astype(np.float32) for a in arrays])
    _set(params, ["layers", *flax_path], jnp.asarray(stacked, dtype))
  return params


def _set(tree: dict, path: list[str], value) -> None:
  for key in path[:-1]:
    tree = tree.setdefault(key, {})
  tree[path[-1]] = value


def load_opt(directory: str | os.PathLike, *,
             dtype: Any = jnp.float32) -> tuple[OPTConfig, dict[str, Any]]:
  """(config, params) of the HF OPT checkpoint in `directory`, params cast to `dtype`.

  Use as `OPT(config).apply({"params": params}, input_ids, attention_mask)`.
  """
  config = load_opt_config(directory)
  sizes = [int(np.prod(shape)) for shape in _expected_shapes(config).values()]
  # Storages: every tensor, plus a stored lm_head.weight (a copy of the token embedding).
  total = sum(sizes) + config.vocab_size * config.word_embed_proj_dim
  state = read_state_dict(directory, max_elements=max(sizes), max_storage_elements=total)
  return config, hf_to_flax_params(state, config, dtype)
