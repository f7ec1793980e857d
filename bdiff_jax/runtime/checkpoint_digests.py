"""Digest manifests of checkpoint step directories: written after a commit, checked before a
restore (the policy is described in `checkpointing`).

`<step_dir>/bdiff_digests.json` = {"format": 1, "step": N, "created": unix time,
"files": {path relative to step_dir: {"size": bytes, "sha256": hex}}} for every file of the step
directory except the manifest itself. A step saved by this code also carries
`{"bdiff_digests": 1}` in orbax's own step metadata (`_CHECKPOINT_METADATA`, committed atomically
with the checkpoint), which tells a step that must have a manifest from one written before
manifests existed.
"""

import hashlib
import json
import os
import time
from typing import Optional

MANIFEST_NAME = "bdiff_digests.json"
MANIFEST_FORMAT = 1
# Written into orbax's step metadata (custom_metadata) at save: "this step must have a manifest".
MARKER_KEY = "bdiff_digests"
_CHUNK = 1 << 22


def _sha256(path: str) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(_CHUNK), b""):
      h.update(chunk)
  return h.hexdigest()


def _files(step_dir: str) -> list[str]:
  """Relative paths of every file under `step_dir`, except our manifest (and its temp files)."""
  out = []
  for root, _, names in os.walk(step_dir):
    for name in names:
      rel = os.path.relpath(os.path.join(root, name), step_dir)
      if rel == MANIFEST_NAME or rel.startswith(f".{MANIFEST_NAME}."):
        continue
      out.append(rel)
  return sorted(out)


def write_manifest(step_dir: str, step: int) -> dict:
  """Writes `<step_dir>/bdiff_digests.json` (temp file + rename) and returns it.

  Format: {"format": 1, "step": step, "created": unix time,
           "files": {relative path: {"size": bytes, "sha256": hex}}}.
  """
  files = {}
  for rel in _files(step_dir):
    path = os.path.join(step_dir, rel)
    files[rel] = {"size": os.path.getsize(path), "sha256": _sha256(path)}
  manifest = {"format": MANIFEST_FORMAT, "step": int(step), "created": time.time(),
              "files": files}
  tmp = os.path.join(step_dir, f".{MANIFEST_NAME}.{os.getpid()}.tmp")
  with open(tmp, "w", encoding="utf-8") as f:
    json.dump(manifest, f, indent=1, sort_keys=True)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, os.path.join(step_dir, MANIFEST_NAME))
  return manifest


def _is_marked(step_dir: str) -> Optional[bool]:
  """Whether orbax's step metadata carries our marker (None: the metadata is unreadable)."""
  try:
    with open(os.path.join(step_dir, "_CHECKPOINT_METADATA"), encoding="utf-8") as f:
      meta = json.load(f)
  except FileNotFoundError:
    return False
  except (OSError, ValueError):
    return None
  custom = meta.get("custom_metadata") if isinstance(meta, dict) else None
  return isinstance(custom, dict) and MARKER_KEY in custom


def check_step_dir(step_dir: str, step: int) -> tuple[str, str]:
  """Verifies one step directory against its manifest.

  Returns:
    ("ok", ""), ("unverified", why) for a step written before digests existed, ("unfinished",
    why) for a step written with digests whose manifest is missing (the process died between
    orbax's commit and the manifest, or the file was deleted), or ("corrupt", what is wrong,
    naming the file).
  """
  path = os.path.join(step_dir, MANIFEST_NAME)
  try:
    with open(path, encoding="utf-8") as f:
      manifest = json.load(f)
  except FileNotFoundError:
    marked = _is_marked(step_dir)
    if marked is False:
      return "unverified", "it was written before checkpoint digests existed"
    if marked is None:
      return "corrupt", f"{os.path.join(step_dir, '_CHECKPOINT_METADATA')} is unreadable"
    return "unfinished", (f"{path} is missing although the checkpoint was written with digests "
                          "(the run was killed while finishing it, or the file was deleted), so "
                          "its files cannot be verified")
  except (OSError, ValueError) as e:
    return "corrupt", f"{path} is unreadable ({type(e).__name__})"
  files = manifest.get("files") if isinstance(manifest, dict) else None
  if not isinstance(files, dict) or manifest.get("step") != int(step):
    return "corrupt", f"{path} is malformed or belongs to another step"
  present = set(_files(step_dir))
  for rel in sorted(files):
    if rel not in present:
      return "corrupt", f"{os.path.join(step_dir, rel)} is missing"
  for rel in sorted(present - set(files)):
    return "corrupt", f"{os.path.join(step_dir, rel)} was not part of the checkpoint"
  for rel, expected in sorted(files.items()):  # sizes first: cheap, catches truncation
    size = os.path.getsize(os.path.join(step_dir, rel))
    if size != expected.get("size"):
      return "corrupt", (f"{os.path.join(step_dir, rel)} has {size:,} bytes, expected "
                         f"{expected.get('size'):,} (truncated or overwritten)")
  for rel, expected in sorted(files.items()):
    if _sha256(os.path.join(step_dir, rel)) != expected.get("sha256"):
      return "corrupt", (f"{os.path.join(step_dir, rel)} does not match its SHA-256 digest "
                         "(its bytes changed after it was written)")
  return "ok", ""
