"""Both config files, overlaybd.json and config.v1.json, are read by one
mechanism (tcmu_obd.configfile) with one set of rules: a wrong type or a
refused value is a ConfigError `<file>: <key path> = <value as JSON>: <why>`,
an unknown key is ignored with an UnknownKeyWarning naming its path, the
first of a duplicated key wins, NaN is not JSON.  A property test holds
configfile.read to a plain model; the rest feed both real files bad input."""
import json
import math
import warnings

import pytest
from hypothesis import given, settings, strategies as st

from tcmu_obd import configfile, service_config
from tcmu_obd.configfile import Key, ListOf, Table
from tcmu_obd.errors import ConfigError, UnknownKeyWarning, UnsupportedError
from tcmu_obd.image import config

# ------------------------------------------------------------------ the mechanism against a model
SCALARS = {"b": "bool", "s": "str", "u": "u32", "i": "i32", "n": "num"}
TABLE = Table({name: Key(kind, None) for name, kind in SCALARS.items()})


def model_ok(kind, v):
    is_int = isinstance(v, int) and not isinstance(v, bool)
    return {"bool": isinstance(v, bool), "str": isinstance(v, str),
            "u32": is_int and 0 <= v < 2**32, "i32": is_int and -2**31 <= v < 2**31,
            "num": (is_int or isinstance(v, float)) and math.isfinite(v)}[kind]


json_values = st.one_of(st.none(), st.booleans(), st.integers(-2**40, 2**40),
                        st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=5),
                        st.lists(st.integers(), max_size=2), st.dictionaries(st.text(max_size=2),
                                                                             st.integers(), max_size=2))


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.sampled_from(sorted(SCALARS) + ["x", "yy"]), json_values, max_size=7))
def test_configfile_rules_read_matches_model(obj):
    bad = next(((k, v) for k, v in obj.items() if k in SCALARS and not model_ok(SCALARS[k], v)), None)
    with warnings.catch_warnings(record=True) as got:
        warnings.simplefilter("always")
        if bad is not None:
            with pytest.raises(ConfigError) as info:
                configfile.read(obj, TABLE, "f.json", "top.")
            assert str(info.value).startswith(f"f.json: top.{bad[0]} = {configfile.show(bad[1])}: expected ")
            return
        value, unknown = configfile.read(obj, TABLE, "f.json", "top.")
    assert value == {k: v for k, v in obj.items() if k in SCALARS}
    assert unknown == tuple(f"top.{k}" for k in obj if k not in SCALARS)
    assert [str(w.message) for w in got] == [f"f.json: unknown key {p} ignored" for p in unknown]
    assert all(w.category is UnknownKeyWarning for w in got)


def test_configfile_rules_nested_lists_and_checks():
    inner = Table({"v": Key("u32", 0, lambda v: "must be even" if v % 2 else None, UnsupportedError)})
    table = Table({"items": Key(ListOf(inner), [])})
    assert configfile.read({"items": [{"v": 2}, {}]}, table, "f")[0] == {"items": [{"v": 2}, {}]}
    with pytest.raises(ConfigError, match=r"^f: items = 3: expected a JSON array$"):
        configfile.read({"items": 3}, table, "f")
    with pytest.raises(ConfigError, match=r"^f: items\[1\] = \"a\": expected a JSON object$"):
        configfile.read({"items": [{}, "a"]}, table, "f")
    with pytest.raises(UnsupportedError, match=r"^f: items\[0\]\.v = 3: must be even$"):
        configfile.read({"items": [{"v": 3}]}, table, "f")
    with pytest.raises(ConfigError, match=r"^f: \(top level\) = \[\]: expected a JSON object$"):
        configfile.read([], table, "f")


# ------------------------------------------------------------------ both files, one rule
def write(tmp_path, name, doc):
    path = tmp_path / name
    path.write_text(doc if isinstance(doc, str) else json.dumps(doc))
    return path


def message_after_file(load, path):
    with pytest.raises(ConfigError) as info:
        load(path)
    msg = str(info.value)
    assert msg.startswith(f"{path}: "), msg
    return msg[len(f"{path}: "):]


@pytest.mark.parametrize("download,shown", [({"delay": "300"}, 'download.delay = "300": expected an integer'),
                                            ({"blockSize": 0}, "download.blockSize = 0: must be > 0"),
                                            (7, "download = 7: expected a JSON object")])
def test_configfile_rules_same_message_in_both_files(tmp_path, download, shown):
    """The same bad `download` object reads the same in overlaybd.json and config.v1.json."""
    g = message_after_file(service_config.load, write(tmp_path, "overlaybd.json", {"download": download}))
    d = message_after_file(config.load, write(tmp_path, "config.v1.json", {"download": download}))
    assert g == d and g.startswith(shown), (g, d)


@pytest.mark.parametrize("doc,shown", [
    ({"lowers": {"file": "a"}}, 'lowers = {"file": "a"}: expected a JSON array'),
    ({"lowers": ["a"]}, 'lowers[0] = "a": expected a JSON object'),
    ({"lowers": [{"file": 3}]}, "lowers[0].file = 3: expected a JSON string"),
    ({"lowers": [{}, {"size": -1}]}, "lowers[1].size = -1: expected an integer in [0, 2^64-1]"),
    ({"lowers": [{"size": True}]}, "lowers[0].size = true: expected an integer"),
    ({"upper": []}, "upper = []: expected a JSON object"),
    ({"upper": {"vsize": "64"}}, 'upper.vsize = "64": expected an integer'),
    ({"accelerationLayer": "yes"}, 'accelerationLayer = "yes": expected a JSON boolean'),
    ({"resultFile": None}, "resultFile = null: expected a JSON string"),
    ({"accelerationLayer": True, "recordTracePath": "/t"},
     'accelerationLayer = true and recordTracePath = "/t": cannot both be set'),
    ("[1]", "(top level) = [1]: expected a JSON object"),
    ('{"upper": {"vsize": NaN}}', "not valid JSON: NaN is not valid JSON"),
    ("{broken", "not valid JSON"),
])
def test_configfile_rules_image_config_bad_input(tmp_path, doc, shown):
    msg = message_after_file(config.load, write(tmp_path, "config.v1.json", doc))
    assert msg.startswith(shown), msg


def test_configfile_rules_image_config_unknown_key_warns(tmp_path):
    path = write(tmp_path, "config.v1.json", {"lowers": [{"file": "a", "sizee": 1}], "upperr": {}})
    with pytest.warns(UnknownKeyWarning) as got:
        cfg = config.load(path)
    assert [str(w.message) for w in got] == [f"{path}: unknown key lowers[0].sizee ignored",
                                             f"{path}: unknown key upperr ignored"]
    assert cfg.unknown_keys == ("lowers[0].sizee", "upperr")
    assert cfg.lowers == [{"file": "a"}]


def test_configfile_rules_duplicate_key_first_wins_in_both(tmp_path):
    cfg = config.load(write(tmp_path, "config.v1.json", '{"resultFile": "/a", "resultFile": "/b"}'))
    assert cfg.result_file == "/a"
    svc = service_config.load(write(tmp_path, "overlaybd.json", '{"auditPath": "/a", "auditPath": "/b"}'))
    assert svc.audit_path == "/a"


def test_configfile_rules_image_download_parsed_once(tmp_path):
    cfg = config.load(write(tmp_path, "config.v1.json", {"download": {"enable": True, "delay": 1}}))
    assert cfg.download == service_config.DownloadConfig(enable=True, delay=1)
    assert service_config.download_settings(cfg.download, None).delay_extra == 30
    assert config.load(write(tmp_path, "config.v1.json", {})).download is None
