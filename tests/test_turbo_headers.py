"""turboOCI-apply's own tar header walk (build.turbo.HeaderWalk) and the
--export dump, with Python's tarfile as the model: for random tars (GNU and
PAX formats, long names and link names, xattrs, every entry kind, odd
sizes) the walk yields the members tarfile sees, with tarfile's content
offsets; the dump walked with --import semantics yields the same; plain,
gzip and ZFile inputs give the same dump; and the gzip index comes out of
the same pass."""
import gzip
import io
import os
import subprocess
import sys
import tarfile

from hypothesis import HealthCheck, given, settings, strategies as st

from tcmu_obd.build import turbo
from tcmu_obd.format.gzindex import build_index

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

name_part = st.text(alphabet="abcxyz_-é", min_size=1, max_size=70)
names = st.lists(name_part, min_size=1, max_size=4).map("/".join)
entry = st.tuples(names, st.sampled_from("0125346"), st.integers(0, 70000),
                  st.booleans(), st.text(alphabet="abc/", min_size=1, max_size=160))


def make_tar(entries, fmt):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as t:
        for i, (name, kind, size, xattr, link) in enumerate(entries):
            ti = tarfile.TarInfo(f"{i}/{name}")
            ti.type = kind.encode()
            ti.mtime = 1700000000
            if kind in "12":
                ti.linkname = link
            if kind in "34":
                ti.devmajor, ti.devminor = 7, i
            if xattr and fmt == tarfile.PAX_FORMAT:
                ti.pax_headers = {"SCHILY.xattr.user.k": "v" * (i + 1)}
            data = None
            if kind == "0":
                ti.size = size
                data = io.BytesIO(os.urandom(size))
            t.addfile(ti, data)
    return buf.getvalue()


def model(raw):
    with tarfile.open(fileobj=io.BytesIO(raw)) as t:
        return [(m.name, m.type, m.size if m.isreg() else 0, m.linkname, m.offset_data if m.isreg() else None,
                 {k: v for k, v in m.pax_headers.items() if k.startswith("SCHILY.xattr.")})
                for m in t.getmembers()]


def walked(stream, from_dump=False):
    out = []
    for info, content, _blocks in turbo.HeaderWalk(stream, from_dump=from_dump):
        out.append((info.name, info.type, info.size if info.type in turbo.REG_TYPES else 0, info.linkname,
                    content if info.type in turbo.REG_TYPES else None,
                    {k: v for k, v in info.pax_headers.items() if k.startswith("SCHILY.xattr.")}))
    return out


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(entries=st.lists(entry, min_size=1, max_size=12), pax=st.booleans())
def test_turbo_headers_walk_and_dump_match_tarfile(tmp_path_factory, entries, pax):
    tmp = tmp_path_factory.mktemp("h")
    raw = make_tar(entries, tarfile.PAX_FORMAT if pax else tarfile.GNU_FORMAT)
    want = model(raw)
    assert walked(io.BytesIO(raw)) == want
    path = tmp / "l.tar"
    path.write_bytes(raw)
    inp = turbo.TurboInput(str(path))
    try:
        n, pos = turbo.export_headers(inp, str(tmp / "dump"))
    finally:
        inp.close()
    assert n == len(want)
    dump = (tmp / "dump").read_bytes()
    assert len(dump) % 512 == 0
    with open(tmp / "dump", "rb") as f:
        assert walked(f, from_dump=True) == want


def test_turbo_headers_same_dump_from_gzip_and_zfile(tmp_path):
    raw = make_tar([("f", "0", 100000, True, "x"), ("g" * 150, "0", 3, False, "x"),
                    ("l", "2", 0, False, "t" * 130)], tarfile.PAX_FORMAT)
    plain = tmp_path / "l.tar"
    plain.write_bytes(raw)
    gz = tmp_path / "l.tar.gz"
    gz.write_bytes(gzip.compress(raw, mtime=0))
    subprocess.run([sys.executable, "-m", "tcmu_obd.cli.zfile", str(plain), str(tmp_path / "l.zfile")],
                   check=True, cwd=ROOT)
    dumps = {}
    for src in (plain, gz, tmp_path / "l.zfile"):
        idx = tmp_path / (src.name + ".meta")
        inp = turbo.TurboInput(str(src), str(idx))
        try:
            turbo.export_headers(inp, str(tmp_path / (src.name + ".dump")))
            inp.finish()
        finally:
            inp.close()
        dumps[src.name] = (tmp_path / (src.name + ".dump")).read_bytes()
        assert idx.exists() == (src == gz)
    assert dumps["l.tar"] == dumps["l.tar.gz"] == dumps["l.zfile"]
    with open(gz, "rb") as f:
        build_index(f, str(tmp_path / "ref.meta"))
    assert (tmp_path / "l.tar.gz.meta").read_bytes() == (tmp_path / "ref.meta").read_bytes()
