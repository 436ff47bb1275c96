"""benchmarks/gpu_check.sh reports what happened (a failure, a timeout, a skip, a pass) in its
exit status and in a summary written as each section ends; the DALI bundle's parts come back
together bitwise on the box. Sections here are test-only ones (GPU_CHECK_EXTRA): no GPU, no
network, seconds."""
from __future__ import annotations

import io
import os
import re
import subprocess
import sys
import tarfile
import warnings
import zipfile

import pytest

from conftest import ROOT

from benchmarks.gpu_bundle import repack, split_file
from benchmarks.host_syncs import MESSAGE, count_syncs, per_step
from benchmarks.throughput import select_combos

CHECK, SETUP = ROOT / "benchmarks" / "gpu_check.sh", ROOT / "benchmarks" / "gpu_setup.sh"
EXTRA = """
def t_pass 10 - 'echo hello'
def t_fail 10 - 'echo about to fail; false'
def t_slow 1 - 'sleep 5'
def t_skip 10 no_such_module_xyz 'echo never runs'
def t_seen 10 - 'grep -q "^t_pass\tpass" $OUT/summary.tsv'
def t_nogpu 10 cuda 'echo never runs'
"""


def check(tmp_path, *sections, env=None):
    extra = tmp_path / "extra.sh"
    extra.write_text(EXTRA)
    env = {**os.environ, "GPU_CHECK_EXTRA": str(extra), "GPU_CHECK_PREFLIGHT": "0", "PY": sys.executable,
           "GPU_CHECK_WORK": str(tmp_path / "work"), **(env or {})}
    r = subprocess.run(["bash", str(CHECK), str(tmp_path / "out"), *sections], capture_output=True, text=True,
                       env=env, timeout=60)
    summary = tmp_path / "out" / "summary.tsv"
    rows = [line.split("\t") for line in summary.read_text().splitlines()[1:]] if summary.exists() else []
    return r, {row[0]: row for row in rows}


def test_each_status_is_reported_and_a_failure_fails_the_script(tmp_path):
    r, rows = check(tmp_path, "t_pass", "t_seen", "t_fail", "t_slow", "t_skip")
    assert r.returncode == 1, r.stdout + r.stderr
    assert {n: row[1] for n, row in rows.items()} == dict(t_pass="pass", t_seen="pass", t_fail="fail",
                                                          t_slow="timeout", t_skip="skip")
    assert rows["t_fail"][3] == "exit 1"
    assert "timeout" in rows["t_slow"][3] and float(rows["t_slow"][2]) < 4
    assert "no_such_module_xyz" in rows["t_skip"][3]
    # t_seen found t_pass's line: the summary is written as each section ends, not at the end
    table = r.stdout[r.stdout.rindex("section"):]
    assert re.search(r"t_slow\s+timeout", table) and re.search(r"t_skip\s+skip\s+0\s+missing no_such", table)
    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir()) == ["results.tgz", "sections.log", "summary.tsv"]
    with tarfile.open(out / "results.tgz") as t:
        assert "./t_fail.log" in t.getnames()
    assert "about to fail" in (out / "sections.log").read_text()


def test_a_timeout_alone_fails_with_its_own_status(tmp_path):
    r, rows = check(tmp_path, "t_pass", "t_slow")
    assert r.returncode == 3 and rows["t_slow"][1] == "timeout", r.stdout + r.stderr


def test_a_skip_does_not_fail(tmp_path):
    r, rows = check(tmp_path, "t_skip", "t_pass")
    assert r.returncode == 0 and [row[1] for row in rows.values()] == ["skip", "pass"], r.stdout + r.stderr


def test_no_cuda_fails_a_gpu_section_instead_of_skipping_it(tmp_path):
    r, rows = check(tmp_path, "t_nogpu", env={"PY": "/nonexistent/python"})
    assert r.returncode == 1 and rows["t_nogpu"][1] == "fail" and "missing cuda" in rows["t_nogpu"][3]


def test_an_unknown_section_is_a_usage_error(tmp_path):
    r, rows = check(tmp_path, "t_pass", "no_such_section")
    assert r.returncode == 2 and "no_such_section" in r.stderr and not rows


def test_every_section_is_in_a_group_that_fits_one_device_call():
    out = subprocess.run(["bash", str(CHECK), "--list"], capture_output=True, text=True, check=True).stdout
    sections = dict(re.findall(r"^(\w+)\s+(\d+)s\s", out, re.M))
    groups = {g: (int(t), names.split()) for g, t, names in re.findall(r"^group (\w+)\s+(\d+)s\s+(.+)$", out, re.M)}
    budget, setup = map(int, re.search(r"at most (\d+) s of section timeouts, after a setup of at most (\d+) s",
                                       out).groups())
    assert budget + setup <= 480 and "engine" in sections and "dali" in sections and "core" in groups
    assert {s for _, names in groups.values() for s in names} == set(sections)
    for g, (total, names) in groups.items():
        assert total == sum(int(sections[s]) for s in names)
        assert total <= budget, f"group {g}: {total} s of timeouts, over {budget} s"


def test_dali_parts_reassemble_bitwise_over_separate_calls(tmp_path):
    wheel = tmp_path / "src" / "dummy-1.0-py3-none-any.whl"
    wheel.parent.mkdir()
    wheel.write_bytes(os.urandom(10_000))
    archive = tmp_path / "dali.tar.xz"
    with tarfile.open(archive, "w:xz") as t:
        t.add(wheel, arcname=wheel.name)
    folders = split_file(archive, tmp_path / "built", part_bytes=3000)
    assert len(folders) >= 2 and [f.name for f in folders] == [f"dali-part{i + 1}" for i in range(len(folders))]
    assert sum((f / f"dali.tar.xz.part{i + 1}").stat().st_size for i, f in enumerate(folders)) == archive.stat().st_size
    env = dict(os.environ, PY=sys.executable, GPU_BUNDLE_STASH=str(tmp_path / "stash"))
    for i, folder in enumerate(reversed(folders)):       # one part per call, in any order
        bundle = tmp_path / f"call{i}" / ".gpu_bundle"
        bundle.mkdir(parents=True)
        folder.rename(bundle / folder.name)
        r = subprocess.run(["bash", str(SETUP), str(bundle), "--no-install"], capture_output=True, text=True,
                           env=env, timeout=60)
        assert r.returncode == 0, r.stdout + r.stderr
        last = i == len(folders) - 1
        assert ("reassembled and checked" in r.stdout) == last, r.stdout
        assert last or f"{i + 1} of {len(folders)} parts here" in r.stdout
    assert (tmp_path / "stash" / "dali.tar.xz").read_bytes() == archive.read_bytes()
    assert (tmp_path / "stash" / "wheels" / wheel.name).read_bytes() == wheel.read_bytes()

    (tmp_path / "stash" / "dali.tar.xz.part1").write_bytes(b"corrupt")    # a bad part is caught
    r = subprocess.run(["bash", str(SETUP), str(tmp_path / "none"), "--no-install"], capture_output=True,
                       text=True, env=env, timeout=60)
    assert r.returncode == 1 and "does not match" in r.stdout


def test_repack_drops_other_pythons_and_headers_and_keeps_record_true(tmp_path):
    files = {"pkg/__init__.py": b"", "pkg/impl.cpython-312-x86_64-linux-gnu.so": b"312",
             "pkg/impl.cpython-311-x86_64-linux-gnu.so": b"311", "pkg/impl.cpython-314t-x86_64-linux-gnu.so": b"t",
             "pkg/include/a.h": b"h", "pkg/lib.abi3.so": b"abi3"}
    record = "".join(f"{n},sha256=x,1\n" for n in files) + "pkg-1.0.dist-info/RECORD,,\n"
    src = tmp_path / "pkg-1.0-py3-none-any.whl"
    with zipfile.ZipFile(src, "w", zipfile.ZIP_DEFLATED) as z:
        for n, data in {**files, "pkg-1.0.dist-info/RECORD": record.encode()}.items():
            z.writestr(n, data)
    (tmp_path / "out").mkdir()
    repack(src, tmp_path / "out", "3.12")
    with zipfile.ZipFile(tmp_path / "out" / src.name) as z:
        kept = {i.filename for i in z.infolist() if i.compress_type == zipfile.ZIP_STORED}
        rec = [line.split(",")[0] for line in io.StringIO(z.read("pkg-1.0.dist-info/RECORD").decode())]
    assert kept == {"pkg/__init__.py", "pkg/impl.cpython-312-x86_64-linux-gnu.so", "pkg/lib.abi3.so",
                    "pkg-1.0.dist-info/RECORD"}
    assert set(rec) == kept


@pytest.mark.parametrize("patterns, expect", [
    ("", 8), ("0/*/*", 4), ("0/torch/off,1/*/bf16", 3), ("1/triton/bf16", 1)])
def test_throughput_combos_select_train_rows(patterns, expect):
    combos = [(c, k, a) for c in (0, 1) for k in ("torch", "triton") for a in ("off", "bf16")]
    got = select_combos(combos, patterns)
    assert len(got) == expect and (patterns != "0/*/*" or all(c == 0 for c, _, _ in got))


def test_host_sync_counter_flags_a_line_that_syncs_every_step():
    with warnings.catch_warnings(record=True) as passed_on, count_syncs() as counts:
        for step in range(10):
            warnings.warn(f"called a {MESSAGE}")                # every step
            if step % 5 == 0:
                warnings.warn(f"called a {MESSAGE}")            # every 5th step: fine
            warnings.warn("something else")                     # passed on, not counted
    assert [str(w.message) for w in passed_on] == ["something else"] * 10
    assert sorted(counts.values()) == [2, 10] and all(s.startswith("tests/test_gpu_check.py:") for s in counts)
    assert per_step(counts, 10) == [s for s, n in counts.items() if n == 10]
