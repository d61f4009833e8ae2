"""Cost of the erofs meta-layer writer (TurboOCI --fstype erofs) per tar
member, against the cost of just reading the same tar's headers.

Baseline: entries_from_tar over an in-memory uncompressed tar of N small
files in nested directories (tarfile parsing every header: the work any
tar-driven apply must do anyway).  Cases: ErofsBuilder.add + finish of those
entries (first layer); the same over that image as a lower (the reader's
tree() plus a complete new metadata set), with a second layer of N/10
members; the reader alone.  Ratio = baseline time / case time (below 1:
slower than parsing the tar).  The built image is read back and checked
(every file present with its size) before anything is reported.

Not a test; the writer's correctness is tested in tests/test_erofs_*.py.
"""
import argparse
import io

from _common import env_line, fmt, interleaved, ratio, spread, table, write_tar
from tcmu_obd.format.erofs import ErofsBuilder, entries_from_tar
from tcmu_obd.format.erofs_read import ErofsReader


def make_tar(n, prefix):
    entries = [(f"{prefix}/d{i % 97}/s{i % 7}/file-{i:07d}.txt", b"x" * (i % 9000)) for i in range(n)]
    buf = io.BytesIO()
    write_tar(buf, entries)
    return buf.getvalue()


def build(entries, lower=None):
    b = ErofsBuilder(lower=lower)
    for e in entries:
        b.add(e)
    writes, mappings = b.finish()
    return b, writes, mappings


def image_of(b, writes, base=b""):
    disk = bytearray(base) + bytes(max(0, b.end_block * 4096 - len(base)))
    for off, data in writes:
        disk[off:off + len(data)] = data
    return bytes(disk)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--files", type=int, default=20000)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    n = args.files
    tar1, tar2 = make_tar(n, "l1"), make_tar(n // 10, "l2")
    ents1 = list(entries_from_tar(io.BytesIO(tar1)))
    ents2 = list(entries_from_tar(io.BytesIO(tar2)))
    b1, w1, m1 = build(ents1)
    img1 = image_of(b1, w1)
    tree = ErofsReader(lambda o, k: img1[o:o + k]).tree()
    files = sum(len(s.children) for d in tree.children["l1"].children.values() for s in d.children.values())
    assert files == n and len(m1) == sum(1 for e in ents1 if e.type == "file" and e.size), (files, len(m1))

    cases = [
        ("parse tar (baseline)", lambda: sum(1 for _ in entries_from_tar(io.BytesIO(tar1))) and None),
        ("first layer: add + finish", lambda: build(ents1) and None),
        ("reader: tree()", lambda: ErofsReader(lambda o, k: img1[o:o + k]).tree() and None),
        ("2nd layer over it (N/10 new)", lambda: build(ents2, lambda o, k: img1[o:o + k]) and None),
    ]
    times = interleaved(cases, args.rounds)
    base = times[cases[0][0]]
    rows = []
    for name, _fn in cases:
        t = times[name]
        rb, rm = ratio(base, t)
        rows.append([name, fmt(min(t) * 1e3), fmt(n / min(t)), fmt(rb, 2), fmt(rm, 2), fmt(spread(t))])
    meta = sum(len(d) for _o, d in w1)
    table(f"erofs meta layer, {n} files ({len(tar1) / 2**20:.1f} MiB tar, {meta / 2**20:.2f} MiB metadata)",
          ["case", "ms", "members/s", "ratio", "ratio med", "spread %"], rows,
          [env_line(), "members/s counts the first layer's N files for every case"])


if __name__ == "__main__":
    main()
