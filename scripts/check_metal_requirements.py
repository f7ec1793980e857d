"""Checks, without a Mac, that requirements-metal.txt resolves for macOS on Apple silicon.

    python scripts/check_metal_requirements.py [--requirements requirements-metal.txt]
        [--platform macosx_14_0_arm64] [--python-version 3.11]

pip evaluates environment markers against the machine it runs on, not against `--platform`, so
on Linux `jax-mps==...; sys_platform == "darwin"` would be silently left out of a plain
`pip install --dry-run --platform macosx_14_0_arm64 -r requirements-metal.txt`. This script
therefore first flattens the file (its `-r` includes too), evaluating each marker for the target
(CPython 3.11 on macOS arm64), then asks pip to resolve the result as binary wheels for that
platform (`pip install --dry-run --ignore-installed --report`, into a temporary directory:
nothing is installed; a dependency published only as a pure-Python source distribution is
built into a wheel there first, as pip would build it on the Mac), and checks pip's report:
every `name==version` pin resolved at exactly that version, the Metal plugin included, and every
wheel is one a Mac on arm64 can install.

Exit status: 0 resolved; 1 does not resolve or a pin moved (one `error:` line); 3 the package
registry could not be reached (nothing was checked).
"""

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile

try:
  from packaging.markers import Marker
  from packaging.requirements import Requirement
  from packaging.utils import canonicalize_name
except ImportError:  # pip always carries a copy
  from pip._vendor.packaging.markers import Marker  # pylint: disable=g-import-not-at-top
  from pip._vendor.packaging.requirements import Requirement  # pylint: disable=g-import-not-at-top
  from pip._vendor.packaging.utils import canonicalize_name  # pylint: disable=g-import-not-at-top

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PLUGIN = "jax-mps"
UNREACHABLE = 3
# pip's words for a registry it could not reach (no network, DNS, proxy, TLS).
# (pip prints them as warnings while it retries, so the resolving run is not --quiet.)
_OFFLINE = re.compile(r"NewConnectionError|NameResolutionError|Max retries exceeded|Temporary "
                      r"failure in name resolution|Name or service not known|Network is "
                      r"unreachable|Failed to establish a new connection|ConnectTimeout|"
                      r"ReadTimeout|ProxyError|SSLError|Could not fetch URL")


def target_environment(platform: str, python_version: str) -> dict:
  """The marker environment of CPython `python_version` on `platform` (macosx_*_arm64)."""
  machine = platform.rsplit("_", 1)[-1] if platform.startswith("macosx_") else platform
  return {"sys_platform": "darwin", "platform_system": "Darwin", "os_name": "posix",
          "platform_machine": machine, "python_version": python_version,
          "python_full_version": f"{python_version}.0", "implementation_name": "cpython",
          "platform_python_implementation": "CPython", "platform_release": "",
          "platform_version": "", "implementation_version": f"{python_version}.0"}


def flatten(path: str, env: dict, seen=None) -> list[Requirement]:
  """The requirements of `path` and of the files it includes (`-r`) that apply in `env`."""
  seen = set() if seen is None else seen
  path = os.path.abspath(path)
  if path in seen:
    return []
  seen.add(path)
  out = []
  with open(path, encoding="utf-8") as f:
    for raw in f:
      line = raw.split(" #", 1)[0].strip()
      if not line or line.startswith("#"):
        continue
      if line.startswith(("-r ", "--requirement ")):
        out += flatten(os.path.join(os.path.dirname(path), line.split(None, 1)[1]), env, seen)
        continue
      if line.startswith("-"):
        raise ValueError(f"{path}: option line {line!r} is not supported by this check")
      req = Requirement(line)
      if req.marker is None or Marker(str(req.marker)).evaluate(env):
        req.marker = None
        out.append(req)
  return out


def pins(reqs: list[Requirement]) -> dict[str, str]:
  """{canonical name: version} of the exact `name==version` requirements."""
  out = {}
  for r in reqs:
    specs = list(r.specifier)
    if len(specs) == 1 and specs[0].operator == "==":
      out[canonicalize_name(r.name)] = specs[0].version
  return out


_NO_WHEEL = re.compile(r"No matching distribution found for ([A-Za-z0-9._-]+)")


def build_pure_wheel(name: str, wheeldir: str, timeout: float) -> str:
  """Builds `name` (latest) from its source distribution into `wheeldir`, as pip would on the
  Mac; returns the wheel's file name, or "" where it is not pure Python (py3-none-any), which a
  build on this machine cannot stand in for."""
  before = set(os.listdir(wheeldir))
  subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet",
                  "--disable-pip-version-check", "--no-binary", name, "-w", wheeldir, name],
                 capture_output=True, text=True, timeout=timeout, check=False)
  built = sorted(set(os.listdir(wheeldir)) - before)
  return built[0] if len(built) == 1 and built[0].endswith("-none-any.whl") else ""


def resolve(reqs: list[Requirement], platform: str, python_version: str, workdir: str,
            timeout: float = 900.0) -> tuple[int, str, dict, list[str]]:
  """pip's dry-run resolution of `reqs` as wheels for the target: (returncode, output, report,
  the wheels built here from pure-Python source distributions).

  `--platform` makes pip take wheels only. A dependency published only as a source
  distribution (tensorflow-datasets' `promise`) is built here, once, where it is pure Python
  (what pip does on the Mac), and offered to the next try through --find-links."""
  flat = os.path.join(workdir, "requirements-flat.txt")
  with open(flat, "w", encoding="utf-8") as f:
    f.write("".join(f"{r}\n" for r in reqs))
  report = os.path.join(workdir, "report.json")
  wheeldir = os.path.join(workdir, "built")
  os.makedirs(wheeldir)
  built = []
  while True:
    cmd = [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed",
           "--disable-pip-version-check", "--target", os.path.join(workdir, "t"),
           "--report", report, "--platform", platform, "--python-version", python_version,
           "--implementation", "cp", "--only-binary=:all:", "--find-links", wheeldir,
           "-r", flat]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    output = proc.stdout + proc.stderr
    missing = _NO_WHEEL.search(output)
    if proc.returncode == 0 or not missing or _OFFLINE.search(output) or len(built) >= 5:
      break
    wheel = build_pure_wheel(missing.group(1), wheeldir, timeout)
    if not wheel or wheel in built:
      break
    built.append(wheel)
  data = {}
  if proc.returncode == 0 and os.path.exists(report):
    with open(report, encoding="utf-8") as f:
      data = json.load(f)
  return proc.returncode, output, data, built


def check_report(report: dict, wanted: dict[str, str], platform: str) -> list[str]:
  """Problems with pip's report: a pin resolved at another version or missing, the plugin
  missing, or a wheel that is not for `platform`'s OS and machine."""
  got = {}
  problems = []
  machine = platform.rsplit("_", 1)[-1]
  for item in report.get("install", []):
    meta = item.get("metadata", {})
    name = canonicalize_name(meta.get("name", ""))
    got[name] = meta.get("version", "")
    wheel = item.get("download_info", {}).get("url", "").rsplit("/", 1)[-1]
    tag = wheel[:-len(".whl")].rsplit("-", 1)[-1] if wheel.endswith(".whl") else ""
    if not tag:
      problems.append(f"{name} {got[name]} resolved to {wheel or 'no file'}, not a wheel")
    elif tag != "any" and not any(t.startswith("macosx_") and t.endswith(("_" + machine,
                                                                          "_universal2"))
                                  for t in tag.split(".")):
      problems.append(f"{name} {got[name]}: wheel {wheel} is not for macOS {machine}")
  for name, version in sorted(wanted.items()):
    if got.get(name) != version:
      problems.append(f"{name}=={version} resolved as {got.get(name, 'nothing')}")
  if canonicalize_name(PLUGIN) not in got:
    problems.append(f"{PLUGIN} is not in the resolution (its marker left it out?)")
  return problems


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--requirements", default=os.path.join(REPO, "requirements-metal.txt"))
  parser.add_argument("--platform", default="macosx_14_0_arm64")
  parser.add_argument("--python-version", default="3.11")
  parser.add_argument("--timeout", type=float, default=900.0)
  args = parser.parse_args(argv)
  env = target_environment(args.platform, args.python_version)
  reqs = flatten(args.requirements, env)
  wanted = pins(reqs)
  with tempfile.TemporaryDirectory(prefix="metal-resolve-") as workdir:
    try:
      rc, output, report, built = resolve(reqs, args.platform, args.python_version, workdir,
                                   timeout=args.timeout)
    except subprocess.TimeoutExpired:
      print(f"skipped: pip did not answer within {args.timeout:.0f} s (registry unreachable?)")
      return UNREACHABLE
  if rc != 0:
    if _OFFLINE.search(output):
      print("skipped: the package registry could not be reached; nothing was checked.")
      return UNREACHABLE
    tail = " | ".join(l.strip() for l in output.strip().splitlines()[-3:])
    print(f"error: {os.path.basename(args.requirements)} does not resolve for {args.platform} "
          f"(CPython {args.python_version}): {tail} Fix: change the pins so that pip finds "
          "wheels for macOS arm64 (see the pip output above).")
    return 1
  problems = check_report(report, wanted, args.platform)
  if problems:
    print(f"error: {os.path.basename(args.requirements)} for {args.platform}: "
          f"{'; '.join(problems)}. Fix: pin versions that have macOS arm64 wheels.")
    return 1
  versions = {canonicalize_name(i["metadata"]["name"]): i["metadata"]["version"]
              for i in report["install"]}
  print(f"ok: {os.path.basename(args.requirements)} resolves for {args.platform} (CPython "
        f"{args.python_version}): {len(versions)} wheels, {PLUGIN} "
        f"{versions[canonicalize_name(PLUGIN)]}, jax {versions.get('jax')}, jaxlib "
        f"{versions.get('jaxlib')}; all {len(wanted)} pins exact" +
        (f"; built here from pure-Python sources: {', '.join(built)}" if built else "") + ".")
  return 0


if __name__ == "__main__":
  sys.exit(main())
