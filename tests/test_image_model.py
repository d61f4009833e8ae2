"""Stateful property test of the whole stacking logic against a model.

Random writes and discards to a writable upper, reopens (index replay or
sparse rebuild), commits (plain, ZFile lz4/zstd, tar-wrapped), seals and
restacks, merges of the lower layers, and random reads compared byte for byte
with a per-sector model of each layer (conftest.LayerModel).
"""
import os
import shutil
import tempfile

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from conftest import LayerModel, commit_layer, merge_layers, model_read
from tcmu_obd.image.stack import Image
from tcmu_obd.image.layer import open_layer
from tcmu_obd.image.rw import RWLayer

SECTOR = 512
SECTORS = 2048                 # a 1 MiB virtual disk keeps the model cheap
VSIZE = SECTORS * SECTOR


def _pattern(seed, n):
    """Distinct, cheap, mostly incompressible-ish bytes."""
    return (bytes([(seed * 37 + k * 11) & 0xFF for k in range(251)]) * (n // 251 + 1))[:n]


class StackMachine(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        self.dir = tempfile.mkdtemp(prefix="obd-model-")
        self.lowers = []          # paths, bottom -> top
        self.models = []          # LayerModel per lower
        self.upper = None
        self.upper_model = None
        self.sparse = False
        self.counter = 0
        self.image = None
        self.seed = 0

    def teardown(self):
        if self.image is not None:
            self.image.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    def _name(self, stem):
        self.counter += 1
        return os.path.join(self.dir, f"{stem}{self.counter}")

    def _reopen(self):
        if self.image is not None and self.upper_model is not None and self.sparse:
            # a sparse layer's zeroed records live only in memory: after a
            # reopen the punched ranges are holes again (overlaybd does this)
            self.upper_model.s = [None if v == b"" else v for v in self.upper_model.s]
        if self.image is not None:
            self.image.close()
        lowers = [open_layer(p) for p in self.lowers]
        upper = RWLayer.open(*self.upper_paths) if self.upper_model is not None else None
        self.image = Image(lowers, upper)

    def _new_upper(self, sparse):
        self.sparse = sparse
        vsize = 0 if self.lowers else VSIZE          # 0 inherits the stack's size
        self.upper_paths = (self._name("upper.data"), self._name("upper.index"))
        RWLayer.create(*self.upper_paths, vsize, sparse=sparse).close()
        self.upper_model = LayerModel(SECTORS)

    def _align(self):
        return 8 if self.sparse else 1     # sparse punches/allocations are 4 KiB grained

    @rule(sparse=st.booleans())
    @precondition(lambda self: self.image is None)
    def start(self, sparse):
        self._new_upper(sparse)
        self._reopen()

    @rule(sec=st.integers(0, SECTORS - 1), n=st.integers(1, 300), seed=st.integers(0, 255))
    @precondition(lambda self: self.image is not None and self.upper_model is not None)
    def write(self, sec, n, seed):
        a = self._align()
        sec, n = sec - sec % a, max(a, n - n % a)
        n = min(n, SECTORS - sec)
        data = _pattern(seed, n * SECTOR)
        self.image.write(data, sec * SECTOR)
        self.upper_model.write(sec * SECTOR, data)

    @rule(sec=st.integers(0, SECTORS - 1), n=st.integers(1, 300))
    @precondition(lambda self: self.image is not None and self.upper_model is not None)
    def discard(self, sec, n):
        a = self._align()
        sec, n = sec - sec % a, max(a, n - n % a)
        n = min(n, SECTORS - sec)
        self.image.discard(sec * SECTOR, n * SECTOR)
        self.upper_model.discard(sec * SECTOR, n * SECTOR)

    @rule()
    @precondition(lambda self: self.image is not None)
    def reopen(self):
        self.image.fsync()
        self._reopen()

    @rule(how=st.sampled_from(["plain", "lz4", "zstd", "tar-lz4", "zstd-64k", "lz4-threads"]),
          sparse=st.booleans())
    @precondition(lambda self: self.image is not None and self.upper_model is not None
                  and len(self.lowers) < 12)
    def commit(self, how, sparse):
        kw = {"plain": {}, "lz4": {"use_zfile": True}, "zstd": {"use_zfile": True, "algo": 2},
              "tar-lz4": {"use_zfile": True, "use_tar": True},
              "zstd-64k": {"use_zfile": True, "algo": 2, "bs": 65536},
              "lz4-threads": {"use_zfile": True, "threads": 2, "bs": 8192}}[how]
        path = commit_layer(self.image.upper, self._name("layer"), **kw)
        self.lowers.append(path)
        self.models.append(self.upper_model)
        self._new_upper(sparse)
        self._reopen()

    @rule(sparse=st.booleans())
    @precondition(lambda self: self.image is not None and self.upper_model is not None
                  and not self.sparse and len(self.lowers) < 12)
    def seal_and_restack(self, sparse):
        self.image.upper.seal()
        self.lowers.append(self.upper_paths[0])     # the sealed data file is now a lower
        self.models.append(self.upper_model)
        self._new_upper(sparse)
        self._reopen()

    @rule(zf=st.booleans())
    @precondition(lambda self: self.image is not None and len(self.lowers) >= 2)
    def merge(self, zf):
        path = merge_layers(self.lowers, self._name("merged"), use_zfile=zf)
        merged = LayerModel(SECTORS)
        for sec in range(SECTORS):
            for m in reversed(self.models):
                if m.s[sec] is not None:
                    merged.s[sec] = m.s[sec]
                    break
        self.lowers, self.models = [path], [merged]
        self._reopen()

    @rule(sec=st.integers(0, SECTORS - 1), n=st.integers(1, 600))
    @precondition(lambda self: self.image is not None)
    def read(self, sec, n):
        n = min(n, SECTORS - sec)
        got = self.image.read(sec * SECTOR, n * SECTOR)
        assert got == model_read(self._all_models(), sec * SECTOR, n * SECTOR)

    def _all_models(self):
        return self.models + ([self.upper_model] if self.upper_model is not None else [])

    @invariant()
    def whole_disk_matches(self):
        if self.image is None:
            return
        assert self.image.virtual_size == VSIZE
        assert self.image.read(0, VSIZE) == model_read(self._all_models(), 0, VSIZE)


TestStack = StackMachine.TestCase
TestStack.settings = settings(max_examples=40, stateful_step_count=25, deadline=None,
                              suppress_health_check=[HealthCheck.too_slow])
