"""Build, here, what the GPU box needs beyond its own torch for benchmarks/gpu_check.sh, as
folders that device calls carry (docs/gpu.md). Standard library only; needs pip and network.

    python benchmarks/gpu_bundle.py [DEST] [--python 3.12] [--part-mib 55] [--full-base] [--no-dali]

DEST (default .gpu_bundle, git-ignored: the device tool carries only paths inside the repo):
- base/: a wheelhouse (pip download --only-binary=:all: for manylinux x86-64, CPython
  --python) of pytest, tqdm, Pillow and torchvision 0.26 (--no-deps: the build for the box's
  torch 2.11, so it pulls no other torch); --full-base adds numpy and matplotlib. Its
  requirements.txt says which module proves each one present: gpu_setup.sh installs only
  what does not import (the box's image already holds all of them, per the device notes).
- dali-part1/, dali-part2/, ...: nvidia-dali-cuda130 with the dependencies the box lacks,
  repacked (other CPython versions' extension modules and C++ headers dropped, wheels
  stored uncompressed) into one dali.tar.xz, split into --part-mib parts, one folder per
  part, each with dali.parts (the part names in order) and dali.sha256 (of the whole
  archive). gpu_setup.sh on the box collects the parts over back-to-back calls, reassembles
  (cat), checks the sha256 and installs offline.
Left out of the DALI set: what the box's image has (numpy, packaging, six, PyYAML,
typing-extensions, wheel) and nvCOMP (27 MiB; DALI loads it only for compressed arrays,
which no loader here reads). nvJPEG2000 and nvTIFF stay (6 MiB): without them nvImageCodec
prints an [ERROR] line at every start, though JPEG decoding works.
The box runs Python 3.12.3 (/work/.library/device/KINDS.md), hence the default --python.
"""
from __future__ import annotations

import argparse
import hashlib
import io
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

MIB = 1 << 20
PLATFORMS = ["manylinux2014_x86_64", "manylinux1_x86_64"] + [
    f"manylinux_2_{n}_x86_64" for n in (17, 24, 27, 28, 31, 34, 35)]
BASE = {"pytest": "pytest", "tqdm": "tqdm", "pillow": "PIL"}          # requirement -> module
FULL_BASE = {"numpy": "numpy", "matplotlib": "matplotlib"}
TORCHVISION = "torchvision==0.26.*"                                   # the release for torch 2.11
DALI = "nvidia-dali-cuda130==2.4.0"
DALI_SKIP = {"numpy", "packaging", "six", "pyyaml", "typing_extensions", "wheel", "nvidia_libnvcomp_cu13"}
EXT = re.compile(r"\.cpython-(\d+t?)-x86_64-linux-gnu\.so$")


def pip_download(dest: Path, python: str, reqs: list[str], deps: bool = True) -> None:
    cmd = [sys.executable, "-m", "pip", "download", "-q", "--only-binary=:all:", "--implementation", "cp",
           "--python-version", python, "-d", str(dest)]
    cmd += [a for p in PLATFORMS for a in ("--platform", p)] + ([] if deps else ["--no-deps"]) + reqs
    subprocess.run(cmd, check=True)


def dist_name(wheel: Path) -> str:
    return wheel.name.split("-")[0].lower()


def repack(wheel: Path, dest: Path, python: str) -> None:
    """`wheel` rewritten into `dest` uncompressed (so xz compresses the contents), without
    extension modules for other CPython versions or C++ headers; RECORD lists what stays."""
    tag = python.replace(".", "")
    drop = lambda n: (m := EXT.search(n)) and m.group(1) != tag or "/include/" in n  # noqa: E731
    with zipfile.ZipFile(wheel) as src, zipfile.ZipFile(dest / wheel.name, "w", zipfile.ZIP_STORED) as out:
        for info in src.infolist():
            if drop(info.filename):
                continue
            data = src.read(info)
            if info.filename.endswith(".dist-info/RECORD"):
                data = "".join(line for line in io.StringIO(data.decode()) if not drop(line.split(",")[0])).encode()
            info.compress_type = zipfile.ZIP_STORED
            out.writestr(info, data)


def split_file(path: Path, dest: Path, part_bytes: int, prefix: str = "dali") -> list[Path]:
    """`path` cut into numbered folders dest/PREFIX-part1, ... of at most part_bytes each;
    every folder also holds PREFIX.parts (part names in order) and PREFIX.sha256 (sha256sum
    format, of the whole file) so the box can tell when it has them all and check them."""
    data_sha, names, folders = hashlib.sha256(), [], []
    with open(path, "rb") as f:
        while chunk := f.read(part_bytes):
            data_sha.update(chunk)
            names.append(f"{path.name}.part{len(names) + 1}")
            folder = dest / f"{prefix}-part{len(names)}"
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir(parents=True)
            (folder / names[-1]).write_bytes(chunk)
            folders.append(folder)
    for folder in folders:
        (folder / f"{prefix}.parts").write_text("".join(n + "\n" for n in names))
        (folder / f"{prefix}.sha256").write_text(f"{data_sha.hexdigest()}  {path.name}\n")
    return folders


def size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.is_dir() else path.stat().st_size


def tree_size(root: Path) -> int:
    """Bytes of the working tree a device call sends (tracked + untracked, not ignored)."""
    r = subprocess.run(["git", "ls-files", "-z", "-co", "--exclude-standard"], cwd=root, capture_output=True)
    return sum((root / n).stat().st_size for n in r.stdout.decode().split("\0") if n and (root / n).is_file())


def build_base(dest: Path, python: str, full: bool) -> None:
    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir(parents=True)
    reqs = {**BASE, **(FULL_BASE if full else {})}
    pip_download(dest, python, list(reqs))
    pip_download(dest, python, [TORCHVISION], deps=False)
    lines = [f"{r} {m}\n" for r, m in {**reqs, "torchvision": "torchvision"}.items()]
    (dest / "requirements.txt").write_text("# requirement module: installed on the box when module does not import\n"
                                          + "".join(lines))


def build_dali(dest: Path, python: str, part_bytes: int) -> list[Path]:
    for old in dest.glob("dali-part*"):
        shutil.rmtree(old)
    with tempfile.TemporaryDirectory() as tmp:
        got, packed = Path(tmp, "download"), Path(tmp, "wheels")
        packed.mkdir()
        pip_download(got, python, [DALI])
        for wheel in sorted(got.glob("*.whl")):
            if dist_name(wheel) not in DALI_SKIP:
                repack(wheel, packed, python)
        archive = Path(tmp, "dali.tar.xz")
        with tarfile.open(archive, "w:xz", preset=6) as tar:
            for wheel in sorted(packed.iterdir()):
                tar.add(wheel, arcname=wheel.name)
        print(f"dali.tar.xz: {size(archive) / MIB:.1f} MiB from {size(got) / MIB:.1f} MiB of wheels "
              f"({', '.join(sorted(w.name for w in packed.iterdir()))})")
        return split_file(archive, dest, part_bytes)


def report(dest: Path, root: Path, limit_mib: float = 64) -> None:
    """Sizes, and which folders to carry in which call (each call: tree + carried <= limit)."""
    tree = tree_size(root) / MIB
    folders = {p.name: size(p) / MIB for p in sorted(dest.iterdir()) if p.is_dir()}
    print(f"working tree sent with every call: {tree:.1f} MiB")
    for name, mib in folders.items():
        print(f"  {dest.name}/{name}: {mib:.1f} MiB")
    parts = sorted((n for n in folders if n.startswith("dali-part")), key=lambda n: folders[n])
    calls = [[p] for p in parts] or [[]]
    if "base" in folders:   # with the smallest part if it fits there, else a call of its own
        fits = tree + folders["base"] + sum(folders[p] for p in calls[0]) <= limit_mib
        calls[0] = ["base", *calls[0]] if fits else calls[0]
        calls += [] if fits else [["base"]]
    for i, call in enumerate(calls, 1):
        total = tree + sum(folders[n] for n in call)
        flag = "" if total <= limit_mib else f"  OVER the {limit_mib:.0f} MiB a call carries"
        print(f"call {i}: carry {[f'{dest.name}/{n}' for n in call]}: {total:.1f} MiB{flag}")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("dest", nargs="?", default=".gpu_bundle")
    ap.add_argument("--python", default="3.12", help="the box's Python (3.12.3 per the device notes)")
    ap.add_argument("--part-mib", type=float, default=55, help="size of each DALI part")
    ap.add_argument("--full-base", action="store_true", help="also numpy and matplotlib (the box has both)")
    ap.add_argument("--no-dali", action="store_true")
    args = ap.parse_args(argv)
    root, dest = Path(__file__).resolve().parents[1], Path(args.dest).resolve()
    dest.mkdir(parents=True, exist_ok=True)
    build_base(dest / "base", args.python, args.full_base)
    if not args.no_dali:
        build_dali(dest, args.python, int(args.part_mib * MIB))
    report(dest, root)


if __name__ == "__main__":
    main()
