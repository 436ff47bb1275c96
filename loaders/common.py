"""Helpers shared by every loader backend and the engine: the one place for each of them.

- `ConfigError`: bad user input; one line (what, where, how to fix), printed without a
  traceback, exit 2.
- `atomic_path` / `atomic_write`: every file the project writes (manifests, decoded caches,
  .beton files, checkpoints, metrics) goes through a temp file in the same folder, fsync,
  then rename, so a kill or a full disk leaves the previous version intact. `DISK_FULL` are
  the errnos that mean "no space".
- `file_lock`: an exclusive lock on a lock file for every check-and-build of a cache; a dead
  holder never blocks, a long wait says on whom it waits.
- `remove_stale_temps` / `die_with_parent`: no temp file and no worker process outlives a
  killed writer (temp names carry the writer's pid; workers die with their parent).
- `device_free_bytes`: what can still be allocated on a device (CUDA free memory, CPU
  MemAvailable).
- `read_rgb`: one image file -> uint8 CHW RGB tensor (PIL, as torchvision's ImageFolder).
- `storage_size` / `storage_view` / `view_of`: the size a split is kept at by loaders that
  store decoded pixels, and what those pixels are (native, stretched, the eval view).

Loader backends never import each other; what two of them need lives here.
"""
from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import multiprocessing
import os
import signal
import stat
import sys
import tempfile
import time
from pathlib import Path

import torch

DISK_FULL = (errno.ENOSPC, errno.EDQUOT)
_PR_SET_PDEATHSIG = 1             # <linux/prctl.h>


class ConfigError(ValueError):
    """Bad user input. The message is one line: what is wrong, where, and how to fix it.
    The CLIs print it without a traceback and exit with code 2."""


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike):
    """Yield a temp path beside `path`; on success it is renamed over `path`.

    On any failure (including a full disk) the temp file is removed and `path` keeps its
    previous content."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_beside(path)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write(path: str | os.PathLike, data: bytes | str) -> None:
    with atomic_path(path) as tmp:
        Path(tmp).write_bytes(data.encode() if isinstance(data, str) else data)


def temp_beside(path: str | os.PathLike) -> Path:
    """A new empty file `.<name>.<pid>.<random>.tmp` beside `path`: the writer's pid in the
    name tells `remove_stale_temps` whether its writer still lives."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    return Path(tmp)


def _temp_pid(name: str) -> int | None:
    """The writer's pid in a temp name `.<name>.<pid>.<random>.tmp`; None for other names."""
    parts = name[1:-len(".tmp")].split(".")
    return int(parts[-2]) if len(parts) >= 3 and parts[-2].isdigit() else None


def pid_alive(pid: int) -> bool:
    """Whether process `pid` runs on this host (a zombie counts as dead)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except FileNotFoundError:
        return False
    except OSError:                            # no /proc
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            pass
        return True


def remove_stale_temps(folder: str | os.PathLike, pattern: str = ".*.tmp", *, recursive: bool = False,
                       legacy_age: float = 3600.0) -> list[Path]:
    """Delete the temp files (`pattern`) in `folder` left by writers that died: those whose
    pid (`temp_beside` names) is no live process here, and those without a pid (older
    versions' names) last modified over `legacy_age` seconds ago. Returns what was deleted.

    Pids are this host's: call it where one host writes the folder, or under the lock every
    writer of those files holds (then no other writer can be mid-write)."""
    folder = Path(folder)
    removed = []
    for p in (folder.rglob if recursive else folder.glob)(pattern):
        try:
            st = p.lstat()
        except FileNotFoundError:
            continue
        if stat.S_ISDIR(st.st_mode) or not p.name.endswith(".tmp"):
            continue
        pid = _temp_pid(p.name)
        stale = not pid_alive(pid) if pid is not None else time.time() - st.st_mtime > legacy_age
        if stale:
            with contextlib.suppress(FileNotFoundError):
                p.unlink()
                removed.append(p)
    return removed


def die_with_parent(parent_pid: int | None = None) -> None:
    """In a worker process: be SIGKILLed by the kernel when the parent dies (Linux
    `PR_SET_PDEATHSIG`; a no-op elsewhere), so no worker outlives a killed run. Call it
    first thing in the worker (a Process's run, a Pool initializer, a worker_init_fn).

    `parent_pid` (default: multiprocessing's parent process) closes the race of a parent
    that died before the call: the worker then kills itself. Note: the signal follows the
    parent *thread* that forked the worker; fork workers from a thread that outlives them."""
    if not sys.platform.startswith("linux"):
        return
    if ctypes.CDLL(None).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        return
    if parent_pid is None:
        parent = multiprocessing.parent_process()
        parent_pid = parent.pid if parent is not None else None
    # Reparented already: the parent died before the prctl. (Under forkserver the direct
    # parent is the server, not `parent_pid`: so ask whether `parent_pid` still lives.)
    if parent_pid is not None and os.getppid() != parent_pid and not pid_alive(parent_pid):
        os.kill(os.getpid(), signal.SIGKILL)


@contextlib.contextmanager
def file_lock(lock_file: str | os.PathLike, what: str = "", notice_after: float = 3.0):
    """Exclusive lock on `lock_file` (created if missing) for a check-and-build.

    A POSIX record lock (lockf), not flock: it belongs to the process, so children forked
    while it is held (pool workers, FFCV writers) do not inherit it, and the kernel drops it
    when the holder dies, also by SIGKILL: a dead holder never blocks the next run. The holder
    writes its pid into the file; a wait longer than `notice_after` seconds says what it waits
    for and on whom (one line, repeated every minute)."""
    lock_file = Path(lock_file)
    lock_file.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(lock_file, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        t0, said = time.monotonic(), 0.0
        while True:
            try:
                fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as e:
                if e.errno not in (errno.EACCES, errno.EAGAIN):
                    raise
            waited = time.monotonic() - t0
            if waited >= notice_after and (not said or waited - said >= 60):
                said = waited
                holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
                print(f"waiting {waited:.0f} s for the lock on {lock_file}" + (f" ({what})" if what else "")
                      + f", held by {holder}", file=sys.stderr, flush=True)
            time.sleep(0.2)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} since {time.strftime('%H:%M:%S')}\n".encode(), 0)
        try:
            yield
        finally:
            os.ftruncate(fd, 0)
            fcntl.lockf(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def device_free_bytes(device: torch.device) -> int:
    """Bytes that can still be allocated on `device` (CUDA: free memory; CPU: MemAvailable)."""
    device = torch.device(device)
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def read_rgb(path: str) -> torch.Tensor:
    """uint8 CHW RGB tensor of an image file (PIL decode, as torchvision's ImageFolder does;
    torchvision.io's decoders are deprecated from 0.29)."""
    from PIL import Image
    from torchvision.transforms.v2.functional import pil_to_tensor
    with Image.open(path) as im:
        return pil_to_tensor(im.convert("RGB"))


def storage_size(split, size: int) -> tuple[int, int]:
    """(H, W) a split's decoded pixels are kept at: native when every image shares one size
    no larger than the training `size` (the upscale then happens inside the warp), else
    `size` x `size`."""
    sizes = set(split.sizes)
    if len(sizes) == 1:
        h, w = next(iter(sizes))
        if h <= size and w <= size:
            return h, w
    return size, size


def storage_view(split, spec, train: bool) -> tuple[tuple[int, int], str]:
    """((H, W), view) of the stored pixels for a loader of `spec` in this mode, H, W from
    `storage_size`. view: "native" (the files' pixels), "stretch" (resized to size x size,
    aspect ignored; also the "rrc" source: boxes are drawn on the original sizes and cut
    from it in normalised coordinates) or "center" (the evaluation view itself: short side
    resized, centre crop; for eval_resize "center")."""
    hw = storage_size(split, spec.size)
    if len(set(split.sizes)) == 1 and tuple(split.sizes[0]) == hw:
        return hw, "native"
    return hw, "center" if not train and spec.eval_resize == "center" else "stretch"


def view_of(image: torch.Tensor, view: str, spec) -> torch.Tensor:
    """A uint8 CHW image as `storage_view` stores it, with the reference's own ops
    (torchvision v2, bilinear, antialiased, on the uint8 tensor)."""
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms.v2 import functional as TF
    bil, S = InterpolationMode.BILINEAR, spec.size
    if view == "center":
        return TF.center_crop(TF.resize(image, [spec.eval_size], interpolation=bil, antialias=True), [S, S])
    if view == "stretch" and tuple(image.shape[1:]) != (S, S):
        return TF.resize(image, [S, S], interpolation=bil, antialias=True)
    return image


# Per image of a batch while augmenting: float32 source/colour temporaries, warp output,
# the returned batch (counted in float32), grid and masks. Generous on purpose.
_WORKSPACE_PER_PIXEL = 48


def needed_bytes(split, spec, opts) -> int:
    """Device bytes to hold a split decoded (at `storage_size`) plus one augmented batch:
    the resident loader's need, and what `--loader auto` compares with free memory."""
    h, w = storage_size(split, spec.size)
    data = len(split) * h * w * 3 + len(split) * 8
    return data + opts.batch_size * spec.size * spec.size * _WORKSPACE_PER_PIXEL
