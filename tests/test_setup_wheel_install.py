"""Packaging: a wheel built by `python3 -m build --wheel` from a clean copy of
the sources installs into a fresh venv and runs `tcmu-obd demo`; the core's
C sources include no lz4.h/zstd.h (so liblz4-dev/libzstd-dev are not needed:
native/lz4zstd.h declares what is used) and the core links the runtime
sonames; and a build without a C compiler fails with one line saying what to
install.  Slow (a full build, a venv, pip): about a minute or two."""
import os
import pathlib
import shutil
import subprocess
import sys
import sysconfig

import pytest

REPO = pathlib.Path(__file__).resolve().parent.parent
SOURCES = ["setup.py", "pyproject.toml", "MANIFEST.in", "README.md", "native", "tcmu_obd"]


def clean_copy(dst, generated_c=False):
    """The sources alone (no built .so); with generated_c, Cython's .c output
    too when present (its mtime kept, so cythonize need not run again)."""
    ignore = shutil.ignore_patterns("*.so", "__pycache__", *(() if generated_c else ("*.c",)))
    dst.mkdir(parents=True, exist_ok=True)
    for name in SOURCES:
        src = REPO / name
        if src.is_dir():
            shutil.copytree(src, dst / name, ignore=None if name == "native" else ignore)
        else:
            shutil.copy2(src, dst / name)
    return dst


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    try:
        import build  # noqa: F401
    except ImportError:
        pytest.fail("the `build` package is missing: pip install build (scripts/setup.sh does)")
    src = clean_copy(tmp_path_factory.mktemp("src"))
    out = tmp_path_factory.mktemp("dist")
    r = subprocess.run([sys.executable, "-m", "build", "--wheel", "--outdir", out, src],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    wheels = list(out.glob("tcmu_obd-*.whl"))
    assert len(wheels) == 1, wheels
    return src, wheels[0]


def test_setup_wheel_installs_in_fresh_venv_and_runs_demo(wheel, tmp_path):
    _src, whl = wheel
    venv = tmp_path / "v"
    subprocess.run([sys.executable, "-m", "venv", venv], check=True)
    r = subprocess.run([venv / "bin/pip", "install", "-q", whl], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    # outside the source tree, with nothing of it on the path
    env = {"PATH": f"{venv / 'bin'}:/usr/bin:/bin", "HOME": str(tmp_path)}
    r = subprocess.run([venv / "bin/tcmu-obd", "demo"], capture_output=True, text=True, env=env,
                       cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "ext4            magic" in r.stdout, r.stdout
    assert str(venv) in r.stdout           # the base layer came from the installed package
    lib = subprocess.run([venv / "bin/python", "-c", "import tcmu_obd.core._lsmt as m; print(m.__file__)"],
                         capture_output=True, text=True, env=env, cwd=tmp_path)
    assert lib.returncode == 0 and str(venv) in lib.stdout, lib.stderr
    ldd = subprocess.run(["ldd", lib.stdout.strip()], capture_output=True, text=True).stdout
    assert "liblz4.so.1" in ldd and "libzstd.so.1" in ldd, ldd


def test_setup_core_sources_need_no_lz4_zstd_dev_headers(wheel):
    src, _whl = wheel
    include = sysconfig.get_paths()["include"]
    cfiles = [src / "tcmu_obd/core/_lsmt.c", *sorted((src / "native").glob("*.c"))]
    r = subprocess.run(["gcc", "-M", f"-I{src / 'native'}", f"-I{include}", *cfiles],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    deps = r.stdout.replace("\\\n", " ").split()
    used = sorted({os.path.basename(d) for d in deps if os.path.basename(d) in ("lz4.h", "zstd.h")})
    assert used == [], f"the core includes {used}: building it would need the -dev packages"


@pytest.mark.parametrize("how", ["CC=/nonexistent", "PATH-without-gcc"])
def test_setup_without_compiler_says_what_to_install(tmp_path, how):
    src = clean_copy(tmp_path / "src", generated_c=True)
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    if how == "CC=/nonexistent":
        env["CC"] = "/nonexistent"
    else:
        env.pop("CC", None)
        bindir = tmp_path / "bin"
        bindir.mkdir()
        os.symlink(sys.executable, bindir / "python3")
        env["PATH"] = str(bindir)
    r = subprocess.run([sys.executable, "setup.py", "-q", "build_ext", "--inplace"],
                       capture_output=True, text=True, env=env, cwd=src)
    assert r.returncode != 0
    lines = [ln for ln in r.stderr.splitlines() if "tcmu-obd:" in ln]
    assert len(lines) == 1 and "install gcc" in lines[0], r.stderr[-2000:]
    assert "Traceback" not in r.stderr
