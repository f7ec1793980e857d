"""Fetching a missing GLUE / SuperGLUE task from its official location (online use only).

`download_task(task, root)` returns `<root>/<TASK>` at once when the task's files are there;
otherwise it downloads the official zip, unpacks only the task's folder into a temporary
directory, checks every split with `load_split` (published row counts included) and only then
renames it into place, so an interrupted or foreign download never leaves a half-written task
directory. It never overwrites: a task directory that exists but lacks files is an error.

MRPC is not hosted as a zip by GLUE: like GLUE's download script, we fetch Microsoft's
`msr_paraphrase_train.txt` (via SentEval's mirror) and GLUE's list of dev pairs, and split the
former into `train.tsv` / `dev.tsv` (`build_mrpc`).

Offline, every failure is a `DataError` saying where to put the files instead. No test needs the
network: the URLs are parameters, and `file://` URLs work.
"""

import os
import shutil
import tempfile
import urllib.error
import urllib.request
import zipfile

from bdiff_jax.errors import DataError
from bdiff_jax.glue import readers as glue_readers
from bdiff_jax.glue import tasks as glue_tasks

_GLUE = "https://dl.fbaipublicfiles.com/glue/data/"
_SUPERGLUE = "https://dl.fbaipublicfiles.com/glue/superglue/data/v2/"

# task -> (zip URL, the task's folder inside the zip).
ZIP_URLS: dict[str, tuple[str, str]] = {
    "CoLA": (_GLUE + "CoLA.zip", "CoLA"),
    "SST-2": (_GLUE + "SST-2.zip", "SST-2"),
    "QQP": (_GLUE + "QQP-clean.zip", "QQP"),
    "STS-B": (_GLUE + "STS-B.zip", "STS-B"),
    "MNLI": (_GLUE + "MNLI.zip", "MNLI"),
    "QNLI": (_GLUE + "QNLIv2.zip", "QNLI"),
    "RTE": (_GLUE + "RTE.zip", "RTE"),
    "WNLI": (_GLUE + "WNLI.zip", "WNLI"),
    "BoolQ": (_SUPERGLUE + "BoolQ.zip", "BoolQ"),
    "CB": (_SUPERGLUE + "CB.zip", "CB"),
    "COPA": (_SUPERGLUE + "COPA.zip", "COPA"),
    "WiC": (_SUPERGLUE + "WiC.zip", "WiC"),
    "SuperGLUE-RTE": (_SUPERGLUE + "RTE.zip", "RTE"),
    "WSC": (_SUPERGLUE + "WSC.zip", "WSC"),
    "MultiRC": (_SUPERGLUE + "MultiRC.zip", "MultiRC"),
}
MRPC_URLS = {
    "train": "https://dl.fbaipublicfiles.com/senteval/senteval_data/msr_paraphrase_train.txt",
    "dev_ids": "https://dl.fbaipublicfiles.com/glue/data/mrpc_dev_ids.tsv",
}


def _fetch(url: str, dest: str, spec: glue_tasks.TaskSpec, root: str, timeout: float) -> None:
  try:
    with urllib.request.urlopen(url, timeout=timeout) as response, open(dest, "wb") as out:
      shutil.copyfileobj(response, out)
  except (urllib.error.URLError, OSError, ValueError) as e:
    reason = getattr(e, "reason", None) or getattr(e, "strerror", None) or e
    raise DataError(f"could not download {spec.name} from {url} ({reason}).",
                    glue_tasks.location_fix(spec, root)) from None


def _extract_folder(zip_path: str, folder: str, dest: str, spec: glue_tasks.TaskSpec,
                    root: str) -> None:
  """Extracts the members under `folder/` of the zip into `dest/folder/`."""
  try:
    with zipfile.ZipFile(zip_path) as z:
      members = [m for m in z.namelist() if m.startswith(folder + "/")]
      for m in members:
        parts = m.split("/")
        if m.startswith("/") or ".." in parts:
          raise DataError(f"{spec.name} zip {zip_path} has an unsafe member name {m!r}.",
                          glue_tasks.location_fix(spec, root))
      if not members:
        raise DataError(f"{spec.name} zip {zip_path} has no {folder}/ folder.",
                        glue_tasks.location_fix(spec, root))
      z.extractall(dest, members=members)
  except zipfile.BadZipFile:
    raise DataError(f"{spec.name} download {zip_path} is not a zip archive.",
                    glue_tasks.location_fix(spec, root)) from None


def build_mrpc(msr_train_path: str, dev_ids_path: str, out_dir: str) -> None:
  """Writes MRPC's `train.tsv` and `dev.tsv` from Microsoft's train file and GLUE's dev ids.

  Rows of `msr_train_path` (header `Quality, #1 ID, #2 ID, #1 String, #2 String`, possibly with a
  byte-order mark) whose (#1 ID, #2 ID) pair is listed in `dev_ids_path` (two tab-separated ids
  per line) go to dev.tsv, the others to train.tsv; both keep the header.
  """
  spec = glue_tasks.task_spec("MRPC")
  with open(dev_ids_path, encoding="utf-8-sig") as f:
    dev_ids = {tuple(line.strip().split("\t")[:2]) for line in f if line.strip()}
  with open(msr_train_path, encoding="utf-8-sig") as f:
    lines = [ln.rstrip("\r\n") for ln in f]
  header, rows = lines[0], [ln for ln in lines[1:] if ln.strip()]
  if header.split("\t") != list(spec.header):
    raise DataError(f"MRPC source {msr_train_path} line 1: header {header.split(chr(9))} is not "
                    f"{list(spec.header)}.", "re-download msr_paraphrase_train.txt.")
  os.makedirs(out_dir, exist_ok=True)
  with open(os.path.join(out_dir, "train.tsv"), "w", encoding="utf-8", newline="\n") as tr, \
      open(os.path.join(out_dir, "dev.tsv"), "w", encoding="utf-8", newline="\n") as dv:
    tr.write(header + "\n")
    dv.write(header + "\n")
    for n, row in enumerate(rows, start=2):
      fields = row.split("\t")
      if len(fields) != 5:
        raise DataError(f"MRPC source {msr_train_path} line {n} has {len(fields)} fields, "
                        "expected 5.", "re-download msr_paraphrase_train.txt.")
      (dv if (fields[1], fields[2]) in dev_ids else tr).write(row + "\n")


def download_task(task: str, glue_dir: str | os.PathLike | None = None, *,
                  url: str | None = None, mrpc_urls: dict[str, str] | None = None,
                  verify_counts: bool = True, timeout: float = 120.0) -> str:
  """Makes `<root>/<TASK>` hold the task's labelled splits, downloading them if missing.

  Args:
    task: a task name in `glue_tasks.TASKS`.
    glue_dir: the data root (default: BDIFF_GLUE_DIR / BDIFF_SUPERGLUE_DIR); created if absent.
    url: the zip to fetch instead of `ZIP_URLS[task]` (e.g. a mirror or a file:// URL).
    mrpc_urls: for MRPC, {"train": ..., "dev_ids": ...} instead of `MRPC_URLS`.
    verify_counts: require the published row counts before moving the files into place.
    timeout: seconds per network read.

  Returns:
    The task directory.

  Raises:
    DataError: the directory exists but is incomplete, the download fails, or the downloaded
      files are not the task's (one line with the manual fix).
  """
  spec = glue_tasks.task_spec(task)
  root = glue_tasks.resolve_data_dir(spec.name, glue_dir)
  task_dir = os.path.join(root, spec.directory)
  missing = [f for f in spec.files.values() if not os.path.isfile(os.path.join(task_dir, f))]
  if not missing:
    return task_dir
  if os.path.exists(task_dir):
    raise DataError(f"{spec.name} directory {task_dir} exists but lacks {', '.join(missing)}; "
                    "not overwriting it.", f"move {task_dir} away and download again, or "
                    + glue_tasks.location_fix(spec, root))
  os.makedirs(root, exist_ok=True)
  with tempfile.TemporaryDirectory(prefix=f".{spec.directory}-download-", dir=root) as tmp:
    staged = os.path.join(tmp, "staged")
    if spec.name == "MRPC":
      urls = dict(MRPC_URLS, **(mrpc_urls or {}))
      src, ids = os.path.join(tmp, "msr_train.txt"), os.path.join(tmp, "dev_ids.tsv")
      _fetch(urls["train"], src, spec, root, timeout)
      _fetch(urls["dev_ids"], ids, spec, root, timeout)
      build_mrpc(src, ids, os.path.join(staged, spec.directory))
    else:
      zip_url, folder = ZIP_URLS[spec.name]
      zip_path = os.path.join(tmp, "task.zip")
      _fetch(url or zip_url, zip_path, spec, root, timeout)
      _extract_folder(zip_path, folder, staged, spec, root)
      if folder != spec.directory:
        os.rename(os.path.join(staged, folder), os.path.join(staged, spec.directory))
    for split in spec.splits:   # raises DataError before anything is moved into place
      glue_readers.load_split(spec.name, split, staged, verify_counts=verify_counts)
    os.rename(os.path.join(staged, spec.directory), task_dir)
  return task_dir
