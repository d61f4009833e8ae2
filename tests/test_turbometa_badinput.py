"""Bad TurboOCI meta blobs (turboOCIv1.tar.gz) given to
tcmu_obd.image.turbometa.unpack_meta: each case is a finding of
fuzz/fuzz_turbometa.py kept as a regression test.  A damaged or hostile
archive is a ManifestError naming the blob, never wrong bytes on disk, an
allocation as large as a member claims to be, or another exception.
"""
import gzip
import io
import os
import tarfile

import pytest

from tcmu_obd.errors import ManifestError
from tcmu_obd.image import turbometa

META = os.urandom(200000)


def meta_tar(members):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as t:
        for name, data in members:
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            t.addfile(ti, io.BytesIO(data))
    return buf.getvalue()


def unpack(tmp_path, blob):
    (tmp_path / "m.tar.gz").write_bytes(blob)
    d = tmp_path / "layer"
    d.mkdir(exist_ok=True)
    return turbometa.unpack_meta(str(tmp_path / "m.tar.gz"), str(d), "reg/layers[0]"), d


def test_good_archive_unpacks(tmp_path):
    seen, d = unpack(tmp_path, gzip.compress(meta_tar([("erofs.fs.meta", META), (".turbo.ociv1", b"")])))
    assert seen == {"erofs.fs.meta", ".turbo.ociv1"}
    assert (d / "erofs.fs.meta").read_bytes() == META


def test_gzip_crc_is_checked(tmp_path):
    # damage inside the deflate data that still inflates: only the gzip
    # trailer's CRC tells; before, the members were taken without reading
    # the stream to its end (the trailer was never checked): wrong bytes
    gz = bytearray(gzip.compress(meta_tar([("erofs.fs.meta", META)]), 0))   # stored blocks
    k = gz.index(META[1000:1016])
    gz[k] ^= 0xFF
    with pytest.raises(ManifestError) as e:
        unpack(tmp_path, bytes(gz))
    assert "reg/layers[0]" in str(e.value) and "CRC" in str(e.value)


def test_bytes_after_the_archive_are_read_and_refused(tmp_path):
    gz = gzip.compress(meta_tar([("erofs.fs.meta", META)])) + b"junk after the gzip member"
    with pytest.raises(ManifestError) as e:
        unpack(tmp_path, gz)
    assert "reg/layers[0]" in str(e.value)


def sparse_member(realsize):
    """A GNU sparse member named erofs.fs.meta that claims `realsize` bytes
    (one hole, no data)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as t:
        t.addfile(tarfile.TarInfo("erofs.fs.meta"))
    raw = bytearray(buf.getvalue())
    raw[156:157] = tarfile.GNUTYPE_SPARSE
    raw[386:398] = b"%011o\0" % realsize        # sparse map entry 0: offset
    raw[398:410] = b"%011o\0" % 0               # ... and length
    raw[483:495] = b"%011o\0" % realsize        # realsize
    raw[148:156] = b" " * 8
    raw[148:156] = b"%06o\0 " % sum(raw[:512])
    return bytes(raw)


def test_sparse_member_is_refused(tmp_path):
    # before: extractfile().read() made a 64 GiB bytes object of zeros
    with pytest.raises(ManifestError) as e:
        unpack(tmp_path, gzip.compress(sparse_member(1 << 36)))
    assert "erofs.fs.meta" in str(e.value) and "sparse" in str(e.value)
    assert os.listdir(tmp_path / "layer") == []


def test_bad_pax_sparse_map_is_damage(tmp_path):
    # Python's tarfile raises ValueError (not a TarError) for a GNU sparse
    # 1.0 map that is not numbers; before, it escaped unpack_meta
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as t:
        ti = tarfile.TarInfo("erofs.fs.meta")
        ti.size = 512
        ti.pax_headers = {"GNU.sparse.major": "1", "GNU.sparse.minor": "0", "GNU.sparse.realsize": "10",
                          "GNU.sparse.name": "erofs.fs.meta"}
        t.addfile(ti, io.BytesIO(b"zz\n" + bytes(509)))
    with pytest.raises(ManifestError) as e:
        unpack(tmp_path, gzip.compress(buf.getvalue()))
    assert "reg/layers[0]" in str(e.value) and "meta archive" in str(e.value)


# an .lzma ("alone") header asking for a 4 GiB dictionary, as fuzz_turbometa
# found it under AddressSanitizer: tarfile's "r:*" tried xz and liblzma
# allocated the dictionary (MemoryError under a memory limit, an
# out-of-memory kill without one)
LZMA_BOMB = bytes.fromhex("00000000000000000000000000000000000000ffffffffff") + bytes(60)


def test_xz_and_lzma_are_not_tried(tmp_path):
    import subprocess
    import sys
    blob = tmp_path / "bomb"
    blob.write_bytes(LZMA_BOMB)
    # a child with 1 GiB of address space: the 4 GiB allocation cannot hide
    code = ("import resource, sys; resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))\n"
            "from tcmu_obd.image import turbometa\n"
            "from tcmu_obd.errors import ManifestError\n"
            "try:\n"
            "    turbometa.unpack_meta(sys.argv[1], sys.argv[2], 'reg/layers[0]')\n"
            "except ManifestError as e:\n"
            "    print('refused:', e)\n")
    (tmp_path / "layer").mkdir()
    p = subprocess.run([sys.executable, "-c", code, str(blob), str(tmp_path / "layer")],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "refused:" in p.stdout and "reg/layers[0]" in p.stdout
