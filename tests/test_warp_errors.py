"""Bad TurboOCI lowers fail the open with an error naming the file, the field
and the value, and the resultFile says why: a missing or non-regular
targetFile, a tag-1 record starting past the target's end, a tag left above
1 after normalising, gzipIndex without a target, a missing, truncated or
corrupt gzip index, an index made for another gzip blob, a targetDigest
without repoBlobUrl.  Nothing opened before the failure stays open."""
import gzip
import json
import os

import pytest

from warp_layers import write_warp_layer
from tcmu_obd.errors import ConfigError, FormatError, ObdError, ReadError
from tcmu_obd.format import gzindex
from tcmu_obd.image import assemble

SECTOR = 512
VSIZE = 1 << 20


def open_fds():
    return sorted(os.listdir("/proc/self/fd"))


@pytest.fixture
def w(tmp_path):
    target = os.urandom(40000)
    (tmp_path / "layer.tar").write_bytes(target)
    (tmp_path / "layer.tar.gz").write_bytes(gzip.compress(target))
    with open(tmp_path / "layer.tar.gz", "rb") as f:
        gzindex.build_index(f, tmp_path / "gzip.meta", span=1 << 16)
    write_warp_layer(tmp_path / "meta", VSIZE, [(0, 2, "meta", b"m" * 1024), (8, 8, "target", 4)])
    return tmp_path


def fails(tmp, lower, cls, pattern, **top):
    cfg = tmp / "config.v1.json"
    doc = {"lowers": [lower], "resultFile": str(tmp / "result"), **top}
    cfg.write_text(json.dumps(doc))
    before = open_fds()
    with pytest.raises(cls, match=pattern) as info:
        assemble.open_image(str(cfg))
    assert open_fds() == before
    assert (tmp / "result").read_text() == f"failed:{info.value}"
    return str(info.value)


def test_warp_errors_target_file(w):
    fails(w, {"file": str(w / "meta"), "targetFile": str(w / "nope.tar")}, ReadError,
          r"config.v1.json: lowers\[0\]\.targetFile = '.*/nope.tar': cannot open: No such file")
    fails(w, {"file": str(w / "meta"), "targetFile": str(w)}, ReadError,
          r"lowers\[0\]\.targetFile = '.*': not a regular file")


def test_warp_errors_record_past_target(w):
    write_warp_layer(w / "far", VSIZE, [(0, 2, "meta", b"m" * 1024), (8, 8, "target", 4),
                                        (20, 1, "target", 40000 // SECTOR + 1)])
    msg = fails(w, {"file": str(w / "far"), "targetFile": str(w / "layer.tar")}, FormatError,
                r"/far: index record 2 moffset = 79 .*: the tag-1 \(target\) record for sectors \[20, 21\) "
                r"starts at byte 40448, at or past the end of the target .*layer.tar \(40000 bytes\)")
    assert "layer.tar" in msg
    # starting inside the target (its last partial sector) is fine: the rest reads as zeros
    write_warp_layer(w / "edge", VSIZE, [(0, 2, "meta", b"m" * 1024), (20, 4, "target", 40000 // SECTOR)])
    (w / "c2.json").write_text(json.dumps({"lowers": [{"file": str(w / "edge"),
                                                       "targetFile": str(w / "layer.tar")}]}))
    with assemble.open_image(str(w / "c2.json")) as image:
        tail = (w / "layer.tar").read_bytes()[40000 // SECTOR * SECTOR:]
        assert image.read(20 * SECTOR, 4 * SECTOR) == tail + bytes(4 * SECTOR - len(tail))


def test_warp_errors_tag_above_one(w):
    from tcmu_obd import core
    from tcmu_obd.format.lsmt import FLAG_DATA, FLAG_HEADER, FLAG_SEALED, LsmtHeader
    dump = core.Index.from_records([(0, 1, 8, 0, 3), (1, 1, 0, 0, 5)]).dump(256)
    head = LsmtHeader(FLAG_HEADER | FLAG_DATA | FLAG_SEALED, 0, 0, VSIZE).pack()
    trailer = LsmtHeader(FLAG_DATA | FLAG_SEALED, 4096 + 512, len(dump) // 16, VSIZE).pack()
    (w / "tags").write_bytes(head + b"d" * 512 + dump + trailer)
    fails(w, {"file": str(w / "tags"), "targetFile": str(w / "layer.tar")}, FormatError,
          r"/tags: index record 1 tag = 5: a warp layer's tags are 3 \(this file\) and 4 \(the target\) only")


def test_warp_errors_gzip_index(w):
    base = {"file": str(w / "meta"), "targetFile": str(w / "layer.tar.gz")}
    fails(w, {"file": str(w / "meta"), "gzipIndex": str(w / "gzip.meta")}, ConfigError,
          r"lowers\[0\]\.gzipIndex = \".*gzip.meta\": a gzip index needs a target")
    fails(w, {**base, "gzipIndex": str(w / "absent.meta")}, ReadError,
          r"lowers\[0\]\.gzipIndex = '.*absent.meta': cannot read: No such file")
    raw = (w / "gzip.meta").read_bytes()
    (w / "short.meta").write_bytes(raw[:200])
    fails(w, {**base, "gzipIndex": str(w / "short.meta")}, FormatError, r"short.meta: ")
    bad = bytearray(raw)
    bad[20] ^= 0xFF                                       # inside the crc-covered header
    (w / "bad.meta").write_bytes(bytes(bad))
    fails(w, {**base, "gzipIndex": str(w / "bad.meta")}, FormatError, r"bad.meta: ")
    # the index of another gzip blob (different size): refused, not misread
    (w / "other.tar.gz").write_bytes(gzip.compress(os.urandom(30000)))
    fails(w, {**base, "targetFile": str(w / "other.tar.gz"), "gzipIndex": str(w / "gzip.meta")},
          FormatError, r"gzip.meta: gzip_file_size = \d+")
    # the good index: the same bytes as the plain tar
    (w / "ok.json").write_text(json.dumps({"lowers": [{**base, "gzipIndex": str(w / "gzip.meta")}]}))
    (w / "plain.json").write_text(json.dumps({"lowers": [{"file": str(w / "meta"),
                                                          "targetFile": str(w / "layer.tar")}]}))
    with assemble.open_image(str(w / "ok.json")) as gz, assemble.open_image(str(w / "plain.json")) as plain:
        assert gz.read(0, VSIZE) == plain.read(0, VSIZE)
        assert gz.read(8 * SECTOR, 8 * SECTOR) == (w / "layer.tar").read_bytes()[4 * SECTOR:12 * SECTOR]


def test_warp_errors_target_digest_needs_repo(w):
    fails(w, {"file": str(w / "meta"), "targetDigest": "sha256:" + "0" * 64}, ObdError,
          r"lowers\[0\]: empty repoBlobUrl")
