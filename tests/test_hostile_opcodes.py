"""Hostile checkpoints assembled by hand, opcode by opcode, framed as torch zip or legacy files.

Each test builds the raw pickle bytes itself (no pickler in the loop, so nothing is "fixed up")
and runs the real entry point. The promise under test: no code from the file runs; bad input
gets exit 1 and one line `ckptsurgery: error: FILE: ...` (never a traceback, never the
catch-all that says CKPTSURGERY_DEBUG); an output never references, or runs, more than its
input; nothing a hostile file does outlives it; time and memory follow the real work; a call torch
refuses is refused, and a storage recorded under two types reads as torch reads it.

Anything that could hang in C code or crash the interpreter runs in a subprocess with a
memory cap and a hard kill (SIGKILL: a Python-level SIGTERM handler never runs while C code
hashes or prints a huge structure)."""

from __future__ import annotations

import json
import os
import pickle
import pickletools
import resource
import struct
import subprocess
import sys
import time
import warnings
import zipfile

import pytest
import torch

from conftest import assert_one_error_line, torch_loads

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# ---- opcode-level assembly -------------------------------------------------------------------

PROTO2 = b"\x80\x02"
MAGIC_NUMBER = 0x1950A86A20F9469CFC6C  # torch's legacy format
LEGACY_PROTOCOL = 1001


def U(text: str) -> bytes:
    """BINUNICODE (lone surrogates allowed, as torch's reader allows them)."""
    raw = text.encode("utf-8", "surrogatepass")
    return b"X" + struct.pack("<I", len(raw)) + raw


def G(module: str, name: str) -> bytes:
    """GLOBAL module name."""
    return b"c" + module.encode() + b"\n" + name.encode() + b"\n"


def I(n: int) -> bytes:
    """BININT1 / BININT2 / BININT / LONG1."""
    if 0 <= n < 256:
        return b"K" + bytes([n])
    if 0 <= n < 65536:
        return b"M" + struct.pack("<H", n)
    if -(2**31) <= n < 2**31:
        return b"J" + struct.pack("<i", n)
    raw = n.to_bytes((n.bit_length() + 8) // 8, "little", signed=True)
    return b"\x8a" + bytes([len(raw)]) + raw


def put(i: int) -> bytes:
    return b"q" + bytes([i]) if i < 256 else b"r" + struct.pack("<I", i)


def get(i: int) -> bytes:
    return b"h" + bytes([i]) if i < 256 else b"j" + struct.pack("<I", i)


def T(*items: bytes) -> bytes:
    """A tuple of already-assembled items (MARK ... TUPLE)."""
    return b"(" + b"".join(items) + b"t"


def D(*pairs: tuple[bytes, bytes]) -> bytes:
    """A dict of already-assembled (key, value) items."""
    return b"}(" + b"".join(k + v for k, v in pairs) + b"u"


def latin1_bytes(data: bytes) -> bytes:
    """bytes, the way protocol 2 (and torch.save) spells them: _codecs.encode(str, 'latin1')."""
    return G("_codecs", "encode") + U(data.decode("latin1")) + U("latin1") + b"\x86R"


def storage_record(key: bytes = None, numel: int = 4, kind: bytes = None, extra: bytes = b"") -> bytes:
    """('storage', torch.FloatStorage, key, 'cpu', numel) as a BINPERSID argument."""
    return (b"(" + U("storage") + (kind if kind is not None else G("torch", "FloatStorage"))
            + (key if key is not None else U("0")) + U("cpu") + I(numel) + extra + b"t")


def tensor(key: str = "0", numel: int = 4, shape=(4,), stride=(1,), offset: int = 0, record: bytes = None) -> bytes:
    """torch._utils._rebuild_tensor_v2((storage record), offset, shape, stride, False, OrderedDict())."""
    record = record if record is not None else storage_record(U(key), numel)
    return (G("torch._utils", "_rebuild_tensor_v2") + b"(" + record + b"Q" + I(offset)
            + T(*map(I, shape)) + T(*map(I, stride)) + b"\x89" + G("collections", "OrderedDict") + b")R" + b"tR")


def rebuild_v2(record: bytes, shape=(4,), requires_grad=False) -> bytes:
    """torch._utils._rebuild_tensor_v2((record), 0, shape, (1,), requires_grad, OrderedDict())."""
    return (G("torch._utils", "_rebuild_tensor_v2") + b"(" + record + b"Q" + I(0) + T(*map(I, shape)) + T(I(1))
            + (b"\x88" if requires_grad else b"\x89") + G("collections", "OrderedDict") + b")R" + b"tR")


STATE_DICT = (U("state_dict"), D((U("w"), tensor())))  # the entry "state_dict": {"w": zeros(4)}
ZERO_STORAGE = {"0": bytes(16)}


def checkpoint(*entries: tuple[bytes, bytes]) -> bytes:
    """A whole data.pkl: {"state_dict": {"w": zeros(4)}, **entries}."""
    return PROTO2 + D(STATE_DICT, *entries) + b"."


def zip_file(path, data_pkl: bytes, storages: dict | None = None, records=()) -> str:
    """`data_pkl` framed as torch's zip format, with `data/KEY` records (stored, not compressed)."""
    storages = ZERO_STORAGE if storages is None else storages
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # zipfile warns about the duplicate names some tests want
        with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
            z.writestr("archive/data.pkl", data_pkl)
            z.writestr("archive/byteorder", "little")
            for key, data in storages.items():
                z.writestr(f"archive/data/{key}", data)
            for name, data in records:
                z.writestr(name, data)
            z.writestr("archive/version", "3\n")
    return str(path)


def legacy_file(path, obj_pkl: bytes, sys_info: bytes | None = None, keys: bytes | None = None,
                storages: dict | None = None, protocol: bytes | None = None) -> str:
    """A legacy (pre-1.6) torch file: magic, protocol, sys_info, the object, the storage keys,
    then each storage as an int64 element count (float32 here) and its bytes."""
    storages = ZERO_STORAGE if storages is None else storages
    if sys_info is None:
        sys_info = pickle.dumps({"protocol_version": LEGACY_PROTOCOL, "little_endian": True, "type_sizes": {}}, 2)
    if keys is None:
        keys = PROTO2 + b"](" + b"".join(U(k) for k in storages) + b"e."
    data = b"".join(struct.pack("<q", len(v) // 4) + v for v in storages.values())
    body = (pickle.dumps(MAGIC_NUMBER, 2) + (protocol or pickle.dumps(LEGACY_PROTOCOL, 2)) + sys_info
            + obj_pkl + keys + data)
    with open(path, "wb") as f:
        f.write(body)
    return str(path)


def legacy_storage_record(key: str = "0", numel: int = 4) -> bytes:
    return storage_record(U(key), numel, extra=b"N")  # the legacy record's sixth field: view metadata


# ---- what a result must look like ------------------------------------------------------------

def assert_clean(result):
    """Either success, or a one-line refusal."""
    if result.code != 0:
        assert_one_error_line(result)
    assert "Traceback" not in result.err and "CKPTSURGERY_DEBUG" not in result.err, result.err


# ---- globals of a pickle, and torch's weights-only-safe names --------------------------------

_FIXED_ARG = {b"\x80": 1, b"J": 4, b"K": 1, b"M": 2, b"G": 8, b"h": 1, b"j": 4, b"q": 1, b"r": 4}
_NO_ARG = set(b"\x81Rbae(su}t\x85\x86\x87N\x88\x89)]\x8fQ")


def scan(data: bytes, pos: int = 0) -> tuple[list[str], int]:
    """The GLOBALs ("module name", in order) of the pickle at `pos`, and where it ends. Reads
    torch's weights-only opcodes only, and decodes names as UTF-8 as pickle and torch do
    (pickletools decodes them as ASCII)."""
    names = []
    while True:
        op = data[pos : pos + 1]
        pos += 1
        if op == b".":
            return names, pos
        if op == b"c":
            module_end = data.index(b"\n", pos)
            name_end = data.index(b"\n", module_end + 1)
            names.append(f"{data[pos:module_end].decode()} {data[module_end + 1:name_end].decode()}")
            pos = name_end + 1
        elif op in _FIXED_ARG:
            pos += _FIXED_ARG[op]
        elif op == b"X":
            pos += 4 + struct.unpack("<I", data[pos : pos + 4])[0]
        elif op in (b"U", b"\x8a"):
            pos += 1 + data[pos]
        elif op and op[0] in _NO_ARG:
            pass
        else:
            raise AssertionError(f"opcode {op!r} at {pos - 1}: outside torch's weights-only set")


def pickles_of(path) -> list[bytes]:
    """The pickles of a torch file: data.pkl of a zip; the five header/object pickles of a legacy file."""
    path = str(path)
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as z:
            return [z.read(n) for n in z.namelist() if n.endswith("data.pkl")]
    data = open(path, "rb").read()
    out, pos = [], 0
    for _ in range(5):
        _, end = scan(data, pos)
        out.append(data[pos:end])
        pos = end
    return out


def globals_of(path) -> set[str]:
    """Every GLOBAL ("module name") the file's pickles name."""
    return {name for blob in pickles_of(path) for name in scan(blob)[0]}


_SAFE = {"collections OrderedDict", "torch Size", "torch device", "_codecs encode", "torch.storage UntypedStorage",
         "__builtin__ set", "__builtin__ bytearray", "__builtin__ complex", "__builtin__ bytes"}


def torch_safe(name: str) -> bool:
    """torch's own weights-only-safe names, which a writer may add: rebuilders, storage types, dtypes."""
    module, _, attr = name.partition(" ")
    if name in _SAFE or (module == "torch._utils" and attr.startswith("_rebuild_")):
        return True
    if module == "torch" and (attr.endswith("Storage") or isinstance(getattr(torch, attr, None), (torch.dtype, torch.qscheme))):
        return True
    return False


def assert_no_new_globals(src, out):
    new = {g for g in globals_of(out) - globals_of(src) if not torch_safe(g)}
    assert not new, f"the output names globals its input did not: {sorted(new)}"


WEIGHTS_ONLY_SERVER = """
import json, sys, torch
for line in sys.stdin:
    verdicts = {}
    for path in json.loads(line):
        try:
            obj = torch.load(path, weights_only=True)
            verdicts[path] = {"types": {str(k): type(v).__name__ for k, v in obj.items()} if isinstance(obj, dict) else {}}
        except Exception as e:
            verdicts[path] = {"error": f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:200]}"}
    print(json.dumps(verdicts), flush=True)
"""


@pytest.fixture(scope="module")
def weights_only():
    """torch.load(path, weights_only=True) in one subprocess for the module (one torch import).
    Call with paths; returns {path: {"types": {key: type name}}} or {path: {"error": "..."}}."""
    proc = subprocess.Popen([sys.executable, "-c", WEIGHTS_ONLY_SERVER], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)

    def load(paths) -> dict[str, dict]:
        proc.stdin.write(json.dumps([str(p) for p in paths]) + "\n")
        proc.stdin.flush()
        line = proc.stdout.readline()
        assert line, "the torch.load subprocess died"
        return json.loads(line)

    yield load
    proc.stdin.close()
    proc.wait(timeout=60)


# ---- the CLI in a fresh interpreter, capped and timed ----------------------------------------

_DRIVER = """
import atexit, os, resource, sys
atexit.register(lambda: open(os.environ["HOSTILE_RSS_FILE"], "w").write(
    str(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)))
from ckptsurgery.cli import main
sys.argv = ["ckptsurgery", *sys.argv[1:]]
main()
"""


class Isolated:
    def __init__(self, code, out, err, seconds, rss_mib):
        self.code, self.out, self.err, self.seconds, self.rss_mib = code, out, err, seconds, rss_mib

    def __repr__(self):
        return (f"<exit {self.code} after {self.seconds:.2f} s, peak RSS {self.rss_mib} MiB, "
                f"stderr {self.err[-600:]!r}>")


CAP = 2 * 2**30  # RLIMIT_AS for the small hostile files of the tests below (run_isolated's memory=)


def run_isolated(tmp_path, *args, timeout: float = 10.0, memory: int = 3 * 2**30) -> Isolated:
    """`ckptsurgery ARGS` in a subprocess under RLIMIT_AS=`memory`, SIGKILLed after `timeout`
    seconds. A negative exit code means a signal: -9 our kill (a hang), -11 a segfault."""
    rss_file = tmp_path / f"rss-{time.monotonic_ns()}"

    def cap():
        resource.setrlimit(resource.RLIMIT_AS, (memory, memory))

    env = dict(os.environ, HOSTILE_RSS_FILE=str(rss_file), PYTHONPATH=REPO)
    env.pop("CKPTSURGERY_DEBUG", None)
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-c", _DRIVER, *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, preexec_fn=cap, env=env, cwd=str(tmp_path))
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
    seconds = time.perf_counter() - start
    rss = int(rss_file.read_text()) // 1024 if rss_file.exists() else None
    return Isolated(proc.returncode, out.decode("utf-8", "replace"), err.decode("utf-8", "replace"), seconds, rss)


def assert_isolated_clean(result: Isolated, within: float):
    """Finished in time on its own (no kill, no crash), with success or one error line."""
    assert result.code in (0, 1), f"killed or crashed: {result!r}"
    assert result.seconds < within, f"too slow: {result!r}"
    if result.code == 1:
        assert result.err.startswith("ckptsurgery: error: ") and result.err.count("\n") == 1, result
        assert "CKPTSURGERY_DEBUG" not in result.err, result


# =============================================================================================
# 1 & 2. BUILD onto tokens, functions and placeholders; memo reuse of allowed globals.
#        Then a benign file in the same process must read and convert exactly as alone.
# =============================================================================================

def _build(target: bytes, state: bytes) -> bytes:
    return target + state + b"b"


def _slots(state: bytes) -> bytes:
    """BUILD's (dict state, slot state) form: the slot state goes through setattr."""
    return b"N" + state + b"\x86"


_OS_SYSTEM_NAME = D((U("module"), U("posix")), (U("name"), U("system")))

# name -> (value of the "x" entry beside the state dict, expectation: "refused", "accepted" or "either")
POISONS = {
    # BUILD onto immutable tokens
    "build_dict_on_dtype": (_build(G("torch", "float32"), _OS_SYSTEM_NAME), "refused"),
    "build_slots_on_dtype": (_build(G("torch", "float32"), _slots(_OS_SYSTEM_NAME)), "refused"),
    "build_dtype_on_storage_type": (_build(G("torch", "FloatStorage"), _slots(D((U("dtype"), G("torch", "int64"))))), "refused"),
    "build_on_untyped_storage": (_build(G("torch.storage", "UntypedStorage"), _slots(D((U("kind"), U("dtype"))))), "refused"),
    "build_on_qscheme": (_build(G("torch", "per_tensor_affine"), _slots(D((U("name"), U("x"))))), "refused"),
    # BUILD onto allow-listed functions and classes
    "build_defaults_on_rebuilder": (_build(G("torch._utils", "_rebuild_tensor_v2"), D(
        (U("__defaults__"), T(G("posix", "system"))), (U("__code__"), G("posix", "system")))), "refused"),
    "build_slots_on_rebuilder": (_build(G("torch._utils", "_rebuild_tensor_v2"), _slots(D(
        (U("__kwdefaults__"), D((U("metadata"), G("posix", "system")))), (U("__name__"), U("system"))))), "refused"),
    "build_on_ordereddict_class": (_build(G("collections", "OrderedDict"), _slots(D(
        (U("__init__"), G("posix", "system")), (U("items"), G("posix", "system"))))), "refused"),
    "build_on_torch_size": (_build(G("torch", "Size"), D((U("__defaults__"), T(I(7))))), "refused"),
    "build_on_codecs_encode": (_build(G("_codecs", "encode"), _slots(D((U("__defaults__"), T(U("rot13")))))), "refused"),
    "build_on_builtin_set": (_build(G("__builtin__", "set"), _slots(D((U("__defaults__"), T(T()))))), "refused"),
    # BUILD onto values the allow-list made
    "build_on_device": (_build(G("torch", "device") + T(U("cpu")) + b"R", _slots(D((U("args"), T(U("cuda")))))), "refused"),
    "build_on_tensor": (_build(tensor(), D((U("offset"), I(9)))), "refused"),
    "build_on_storage": (_build(storage_record() + b"Q", _slots(D((U("nbytes"), I(2**31 - 1))))), "refused"),
    "build_on_torch_size_value": (_build(G("torch", "Size") + T(T(I(2))) + b"R", D((U("x"), I(1)))), "refused"),
    # BUILD onto placeholders
    "build_on_placeholder_global": (_build(G("posix", "system"), _slots(D((U("module"), U("torch")),
                                                                         (U("name"), U("float32"))))), "either"),
    "build_twice_on_placeholder_object": (_build(_build(G("m", "C") + b")\x81", D((U("a"), I(1)))), D((U("a"), I(2)))),
                                          "refused"),
    "build_on_placeholder_object": (_build(G("posix", "system") + T(U("true")) + b"R", _slots(D(
        (U("__class__"), G("torch", "float32")), (U("module"), U("torch"))))), "accepted"),
    "build_token_as_state_of_placeholder": (_build(G("m", "C") + b")\x81", G("torch", "float32")), "accepted"),
    # memo reuse of an allowed global in call and BUILD positions
    "memo_dtype_reduce": (T(G("torch", "float32") + put(200), get(200) + b")R"), "refused"),
    "memo_dtype_newobj": (T(G("torch", "float32") + put(200), get(200) + b")\x81"), "refused"),
    "memo_dtype_build": (T(G("torch", "float32") + put(200), _build(get(200), _OS_SYSTEM_NAME)), "refused"),
    "memo_rebuilder_build": (T(G("torch._utils", "_rebuild_tensor_v2") + put(200),
                               _build(get(200), D((U("__code__"), G("posix", "system"))))), "refused"),
    "memo_ordereddict_newobj": (T(G("collections", "OrderedDict") + put(200), get(200) + b")\x81"), "refused"),
    "memo_size_newobj": (T(G("torch", "Size") + put(200), get(200) + T(T(I(1))) + b"\x81"), "refused"),
    "memo_storage_type_reduce": (T(G("torch", "FloatStorage") + put(200), get(200) + T(I(10**6)) + b"R"), "refused"),
    "memo_placeholder_as_storage_type": (T(G("posix", "system") + put(200),
                                           storage_record(kind=get(200)) + b"Q"), "refused"),
    "memo_token_as_call_arguments": (T(G("torch", "float32") + put(200), G("torch", "Size") + get(200) + b"R"), "refused"),
    "memo_placeholder_called_twice": (T(G("m", "f") + put(200), get(200) + b")R", get(200) + b")R"), "accepted"),
    "memo_state_dict_as_hooks": (None, "accepted"),  # built below: a tensor's hooks are the dict holding it
}


def _state_dict_as_hooks() -> bytes:
    """{"state_dict": sd} where sd["w"]'s backward_hooks argument is sd itself, still empty."""
    w = (G("torch._utils", "_rebuild_tensor_v2") + b"(" + storage_record() + b"Q" + I(0) + T(I(4)) + T(I(1))
         + b"\x89" + get(201) + b"tR")
    return PROTO2 + D((U("state_dict"), G("collections", "OrderedDict") + b")R" + put(201) + U("w") + w + b"s")) + b"."


def poison_file(folder, name: str) -> str:
    value, _ = POISONS[name]
    body = _state_dict_as_hooks() if value is None else checkpoint((U("x"), value))
    return zip_file(folder / f"{name}.pth", body)


def benign_outputs(cli, benign, folder) -> dict[str, bytes]:
    """What the benign file turns into: .pth and .safetensors conversions and its inspect --json --stats."""
    folder.mkdir()
    assert cli("convert", benign, "-o", folder / "b.pth").code == 0
    assert cli("convert", benign, "-o", folder / "b.safetensors").code == 0
    listing = cli("inspect", benign, "--json", "--stats")
    assert listing.code == 0
    return {"b.pth": (folder / "b.pth").read_bytes(), "b.safetensors": (folder / "b.safetensors").read_bytes(),
            "inspect": listing.out.encode()}


@pytest.mark.parametrize("name", list(POISONS))
def test_poison_then_benign_file_reads_as_alone(cli, tmp_path, zip_pth, name):
    """BUILD / memo reuse aimed at tokens, allow-listed functions and placeholders, then a benign file."""
    alone = benign_outputs(cli, zip_pth, tmp_path / "before")

    poison = poison_file(tmp_path, name)  # through every reading path, in this same process
    results = [cli("inspect", poison, "--json"), cli("inspect", poison, "--stats"),
               cli("convert", poison, "-o", tmp_path / "p.pth"), cli("convert", poison, "-o", tmp_path / "p.safetensors")]
    for result in results:
        assert_clean(result)
    expect = POISONS[name][1]
    if expect == "refused":
        assert_one_error_line(results[0], str(poison))
    elif expect == "accepted":
        assert results[0].code == 0, results[0].err

    assert benign_outputs(cli, zip_pth, tmp_path / "after") == alone
    same = cli("diff", zip_pth, tmp_path / "before" / "b.pth", "--json")
    assert same.code == 0 and same.json()["identical"], same.err

    # diff poison benign: refused with one line, or a report that reads the benign side right
    result = cli("diff", poison, zip_pth, "--json")
    if results[0].code == 1:
        assert_one_error_line(result, str(poison), code=2)
    else:
        assert result.err == "", result.err
        benign_names = [t["name"] for t in json.loads(alone["inspect"])["tensors"]]
        poison_names = [t["name"] for t in results[0].json()["tensors"]]
        assert result.json()["only_in_b"] == [n for n in benign_names if n not in poison_names]
        assert result.json()["only_in_a"] == [n for n in poison_names if n not in benign_names]


def test_memoized_tensor_wrapped_as_parameter_stays_a_plain_tensor(cli, tmp_path, weights_only):
    """Memo reuse: {"a": t, "b": _rebuild_parameter(BINGET t)} — torch keeps "a" a plain tensor."""
    body = PROTO2 + D((U("a"), tensor() + put(50)),
                      (U("b"), G("torch._utils", "_rebuild_parameter") + get(50) + b"\x88"
                       + G("collections", "OrderedDict") + b")R" + b"\x87R")) + b"."
    src = zip_file(tmp_path / "param_memo.pth", body)
    doc = cli("inspect", src, "--json")
    assert doc.code == 0, doc.err
    grads = {t["name"]: t["requires_grad"] for t in doc.json()["tensors"]}
    assert grads == {"a": None, "b": True}, grads  # "a" is a plain tensor, "b" the parameter
    out = tmp_path / "out.pth"
    assert cli("convert", src, "-o", out).code == 0
    loaded = weights_only([src, out])
    src_kinds, out_kinds = loaded[src].get("types"), loaded[str(out)].get("types")
    assert src_kinds == {"a": "Tensor", "b": "Parameter"}, loaded
    assert out_kinds == src_kinds, f"the input loads as {src_kinds}, the output as {out_kinds}"


# =============================================================================================
# 3. Persistent ids that are not storage records
# =============================================================================================

def _with_persid(pid: bytes) -> bytes:
    return PROTO2 + D((U("x"), pid + b"Q")) + b"."


PERSISTENT_IDS = {
    "int": (I(0), "not a storage record"),
    "string": (U("storage"), "not a storage record"),
    "none": (b"N", "not a storage record"),
    "list": (b"](" + U("storage") + G("torch", "FloatStorage") + U("0") + U("cpu") + I(4) + b"e", "not a storage record"),
    "module_record_in_zip": (T(U("module"), G("posix", "system"), U("x.py"), U("import os")), "not a storage record"),
    "empty_tuple": (b")", "not a storage record"),
    "arity_1": (T(U("storage")), "not a storage record"),
    "arity_3": (T(U("storage"), G("torch", "FloatStorage"), U("0")), "not a storage record"),
    "arity_4": (T(U("storage"), G("torch", "FloatStorage"), U("0"), U("cpu")), "not a storage record"),
    "arity_7": (storage_record(extra=b"NN"), "not a storage record"),
    "other_typename": (T(U("Storage"), G("torch", "FloatStorage"), U("0"), U("cpu"), I(4)), "not a storage record"),
    "inert_storage_type": (storage_record(kind=G("evil", "Storage")), "unknown storage type evil.Storage"),
    "dtype_as_storage_type": (storage_record(kind=G("torch", "float32")), "unknown storage type"),
    "string_as_storage_type": (storage_record(kind=U("FloatStorage")), "unknown storage type"),
    "int_key": (storage_record(key=I(0)), "bad storage record"),
    "negative_numel": (storage_record(numel=-1), "bad storage record"),
    "numel_beyond_int64": (storage_record(numel=2**64), "bad storage record"),
    "location_not_a_string": (T(U("storage"), G("torch", "FloatStorage"), U("0"), b"N", I(4)), "bad storage record"),
    "missing_record": (storage_record(key=U("nope")), "data/nope is missing"),
    "numel_past_record": (storage_record(numel=5), "shorter than"),
}


@pytest.mark.parametrize("name", list(PERSISTENT_IDS))
def test_persistent_ids_that_are_not_storage_records(cli, tmp_path, name):
    """BINPERSID of ints, strings, ('module', ...) in a zip, wrong arity, inert storage types, bad fields."""
    pid, fragment = PERSISTENT_IDS[name]
    path = zip_file(tmp_path / f"{name}.pth", _with_persid(pid))
    assert_one_error_line(cli("inspect", path, "--json"), str(path), fragment)
    assert_one_error_line(cli("convert", path, "-o", tmp_path / "o.pth"), fragment)


@pytest.mark.parametrize("second, refused", [
    pytest.param(storage_record(kind=G("torch", "IntStorage")), False, id="other_type"),
    pytest.param(storage_record(numel=2), True, id="other_size"),
    pytest.param(storage_record(kind=G("torch.storage", "UntypedStorage"), numel=16), False, id="untyped"),
    pytest.param(storage_record(kind=G("torch.storage", "UntypedStorage"), numel=15), True, id="untyped_size"),
])
def test_storage_key_reused_with_another_type_or_size(cli, tmp_path, second, refused):
    """Two storage records name key '0': another type over the same bytes is how torch records a
    view as another dtype (read, as torch reads it); another size is ambiguous (refused)."""
    path = zip_file(tmp_path / "reuse.pth", checkpoint((U("x"), second + b"Q")))
    if refused:
        assert_one_error_line(cli("inspect", path), "recorded twice with different sizes")
    else:
        assert cli("inspect", path).code == 0


def test_six_field_storage_record_in_a_zip_is_refused(cli, tmp_path, weights_only):
    """A zip storage record with the legacy format's sixth field: torch.load cannot read the file."""
    path = zip_file(tmp_path / "six.pth", checkpoint((U("x"), tensor(record=storage_record(extra=b"N")))))
    torch_says = weights_only([path])[path]
    assert "unpack" in torch_says.get("error", ""), torch_says
    assert_one_error_line(cli("inspect", path), str(path))


def test_legacy_module_record_is_an_inert_class(cli, tmp_path):
    """Legacy ('module', GLOBAL, file, source) persistent ids: the class stays a listed placeholder."""
    record = T(U("module"), G("usercode", "Net"), U("/home/u/usercode.py"), U("import os; os.system('x')"))
    obj = PROTO2 + D((U("state_dict"), D((U("w"), tensor(record=legacy_storage_record())))),
                     (U("cls"), record + b"Q"), (U("made"), record + b"Q" + b")\x81")) + b"."
    path = legacy_file(tmp_path / "module.pth", obj)
    doc = cli("inspect", path, "--json")
    assert doc.code == 0, doc.err
    assert "usercode.Net" in doc.json()["inert"]
    out = tmp_path / "out.pth"
    assert cli("convert", path, "-o", out).code == 0
    assert_no_new_globals(path, out)
    bad = T(U("module"), G("torch", "float32"), U("f"), U("s"))
    path = legacy_file(tmp_path / "module_token.pth", PROTO2 + D((U("x"), bad + b"Q")) + b".")
    assert_one_error_line(cli("inspect", path), "not a storage record")


# =============================================================================================
# 4. Opcodes torch's weights-only loader does not read: refused with one line
# =============================================================================================

TORCH_WEIGHTS_ONLY_OPCODES = {
    "GLOBAL", "NEWOBJ", "REDUCE", "BUILD", "APPEND", "APPENDS", "SETITEM", "SETITEMS", "MARK", "TUPLE", "TUPLE1",
    "TUPLE2", "TUPLE3", "NONE", "NEWFALSE", "NEWTRUE", "EMPTY_TUPLE", "EMPTY_LIST", "EMPTY_DICT", "EMPTY_SET",
    "BININT", "BININT1", "BININT2", "BINFLOAT", "BINUNICODE", "SHORT_BINSTRING", "BINPERSID", "BINGET",
    "LONG_BINGET", "BINPUT", "LONG_BINPUT", "LONG1", "PROTO", "STOP",
}
REFUSED_OPCODES = [op for op in pickletools.opcodes if op.name not in TORCH_WEIGHTS_ONLY_OPCODES]

# realistic arguments for the ones that matter most: each would run os.system, or allocate
HEADLINE = {
    "STACK_GLOBAL": PROTO2 + U("posix") + U("system") + b"\x93" + T(U("true")) + b"R.",
    "INST": PROTO2 + b"(" + U("true") + b"iposix\nsystem\n.",
    "OBJ": PROTO2 + b"(" + G("posix", "system") + U("true") + b"o.",
    "PERSID": PROTO2 + b"P0\n.",
    "EXT1": PROTO2 + b"\x82\x01" + T(U("true")) + b"R.",
    "EXT2": PROTO2 + b"\x83\x01\x00.",
    "EXT4": PROTO2 + b"\x84\x01\x00\x00\x00.",
    "BINBYTES8": PROTO2 + b"\x8e" + struct.pack("<Q", 2**62) + b".",
    "BYTEARRAY8": PROTO2 + b"\x96" + struct.pack("<Q", 2**62) + b".",
    "FRAME": b"\x80\x04\x95" + struct.pack("<Q", 2**62) + b"K\x01.",
    "MEMOIZE": PROTO2 + G("posix", "system") + b"\x94.",
    "NEWOBJ_EX": PROTO2 + G("m", "C") + b")}\x92.",
    "BINUNICODE8": PROTO2 + b"\x8d" + struct.pack("<Q", 2**62) + b".",
    "LONG4": PROTO2 + b"\x8b" + struct.pack("<i", 2**31 - 1) + b".",
}


@pytest.mark.parametrize("op", REFUSED_OPCODES, ids=[op.name for op in REFUSED_OPCODES])
def test_every_other_opcode_is_refused(cli, tmp_path, limited_heap, op):
    """Each opcode outside torch's weights-only set, as the first opcode after PROTO, in a zip."""
    body = HEADLINE.get(op.name, PROTO2 + op.code.encode("latin1") + b"\xff" * 16 + b".")
    path = zip_file(tmp_path / "op.pth", body)
    result = cli("inspect", path)
    assert_one_error_line(result, str(path), op.name)


@pytest.mark.parametrize("names", [
    pytest.param((U("posix"), U("system")), id="plain"),
    pytest.param((U("os\nsystem"), U("x")), id="newline_in_module"),
    pytest.param((U("os"), U("system\nc")), id="newline_in_name"),
    pytest.param((U("torch"), U("float32")), id="allowed_name"),
    pytest.param((U("posix") + put(9), get(9)), id="memoized_names"),
    pytest.param((I(1), I(2)), id="not_strings"),
])
@pytest.mark.parametrize("frame", ["zip", "legacy"])
def test_stack_global_with_computed_names_is_refused(cli, tmp_path, names, frame):
    """STACK_GLOBAL over names from the stack — newlines, memo, even allowed ones — then a call."""
    body = PROTO2 + D((U("x"), names[0] + names[1] + b"\x93" + T(U("true")) + b"R")) + b"."
    path = zip_file(tmp_path / "sg.pth", body) if frame == "zip" else legacy_file(tmp_path / "sg.pth", body)
    assert_one_error_line(cli("inspect", path, "--json"), "STACK_GLOBAL")
    assert_one_error_line(cli("convert", path, "-o", tmp_path / "o.pth"), "STACK_GLOBAL")


@pytest.mark.parametrize("where", ["protocol", "sys_info", "keys"])
def test_refused_opcode_in_a_legacy_header_pickle(cli, tmp_path, where):
    """STACK_GLOBAL inside a legacy file's protocol, system-info or storage-key pickle."""
    bad = PROTO2 + U("posix") + U("system") + b"\x93" + T(U("true")) + b"R."
    obj = PROTO2 + D((U("w"), tensor(record=legacy_storage_record()))) + b"."
    path = legacy_file(tmp_path / "h.pth", obj, **{where: bad})
    assert_one_error_line(cli("inspect", path), "STACK_GLOBAL")


@pytest.mark.parametrize("module, name", [
    ("posix", "system\r"), ("os system", "x"), ("", "system"), ("posix", ""), ("a..b", "c"), ("1os", "system"),
    ("posix", "sys-tem"), ("os\x00", "system"), ("posix", "system "), ("posix", "\u2028system"),
])
def test_global_names_that_are_not_python_names_are_refused(cli, tmp_path, module, name):
    """GLOBAL with a name that is not a dotted identifier: never read, so never written back."""
    path = zip_file(tmp_path / "name.pth", checkpoint((U("x"), G(module, name) + b")R")))
    assert_one_error_line(cli("inspect", path), "not a Python name")


def test_global_name_that_is_not_utf8_is_refused(cli, tmp_path):
    """GLOBAL whose module bytes are not UTF-8."""
    path = zip_file(tmp_path / "name.pth", checkpoint((U("x"), b"c\xff\xfe\nsystem\n)R")))
    assert_one_error_line(cli("inspect", path), str(path))


def test_odd_but_valid_identifiers_round_trip_exactly(cli, tmp_path):
    """Placeholders named by non-ASCII identifiers (fullwidth, NFKC-equal to os.system): kept byte for byte."""
    odd = [("\uff4f\uff53", "\uff53\uff59\uff53\uff54\uff45\uff4d"), ("posix", "s\u0301ystem"), ("\u210c", "_")]
    entries = [(U(f"x{i}"), G(m, n) + T(U("true")) + b"R") for i, (m, n) in enumerate(odd)]
    path = zip_file(tmp_path / "odd.pth", checkpoint(*entries))
    doc = cli("inspect", path, "--json")
    assert doc.code == 0, doc.err
    assert sorted(doc.json()["inert"]) == sorted(f"{m}.{n}" for m, n in odd)
    out = tmp_path / "odd_out.pth"
    assert cli("convert", path, "-o", out).code == 0
    assert {f"{m} {n}" for m, n in odd} <= globals_of(out)
    assert_no_new_globals(path, out)


# =============================================================================================
# 5. Nested pickles stay inert, and are listed
# =============================================================================================

class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


NESTED = {
    "pickle.loads": lambda inner: G("pickle", "loads") + T(latin1_bytes(inner)) + b"R",
    "_pickle.loads": lambda inner: G("_pickle", "loads") + T(latin1_bytes(inner)) + b"R",
    "torch.load": lambda inner: G("torch", "load") + T(G("io", "BytesIO") + T(latin1_bytes(inner)) + b"R") + b"R",
    "torch.serialization._legacy_load": lambda inner: G("torch.serialization", "_legacy_load") + T(
        G("io", "BytesIO") + T(latin1_bytes(inner)) + b"R", U("cpu"), G("pickle", "loads")) + b"R",
}


@pytest.mark.parametrize("where", ["beside", "extra_state"])
@pytest.mark.parametrize("name", list(NESTED))
def test_nested_pickle_stays_inert_and_listed(cli, tmp_path, name, where):
    """A pickle's bytes handed to an inert loader, beside the state dict or as an _extra_state value."""
    marker = tmp_path / "FIRED"
    inner = pickle.dumps(_Payload(marker), protocol=2)
    value = NESTED[name](inner)
    if where == "beside":
        body = checkpoint((U("x"), value))
    else:
        body = PROTO2 + D((U("w"), tensor()), (U("blk._extra_state"), value)) + b"."
    path = zip_file(tmp_path / "nested.pth", body)
    doc = cli("inspect", path, "--json")
    assert doc.code == 0, doc.err
    assert name in doc.json()["inert"], doc.json()["inert"]
    out = tmp_path / "out.pth"
    assert cli("convert", path, "-o", out).code == 0
    assert cli("convert", path, "-o", tmp_path / "out.safetensors").code == 0
    assert name in cli("inspect", out, "--json").json()["inert"]
    assert_no_new_globals(path, out)
    assert not marker.exists()


# =============================================================================================
# 6. An output never names, or runs, more than its input
# =============================================================================================

def _accepted_corpus(folder) -> dict[str, str]:
    """Hostile files the tool accepts (exit 0), each exercising one way back into a .pth."""
    files = {name: poison_file(folder, name) for name, (_, expect) in POISONS.items() if expect == "accepted"}
    inner = pickle.dumps(_Payload(folder / "FIRED"), protocol=2)
    files["nested_pickle"] = zip_file(folder / "nested.pth", checkpoint((U("x"), NESTED["pickle.loads"](inner))))
    files["call_on_a_call"] = zip_file(folder / "callcall.pth", checkpoint((U("x"), G("builtins", "getattr") + T(
        G("importlib", "import_module") + T(U("os")) + b"R", U("system")) + b"R" + T(U("true")) + b"R")))
    files["newobj_with_items_and_state"] = zip_file(folder / "newobj.pth", checkpoint((U("x"), G("m", "C") + T(I(1)) + b"\x81"
                                                    + b"(" + I(1) + b"e" + b"(" + U("k") + I(2) + b"u" + D((U("s"), I(3))) + b"b")))
    files["rebuild_from_type_v2_with_system"] = zip_file(folder / "rftv2.pth", checkpoint((U("x"), G(
        "torch._tensor", "_rebuild_from_type_v2") + T(G("posix", "system"), G("torch", "Tensor"), T(U("true")), D()) + b"R")))
    files["rebuild_from_type_v2_tensor"] = zip_file(folder / "rftv2t.pth", PROTO2 + D((U("w"), G(
        "torch._tensor", "_rebuild_from_type_v2") + T(G("torch._utils", "_rebuild_tensor_v2"), G("torch", "Tensor"),
                                                      b"(" + storage_record() + b"Q" + I(0) + T(I(4)) + T(I(1)) + b"\x89"
                                                      + G("collections", "OrderedDict") + b")Rt", D()) + b"R")) + b".")
    files["metadata_holds_a_placeholder"] = zip_file(folder / "meta.pth", PROTO2 + G("collections", "OrderedDict") + b")R"
                                                     + put(1) + U("w") + tensor() + b"s"
                                                     + D((U("_metadata"), D((U(""), G("posix", "system") + T(U("true")) + b"R")))) + b"b.")
    files["counter_and_parameter_newobj"] = zip_file(folder / "counter.pth", checkpoint(
        (U("c"), G("collections", "Counter") + T(D((U("a"), I(1)))) + b"R"),
        (U("p"), G("torch.nn.parameter", "Parameter") + T(tensor(), b"\x88") + b"\x81")))
    files["legacy_with_placeholders"] = legacy_file(folder / "legacy.pth", PROTO2 + D(
        (U("state_dict"), D((U("w"), tensor(record=legacy_storage_record())))),
        (U("x"), G("posix", "system") + T(U("true")) + b"R")) + b".")
    files["containers_and_scalars"] = zip_file(folder / "scalars.pth", checkpoint(
        (U("set"), G("builtins", "set") + T(b"](" + I(3) + I(1) + I(2) + b"e") + b"R"),
        (U("empty_set"), b"\x8f"), (U("complex"), G("builtins", "complex") + T(b"G" + struct.pack(">d", 1.5), I(2)) + b"R"),
        (U("bytes"), latin1_bytes(b"\x00\xffabc")), (U("bytearray"), G("builtins", "bytearray") + T(latin1_bytes(b"ab")) + b"R"),
        (U("size"), G("torch", "Size") + T(T(I(2), I(3))) + b"R"), (U("device"), G("torch", "device") + T(U("cpu")) + b"R"),
        (U("big"), I(2**100)), (U("nan"), b"G" + struct.pack(">d", float("nan"))), (U("surrogate"), U("\ud800"))))
    return files


@pytest.fixture(scope="module")
def accepted_corpus(tmp_path_factory):
    return _accepted_corpus(tmp_path_factory.mktemp("accepted"))


ACCEPTED_NAMES = [n for n, (_, e) in POISONS.items() if e == "accepted"] + [
    "nested_pickle", "call_on_a_call", "newobj_with_items_and_state", "rebuild_from_type_v2_with_system",
    "rebuild_from_type_v2_tensor", "metadata_holds_a_placeholder", "counter_and_parameter_newobj",
    "legacy_with_placeholders", "containers_and_scalars"]


@pytest.mark.parametrize("name", ACCEPTED_NAMES)
def test_pth_output_names_no_global_its_input_did_not(cli, tmp_path, accepted_corpus, name):
    """For each accepted hostile file: the .pth output's GLOBALs are the input's, or torch's safe ones."""
    src = accepted_corpus[name]
    assert cli("inspect", src).code == 0
    out = tmp_path / "out.pth"
    result = cli("convert", src, "-o", out)
    assert result.code == 0, result.err
    assert_no_new_globals(src, out)
    again = tmp_path / "again.pth"
    assert cli("convert", out, "-o", again).code == 0
    assert again.read_bytes() == out.read_bytes()  # a fixed point: nothing grows on each pass


def test_weights_only_loadability_is_kept(cli, tmp_path, accepted_corpus, weights_only):
    """torch.load(weights_only=True) reads each .pth output whenever it reads the input."""
    pairs = []
    for name in ACCEPTED_NAMES:
        out = tmp_path / f"{name}.pth"
        assert cli("convert", accepted_corpus[name], "-o", out).code == 0, name
        pairs.append((accepted_corpus[name], str(out)))
    verdicts = weights_only([p for pair in pairs for p in pair])
    assert any("types" in verdicts[src] for src, _ in pairs)  # the check is not vacuous
    lost = {src: verdicts[out] for src, out in pairs if "types" in verdicts[src] and "types" not in verdicts[out]}
    assert not lost, lost


def test_empty_bytes_keep_weights_only_loadable(cli, tmp_path, weights_only):
    """_codecs.encode('', 'latin1') — b'' the weights-only way — must not come back as builtins.bytes()."""
    src = zip_file(tmp_path / "empty_bytes.pth", checkpoint((U("e"), latin1_bytes(b""))))
    out = tmp_path / "out.pth"
    assert cli("convert", src, "-o", out).code == 0
    verdicts = weights_only([src, out])
    assert "types" in verdicts[src], verdicts
    assert "types" in verdicts[str(out)], f"the input loads with weights_only=True, the output does not: {verdicts}"


_FULL_LOAD = """
import io, pickle, sys, zipfile
calls = []
class Full(pickle.Unpickler):
    # what torch.load(weights_only=False) would do, without importing torch: every global is
    # imported and called as pickle does, except torch's own (stubbed) and m.f (counts its calls)
    def find_class(self, module, name):
        if (module, name) == ("m", "f"):
            return lambda *args: calls.append(args) or len(calls)
        if module.split(".")[0] == "torch":
            return lambda *a, **k: None
        return super().find_class(module, name)
    def persistent_load(self, pid):
        return None
try:
    Full(io.BytesIO(zipfile.ZipFile(sys.argv[1]).read("archive/data.pkl"))).load()
except Exception as e:
    print(type(e).__name__, file=sys.stderr)
print(len(calls))
"""


def full_load(path, cwd) -> str:
    """Unpickle `path` the unsafe way in a subprocess; returns how many times m.f was called."""
    return subprocess.run([sys.executable, "-c", _FULL_LOAD, str(path)], capture_output=True, text=True,
                          timeout=60, cwd=cwd).stdout.strip()


def test_output_does_not_drop_a_failing_import_that_guards_a_payload(cli, tmp_path):
    """GLOBAL of a missing module left on the stack under the object: it stops pickle before os.system runs."""
    marker = tmp_path / "FIRED"
    body = (PROTO2 + G("no_such_module_ckpt", "guard")
            + D((U("x"), G("posix", "system") + T(U(f"touch {marker}")) + b"R"), STATE_DICT) + b".")
    src = zip_file(tmp_path / "guard.pth", body)
    out = tmp_path / "out.pth"
    result = cli("convert", src, "-o", out)
    assert not marker.exists()
    full_load(src, tmp_path)
    assert not marker.exists()  # pickle fails on the guard first: the input runs nothing
    # a rewrite would drop the guard: the file is refused, as torch.save never leaves one
    assert result.code == 1 and "left over" in result.err and not out.exists(), result.err


def test_set_of_placeholder_calls_keeps_the_inputs_call_order(cli, tmp_path):
    """builtins.set([m0.f(), m1.f(), ...]): torch would hash each by running its class's code, so
    it is refused; a set of plain values is written in the order the input listed it."""
    calls = [f"m{i} f" for i in range(12)]
    items = b"".join(G(*c.split()) + b")R" for c in calls)
    src = zip_file(tmp_path / "set.pth", checkpoint((U("s"), G("builtins", "set") + T(b"](" + items + b"e") + b"R")))
    assert_one_error_line(cli("convert", src, "-o", tmp_path / "out.pth"), "set member")
    words = [f"w{i}" for i in (5, 1, 9, 3, 7, 0, 11, 2)]
    src = zip_file(tmp_path / "words.pth", checkpoint((U("s"), G("builtins", "set") + T(b"](" + b"".join(map(U, words)) + b"e") + b"R")))
    out = tmp_path / "out.pth"
    assert cli("convert", src, "-o", out).code == 0
    written = [arg for op, arg, _ in pickletools.genops(pickles_of(out)[0]) if op.name == "BINUNICODE" and arg in words]
    assert written == words


def test_call_reached_through_its_own_argument_is_written_once(cli, tmp_path):
    """X = m.f(L); L.append(X); value (X, L): one call in the input, so one call in the output."""
    value = G("m", "f") + T(b"]" + put(150)) + b"R" + put(151) + get(150) + get(151) + b"a" + b"\x86"
    src = zip_file(tmp_path / "cycle.pth", checkpoint((U("x"), value)))
    out = tmp_path / "out.pth"
    result = cli("convert", src, "-o", out)
    assert_clean(result)
    if result.code == 0:
        counts = [full_load(src, tmp_path), full_load(out, tmp_path)]
        assert counts == ["1", "1"], f"m.f called {counts[0]} time(s) by the input, {counts[1]} by the output"


def test_tuple_reaching_itself_through_a_list(cli, tmp_path, weights_only):
    """t = ([],); t[0].append(t): torch reads it; converting writes it, or names the file in one line."""
    value = T(b"]" + put(150)) + put(151) + get(150) + get(151) + b"a" + b"\x86"
    src = zip_file(tmp_path / "tcycle.pth", checkpoint((U("x"), value)))
    assert "types" in weights_only([src])[src]
    result = cli("convert", src, "-o", tmp_path / "out.pth")
    if result.code != 0:
        assert_one_error_line(result, str(src))


# =============================================================================================
# 7. Bounded time and memory
# =============================================================================================

def test_million_deep_tuple_as_dict_key_does_not_crash(tmp_path):
    """~1 MB: a dict keyed by a tuple nested 1,000,000 deep (TUPLE1 repeated), in a subprocess."""
    body = PROTO2 + b"}" + b"N" + b"\x85" * 1_000_000 + I(1) + b"s."
    path = zip_file(tmp_path / "deep.pth", body)
    assert os.path.getsize(path) > 1_000_000
    result = run_isolated(tmp_path, "inspect", path, timeout=20)
    assert result.code == 1, f"expected a refusal, not a crash: {result!r}"
    assert_isolated_clean(result, within=20)


def tuple_dag(levels: int, first_memo: int = 100) -> bytes:
    """t0 = 'x'; t(i) = (t(i-1), t(i-1)), memoized: one expression, ~7 bytes a level."""
    out = U("x")
    for i in range(levels):
        out += put(first_memo + i) + get(first_memo + i) + b"\x86"
    return out


def list_dag(levels: int, first_memo: int = 100) -> bytes:
    """l0 = []; l(i) = [l(i-1), l(i-1)], memoized: one expression, nothing left on the stack."""
    out = b"]"
    for i in range(levels):
        out = b"](" + out + put(first_memo + i) + get(first_memo + i) + b"e"
    return out


@pytest.mark.parametrize("place", ["value", "dict_key", "set_member"])
def test_shared_tuple_dag_finishes_in_seconds(tmp_path, place):
    """A ~400-byte 60-level tuple DAG as a value, a dict key or a set member, converted to .pth."""
    dag = tuple_dag(60)
    value = {"value": dag, "dict_key": b"}" + dag + I(1) + b"s",
             "set_member": G("builtins", "set") + T(b"](" + dag + b"e") + b"R"}[place]
    path = zip_file(tmp_path / "dag.pth", checkpoint((U("dag"), value)))
    assert os.path.getsize(path) < 2000
    result = run_isolated(tmp_path, "convert", path, "-o", tmp_path / "out.pth", timeout=15)
    assert_isolated_clean(result, within=10)


@pytest.mark.parametrize("place", ["zip_storage_key", "zip_storage_location", "legacy_protocol_version"])
def test_shared_list_dag_in_an_error_message_finishes_in_seconds(tmp_path, place):
    """A 60-level list DAG (not tuples: not counted per path) where an error message quotes the value."""
    dag = list_dag(60)
    if place == "legacy_protocol_version":
        path = legacy_file(tmp_path / "dag.pth", PROTO2 + b"}.", protocol=PROTO2 + dag + b".")
    elif place == "zip_storage_key":
        path = zip_file(tmp_path / "dag.pth", checkpoint((U("x"), storage_record(key=dag) + b"Q")))
    else:
        record = T(U("storage"), G("torch", "FloatStorage"), U("0"), dag, I(4))
        path = zip_file(tmp_path / "dag.pth", checkpoint((U("x"), record + b"Q")))
    result = run_isolated(tmp_path, "inspect", path, timeout=3, memory=2 * 2**30)
    assert_isolated_clean(result, within=2.5)
    assert result.code == 1 and result.rss_mib < 512, result


def test_deep_lists_are_refused(cli, tmp_path):
    """300,000 EMPTY_LISTs appended into each other: nesting past the bound is refused."""
    path = zip_file(tmp_path / "deep.pth", checkpoint((U("x"), b"]" * 300_000 + b"a" * 299_999)))
    assert_one_error_line(cli("inspect", path), "nests")


def test_deep_lists_built_innermost_last_are_refused(tmp_path):
    """100,000 memoized lists linked outermost first (BINGET l(i), BINGET l(i+1), APPEND): a
    100,000-deep chain. Listing it walks nothing deep and may succeed; writing it is refused."""
    n = 100_000
    make = b"".join(b"]" + put(i) for i in range(n))
    link = b"".join(get(i) + get(i + 1) + b"a" for i in range(n - 1))
    path = zip_file(tmp_path / "chain.pth", checkpoint((U("x"), b"(" + make + link + b"t")))
    for args in (("inspect", path), ("convert", path, "-o", tmp_path / "o.pth")):
        result = run_isolated(tmp_path, *args, timeout=30)
        assert_isolated_clean(result, within=20)
        if args[0] == "convert":
            assert result.code == 1 and str(path) in result.err, f"a 100,000-deep list chain was written: {result!r}"


def test_600k_placeholders_stay_small_and_fast(tmp_path):
    """600,000 distinct GLOBALs (~6 MB) in a list beside the state dict: inspect --json and convert."""
    n = 600_000
    names = b"".join(b"cm\n" + f"n{i:x}".encode() + b"\n" for i in range(n))
    path = zip_file(tmp_path / "many.pth", checkpoint((U("x"), b"](" + names + b"e")))
    size_mb = os.path.getsize(path) / 1e6
    listing = run_isolated(tmp_path, "inspect", path, "--json", timeout=60)
    assert_isolated_clean(listing, within=30)
    assert listing.code == 0 and len(json.loads(listing.out)["inert"]) == n
    copy = run_isolated(tmp_path, "convert", path, "-o", tmp_path / "many_out.pth", timeout=60)
    assert_isolated_clean(copy, within=30)
    print(f"\n600k placeholders, {size_mb:.1f} MB: inspect --json {listing.seconds:.2f} s {listing.rss_mib} MiB; "
          f"convert {copy.seconds:.2f} s {copy.rss_mib} MiB")
    assert listing.rss_mib < 768 and copy.rss_mib < 768, (listing, copy)


def test_a_long_storage_key_is_not_rendered_for_every_tensor(tmp_path):
    """Legacy file: one storage with a 1 MiB key (memoized) viewed by 1,500 tensors; costs like a short key."""
    def build(path, key: str, count: int = 1500):
        first = T(U("storage"), G("torch", "FloatStorage"), U(key), U("cpu"), I(1), b"N") + put(1)
        entries = [(U(f"w{i}"), G("torch._utils", "_rebuild_tensor_v2") + T(
            (first if i == 0 else get(1)) + b"Q", I(0), T(I(1)), T(I(1)), b"\x89", b"N") + b"R") for i in range(count)]
        return legacy_file(path, PROTO2 + D(*entries) + b".", storages={key: bytes(4)})

    short = run_isolated(tmp_path, "inspect", build(tmp_path / "short.pth", "k"), timeout=30)
    long = run_isolated(tmp_path, "inspect", build(tmp_path / "long.pth", "k" * 2**20), timeout=8)
    assert short.code == 0 and long.code == 0, (short, long)
    print(f"\n1500 tensors, short key {short.seconds:.2f} s, 1 MiB key {long.seconds:.2f} s")
    assert long.seconds < 3 * short.seconds + 1.0, f"short key: {short!r}; long key: {long!r}"


@pytest.mark.parametrize("command", ["stats", "diff", "convert_pth", "convert_safetensors"])
def test_stride0_view_of_four_bytes_as_a_huge_tensor_is_refused_quickly(cli, tmp_path, limited_heap, command):
    """A 4-byte storage viewed as [2**20, 2**20] with stride [0, 0]: 4 TiB the file does not hold."""
    path = zip_file(tmp_path / "s0.pth", PROTO2 + D((U("w"), tensor(numel=1, shape=(2**20, 2**20), stride=(0, 0))))
                    + b".", storages={"0": bytes(4)})
    args = {"stats": ("inspect", path, "--stats"), "diff": ("diff", path, path),
            "convert_pth": ("convert", path, "-o", tmp_path / "o.pth"),
            "convert_safetensors": ("convert", path, "-o", tmp_path / "o.safetensors")}[command]
    start = time.perf_counter()
    result = cli(*args)
    assert time.perf_counter() - start < 5
    assert_one_error_line(result, str(path), code=2 if command == "diff" else 1)


def test_stride0_views_at_many_offsets_count_toward_the_limit(cli, tmp_path):
    """300 views of one real 1 MiB storage, each [2**18] stride [0] at its own offset: 300 MiB from 1 MiB."""
    n = 2**18
    entries = [(U(f"v{i}"), tensor(numel=n, shape=(n,), stride=(0,), offset=i)) for i in range(300)]
    path = zip_file(tmp_path / "s0.pth", PROTO2 + D(*entries) + b".", storages={"0": bytes(4 * n)})
    result = cli("convert", path, "-o", tmp_path / "o.safetensors", "--dry-run", "--json")
    promised = result.json()["total_bytes"] if result.code == 0 else 0
    assert result.code == 1, f"would write {promised / 2**20:.0f} MiB out of a {os.path.getsize(path) >> 20} MiB file"
    assert_one_error_line(result, str(path))


@pytest.mark.parametrize("keys", [
    pytest.param((I(1), U("1")), id="1_and_str_1"),
    pytest.param((U("1"), I(1)), id="str_1_and_1"),
    pytest.param((I(1), b"\x88"), id="1_and_True"),
    pytest.param((U("a"), b"N"), id="None"),
    pytest.param((U("a"), latin1_bytes(b"a")), id="bytes"),
])
@pytest.mark.parametrize("nested", [False, True])
def test_state_dict_keys_that_are_not_strings_are_refused(cli, tmp_path, keys, nested):
    """A state dict holding keys 1 and '1' (and kin): one key to some readers, two to others."""
    sd = D(*((k, tensor()) for k in keys))
    body = PROTO2 + (D((U("state_dict"), sd), (U("epoch"), I(3))) if nested else sd) + b"."
    path = zip_file(tmp_path / "keys.pth", body)
    assert_one_error_line(cli("inspect", path), "not a string")


@pytest.mark.parametrize("state", [
    pytest.param(D((U("items"), G("builtins", "list"))), id="items"),
    pytest.param(D((U("items"), G("torch", "float32"))), id="items_token"),
    pytest.param(D((U("_metadata"), D()), (U("keys"), b"N")), id="metadata_and_keys"),
    pytest.param(D((U("__class__"), G("builtins", "dict"))), id="__class__"),
    pytest.param(_slots(D((U("_metadata"), D()))), id="slot_state"),
    pytest.param(D((U("_metadata"), D()), (U("__dict__"), D())), id="__dict__"),
])
def test_build_onto_the_state_dict_ordereddict(cli, tmp_path, state):
    """BUILD {'items': ...} and kin onto the state dict: refused, never a state dict of 0 tensors."""
    body = (PROTO2 + G("collections", "OrderedDict") + b")R" + U("w") + tensor() + b"s" + state + b"b.")
    path = zip_file(tmp_path / "items.pth", body)
    assert_one_error_line(cli("inspect", path, "--json"), "OrderedDict")


@pytest.mark.parametrize("duplicate", ["archive/data.pkl", "archive/data/0"])
def test_duplicate_zip_records_are_refused(cli, tmp_path, duplicate):
    """Two zip records of one name: zipfile and torch's reader would take different copies."""
    hostile = checkpoint((U("x"), G("posix", "system") + T(U("true")) + b"R"))
    second = hostile if duplicate.endswith("data.pkl") else bytes(range(16))
    path = zip_file(tmp_path / "dup.pth", checkpoint(), records=[(duplicate, second)])
    with zipfile.ZipFile(path) as z:
        assert [i.filename for i in z.infolist()].count(duplicate) == 2
    assert_one_error_line(cli("inspect", path), "two records with one name")


def test_placeholders_in_legacy_header_pickles_are_listed(cli, tmp_path):
    """Legacy header pickles naming globals: in sys_info they are listed; left on a header
    pickle's stack, or in place of the storage keys, the file is refused — never hidden."""
    sys_info = PROTO2 + D((U("little_endian"), b"\x88"), (U("x"), G("posix", "system") + T(U("true")) + b"R")) + b"."
    obj = PROTO2 + D((U("w"), tensor(record=legacy_storage_record()))) + b"."
    path = legacy_file(tmp_path / "header.pth", obj, sys_info=sys_info)
    doc = cli("inspect", path, "--json")
    assert doc.code == 0, doc.err
    assert "posix.system" in doc.json()["inert"], doc.json()["inert"]
    assert [t["name"] for t in doc.json()["tensors"]] == ["w"]
    hidden = [dict(protocol=PROTO2 + G("nt", "system") + I(LEGACY_PROTOCOL) + b"."),
              dict(keys=PROTO2 + G("builtins", "eval") + b"](" + U("0") + b"e."),
              dict(keys=PROTO2 + b"](" + G("builtins", "eval") + b"e.")]
    for i, parts in enumerate(hidden):
        result = cli("inspect", legacy_file(tmp_path / f"hidden{i}.pth", obj, **parts))
        assert result.code == 1 and len(result.err.strip().splitlines()) == 1, (parts, result.err)


# =============================================================================================
# 8. safetensors: alias metadata, reserved names, huge dimensions, lone surrogates
# =============================================================================================

def safetensors_file(path, header: dict, data: bytes) -> str:
    raw = json.dumps(header).encode()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw + data)
    return str(path)


def two_tensors(metadata: dict | None = None) -> dict:
    header = {"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
              "b": {"dtype": "F32", "shape": [2], "data_offsets": [8, 16]}}
    return {"__metadata__": metadata, **header} if metadata is not None else header


@pytest.mark.parametrize("aliases, fragment", [
    pytest.param([["b", "w", 1]], "names a stored tensor", id="alias_names_a_real_tensor"),
    pytest.param([["w", "b", 0]], "names a stored tensor", id="alias_replaces_first"),
    pytest.param([[1, "w", 2]], "expected [[alias", id="alias_not_a_string"),
    pytest.param([[None, "w", 2]], "expected [[alias", id="alias_none"),
    pytest.param([["a", 0, 2]], "expected [[alias", id="target_not_a_string"),
    pytest.param([["a", "w", -1]], "position", id="negative_position"),
    pytest.param([["a", "w", 3]], "position", id="position_past_end"),
    pytest.param([["a", "w", 10**30]], "position", id="huge_position"),
    pytest.param([["a", "w", True]], "expected [[alias", id="bool_position"),
    pytest.param([["a", "w", 1.0]], "expected [[alias", id="float_position"),
    pytest.param([["a", "w", 1], ["c", "w", 1]], "position", id="position_taken"),
    pytest.param([["a", "w", 1], ["a", "b", 2]], "listed twice", id="alias_twice"),
    pytest.param([["a", "nope", 1]], "not a stored tensor", id="unknown_target"),
    pytest.param([["a", "w", 1], ["c", "a", 2]], "not a stored tensor", id="alias_of_alias"),
    pytest.param([["a", "w", 1, "x"]], "expected [[alias", id="four_fields"),
    pytest.param({"a": "w"}, "expected [[alias", id="not_a_list"),
])
def test_crafted_alias_metadata_is_refused(cli, tmp_path, aliases, fragment):
    """ckptsurgery.aliases metadata that would replace, misplace or invent tensors."""
    path = safetensors_file(tmp_path / "a.safetensors", two_tensors({"ckptsurgery.aliases": json.dumps(aliases)}),
                            bytes(16))
    assert_one_error_line(cli("inspect", path, "--json"), "ckptsurgery.aliases", fragment)
    assert_one_error_line(cli("convert", path, "-o", tmp_path / "o.pth"), "ckptsurgery.aliases")


@pytest.mark.parametrize("text", ["[[", "not json", "[" * 100_000 + "]" * 100_000, "[NaN]", ""])
def test_malformed_or_deep_alias_json_is_refused(cli, tmp_path, text):
    """ckptsurgery.aliases that is not JSON, or JSON nested 100,000 deep."""
    path = safetensors_file(tmp_path / "a.safetensors", two_tensors({"ckptsurgery.aliases": text}), bytes(16))
    assert_one_error_line(cli("inspect", path), "ckptsurgery.aliases")


def test_lone_surrogate_alias_name(cli, tmp_path):
    """An alias named '\\ud800' (lone surrogate) in ckptsurgery.aliases: refused, or every output reads back."""
    aliases = json.dumps([["\ud800", "w", 1]])
    path = safetensors_file(tmp_path / "a.safetensors", two_tensors({"ckptsurgery.aliases": aliases}), bytes(16))
    results = {"inspect": cli("inspect", path, "--json"), "inspect_human": cli("inspect", path)}
    for suffix in ("safetensors", "pth"):
        out = tmp_path / f"out.{suffix}"
        results[suffix] = cli("convert", path, "-o", out)
        if results[suffix].code == 0:
            results[f"{suffix} reads back"] = cli("inspect", out, "--json")
    problems = {name: r.err.strip() for name, r in results.items()
                if r.code not in (0, 1) or "CKPTSURGERY_DEBUG" in r.err or (r.code == 1 and r.err.count("\n") != 1)
                or (name.endswith("reads back") and r.code != 0)}
    assert not problems, problems


def test_alias_named___metadata___is_refused_or_written_loadably(cli, tmp_path):
    """An alias called __metadata__ placed first, where a safetensors writer would store it."""
    aliases = json.dumps([["__metadata__", "w", 0]])
    path = safetensors_file(tmp_path / "a.safetensors", two_tensors({"ckptsurgery.aliases": aliases}), bytes(16))
    for suffix in ("safetensors", "pth"):
        out = tmp_path / f"o.{suffix}"
        result = cli("convert", path, "-o", out)
        assert_clean(result)
        if result.code == 0:
            assert cli("inspect", out).code == 0


def test_pth_key___metadata___is_refused_for_safetensors(cli, tmp_path):
    """A .pth state dict with a key '__metadata__' converted to .safetensors."""
    path = zip_file(tmp_path / "m.pth", PROTO2 + D((U("__metadata__"), tensor()), (U("w"), tensor())) + b".")
    assert cli("inspect", path).code == 0
    assert_one_error_line(cli("convert", path, "-o", tmp_path / "o.safetensors"), "__metadata__")
    assert not (tmp_path / "o.safetensors").exists()
    assert cli("convert", path, "-o", tmp_path / "o.pth").code == 0


@pytest.mark.parametrize("shape", [[0, 2**64], [2**63], [0, 2**63], [0, -1], [0, 2**64 + 1, 2**64 + 1], [0, 1e30]])
def test_safetensors_dimensions_beyond_int64_are_refused(cli, tmp_path, shape):
    """Header shapes with a dimension >= 2**63 (or negative, or a float), with zero elements overall."""
    path = safetensors_file(tmp_path / "d.safetensors", {"w": {"dtype": "F32", "shape": shape, "data_offsets": [0, 0]}}, b"")
    assert_one_error_line(cli("inspect", path, "--json"), "shape")


def test_zero_sized_tensor_with_int64_max_dimension(cli, tmp_path):
    """shape [0, 2**63 - 1]: legal, zero bytes; every command handles it cleanly."""
    path = safetensors_file(tmp_path / "d.safetensors",
                            {"w": {"dtype": "F32", "shape": [0, 2**63 - 1], "data_offsets": [0, 0]}}, b"")
    for args in (("inspect", path, "--json"), ("inspect", path, "--stats"), ("diff", path, path),
                 ("convert", path, "-o", tmp_path / "o.pth"), ("convert", path, "-o", tmp_path / "o.safetensors")):
        assert_clean(cli(*args))


@pytest.mark.parametrize("where", ["tensor_name", "metadata_value", "metadata_key", "pth_extra_key", "pth_inert_value"])
def test_lone_surrogates_under_inspect_json(cli, tmp_path, where):
    """'\\ud800' as a name, a metadata key or value, or a top-level .pth key: valid JSON or one line."""
    entry = {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}
    if where == "tensor_name":
        path = safetensors_file(tmp_path / "s.safetensors", {"\ud800": entry}, bytes(4))
    elif where == "metadata_value":
        path = safetensors_file(tmp_path / "s.safetensors", {"__metadata__": {"k": "\ud800"}, "w": entry}, bytes(4))
    elif where == "metadata_key":
        path = safetensors_file(tmp_path / "s.safetensors", {"__metadata__": {"\udfff": "v"}, "w": entry}, bytes(4))
    elif where == "pth_extra_key":
        path = zip_file(tmp_path / "s.pth", checkpoint((U("\ud800"), I(1))))
    else:
        path = zip_file(tmp_path / "s.pth", checkpoint((U("x"), G("m", "f") + T(U("\ud800")) + b"R")))
    for args in (("inspect", path, "--json"), ("inspect", path), ("convert", path, "-o", tmp_path / "o.safetensors", "--json")):
        result = cli(*args)
        assert_clean(result)
        if result.code == 0 and "--json" in args:
            json.loads(result.out)


# =============================================================================================
# 9. Linear work where the old code was quadratic, and errors that reached the catch-all
# =============================================================================================

def _module(params: bytes, buffers: bytes, non_persistent: bytes, children: bytes = D()) -> bytes:
    """A pickled nn.Module placeholder: NEWOBJ of an unknown class, then BUILD of its state."""
    return (G("user_code", "Net") + b")\x81" + D((U("_parameters"), params), (U("_buffers"), buffers),
                                                   (U("_non_persistent_buffers_set"), non_persistent),
                                                   (U("_modules"), children)) + b"b")


def test_non_persistent_buffer_list_is_not_quadratic(tmp_path):
    """100,000 buffers and a 100,000-name *list* of non-persistent ones (torch pickles a set)."""
    n = 100_000
    buffers = b"}(" + b"".join(U(f"b{i}") + tensor() for i in range(n)) + b"u"
    skip = b"](" + b"".join(U(f"b{i}") for i in range(1, n)) + b"e"
    path = zip_file(tmp_path / "buffers.pth", PROTO2 + _module(D(), buffers, skip) + b".")
    result = run_isolated(tmp_path, "inspect", path, "--json", timeout=60)
    assert_isolated_clean(result, within=20)
    assert result.code == 0 and [t["name"] for t in json.loads(result.out)["tensors"]] == ["b0"]


def test_root_search_judges_a_shared_value_once(tmp_path):
    """20,000 top-level keys all naming one memoized 20,000-tensor state dict: refused at once as
    ambiguous (choose --root), not after 20,000 walks of it."""
    n = 20_000
    sd = b"}" + put(0) + b"(" + b"".join(U(f"w{i}") + tensor() for i in range(n)) + b"u"
    top = b"}(" + U("k0") + sd + b"".join(U(f"k{i}") + get(0) for i in range(1, n)) + b"u"
    path = zip_file(tmp_path / "shared.pth", PROTO2 + top + b".")
    result = run_isolated(tmp_path, "inspect", path, timeout=60)
    assert_isolated_clean(result, within=20)
    assert result.code == 1 and "choose one with --root" in result.err


def test_many_aliases_are_restored_in_linear_time(tmp_path):
    """A safetensors file with 100,000 stored tensors and 100,000 alias names (list.insert in a
    loop was quadratic)."""
    n = 100_000
    header = {f"t{i}": {"dtype": "U8", "shape": [1], "data_offsets": [i, i + 1]} for i in range(n)}
    aliases = [[f"a{i}", f"t{i}", 2 * i + 1] for i in range(n)]
    header["__metadata__"] = {"ckptsurgery.aliases": json.dumps(aliases)}
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    path = tmp_path / "aliases.safetensors"
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + bytes(n))
    result = run_isolated(tmp_path, "inspect", path, "--json", timeout=60)
    assert_isolated_clean(result, within=20)
    names = [t["name"] for t in json.loads(result.out)["tensors"]]
    assert result.code == 0 and names[:4] == ["t0", "a0", "t1", "a1"] and len(names) == 2 * n


def test_deeply_nested_safetensors_header_is_one_line(cli, tmp_path):
    raw = b'{"x":' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    raw += b" " * (-len(raw) % 8)
    path = tmp_path / "deep.safetensors"
    path.write_bytes(struct.pack("<Q", len(raw)) + raw)
    result = cli("inspect", path)
    assert result.code == 1 and "not valid JSON" in result.err and len(result.err.splitlines()) == 1


def test_legacy_v3_tensor_whose_storage_has_no_data(cli, tmp_path):
    """A legacy file whose _rebuild_tensor_v3 names an UntypedStorage the key list never gives
    bytes for (the old reader copied the storage and crashed on the copy)."""
    record = (b"(" + U("storage") + G("torch.storage", "UntypedStorage") + U("0") + U("cpu") + I(8) + b"Nt")
    v3 = (G("torch._utils", "_rebuild_tensor_v3") + b"(" + record + b"Q" + I(0) + T(I(4)) + T(I(1)) + b"\x89"
          + G("collections", "OrderedDict") + b")R" + G("torch", "uint16") + b"tR")
    path = legacy_file(tmp_path / "v3.pth", PROTO2 + D((U("w"), v3)) + b".", storages={})
    result = cli("inspect", path)
    assert result.code == 1 and "no data for storages 0" in result.err and len(result.err.splitlines()) == 1


# ---- calls torch refuses, storages recorded under two types ------------------------------------

@pytest.mark.parametrize("call", [
    pytest.param(G("torch._utils", "_rebuild_parameter") + T(tensor(), b"\x88", G("collections", "OrderedDict") + b")R",
                                                             D((U("x"), I(1)))) + b"R", id="rebuild_parameter_with_4_args"),
    pytest.param(G("torch._utils", "_rebuild_parameter_with_state") + T(tensor(), b"\x88", G("collections", "OrderedDict")
                                                                        + b")R") + b"R", id="with_state_without_state"),
])
def test_rebuilders_take_torchs_arguments_only(cli, tmp_path, call):
    """A rebuild call torch.load refuses (wrong arity) is refused, not rewritten into one torch loads."""
    src = zip_file(tmp_path / "arity.pth", PROTO2 + D((U("w"), call)) + b".")
    assert not torch_loads(src)[0]
    assert_one_error_line(cli("convert", src, "-o", tmp_path / "out.pth"), str(src))


@pytest.mark.parametrize("layout", ["zip_byte_then_float", "zip_untyped_v3_then_float", "legacy_float_then_byte"])
def test_storage_recorded_as_two_types_reads_as_torch_reads_it(cli, tmp_path, layout):
    """torch keeps the first record's typed storage for a key, so a later _rebuild_tensor_v2 gets the first dtype; inspect must show torch's dtypes."""
    if layout == "legacy_float_then_byte":
        first = storage_record(U("0"), 4, G("torch", "FloatStorage"), extra=b"N")
        second = storage_record(U("0"), 16, G("torch", "ByteStorage"), extra=b"N")
        body = PROTO2 + D((U("a"), rebuild_v2(first, (4,))), (U("b"), rebuild_v2(second, (4,)))) + b"."
        src = legacy_file(tmp_path / "two.pth", body, storages={"0": bytes(range(16))})
    else:
        if layout == "zip_byte_then_float":
            a = rebuild_v2(storage_record(U("0"), 16, G("torch", "ByteStorage")), (16,))
        else:
            a = (G("torch._utils", "_rebuild_tensor_v3") + b"(" + storage_record(U("0"), 16, G("torch.storage", "UntypedStorage"))
                 + b"Q" + I(0) + T(I(16)) + T(I(1)) + b"\x89" + G("collections", "OrderedDict") + b")R"
                 + G("torch", "float8_e4m3fn") + b"tR")
        b = rebuild_v2(storage_record(U("0"), 4, G("torch", "FloatStorage")), (4,))
        src = zip_file(tmp_path / "two.pth", PROTO2 + D((U("a"), a), (U("b"), b)) + b".", {"0": bytes(range(16))})
    expected = {k: str(v.dtype).removeprefix("torch.") for k, v in torch.load(src, weights_only=True).items()}
    result = cli("inspect", src, "--json")
    assert_clean(result)
    if result.code == 0:
        got = {t["name"]: t["dtype"] for t in result.json()["tensors"]}
        assert got == expected, f"torch reads {expected}, ckptsurgery {got}"


def test_module_walk_errors_name_the_file(cli, tmp_path):
    """A pickled module with a parameter name that is not valid Unicode: the one error line names the file."""
    module = (G("mymodel", "Net") + b")\x81" + D((U("_parameters"), D((U("w\udc80"), tensor()))),
                                                (U("_buffers"), D()), (U("_modules"), D())) + b"b")
    src = zip_file(tmp_path / "surrogate.pth", PROTO2 + module + b".")
    assert_one_error_line(cli("inspect", src), str(src))


# ---- small files that once cost far more than the real work ------------------------------------

def test_a_small_pickled_module_dag_costs_bounded_work(tmp_path):
    """A 5 KB pickled module whose 21 levels each register one child twice expands to 2M names (23 s, 1 GB, a 96 MB .pth): refuse it quickly."""
    def module(children: bytes) -> bytes:
        return (G("mymodel", "Block") + b")\x81" + D((U("_parameters"), D((U("w"), tensor()))), (U("_buffers"), D()),
                                                     (U("_modules"), children)) + b"b")
    body = module(D()) + b"q\x00"
    for level in range(1, 21):
        body = module(D((U("a"), body), (U("b"), b"h" + bytes([level - 1])))) + b"q" + bytes([level])
    src = zip_file(tmp_path / "dag.pth", PROTO2 + body + b".")
    assert os.path.getsize(src) < 8000
    try:
        run = subprocess.run([sys.executable, "-m", "ckptsurgery", "convert", src, "-o", str(tmp_path / "out.pth")],
                             capture_output=True, text=True, timeout=8)
    except subprocess.TimeoutExpired:
        pytest.fail("an 8 KB file kept ckptsurgery busy for more than 8 seconds")
    assert run.returncode in (0, 1) and "CKPTSURGERY_DEBUG" not in run.stderr, run.stderr


def test_a_60000_deep_chain_of_pickled_modules_is_walked_in_linear_time(tmp_path):
    """A 1.9 MB .pth whose pickled modules nest 60,000 deep (built outermost first, so the nesting limit never sees it): `inspect` answers within 10 s (a module walk that copied its frozenset path per level, O(depth^2), once took ~27 s)."""
    n, base = 60_000, 10
    # 60,000 placeholder modules, created first (none has state yet, so each is depth 1) ...
    created = (b"](" + G("user_code", "Net") + put(0) + b")\x81" + put(base)
               + b"".join(get(0) + b")\x81" + put(base + i) for i in range(1, n)) + b"e")
    # ... then module i gets the state {"_parameters": {}, "_modules": {"a": module i+1}}
    built = (b"](" + get(base) + b"}(" + U("_parameters") + put(1) + b"}" + U("_modules") + put(2) + b"}"
             + U("a") + put(3) + get(base + 1) + b"su" + b"b"
             + b"".join(get(base + i) + b"}(" + get(1) + b"}" + get(2) + b"}" + get(3) + get(base + i + 1) + b"su" + b"b"
                        for i in range(1, n - 1)) + b"e")
    top = b"}(" + U("x") + created + U("y") + built + U("model") + get(base) + b"u"
    path = zip_file(tmp_path / "chain.pth", PROTO2 + top + b".")
    assert os.path.getsize(path) < 2 * 2**20
    result = run_isolated(tmp_path, "inspect", path, memory=CAP, timeout=20)
    assert_isolated_clean(result, within=10)


def _v3(dtype: str, metadata: bytes = b"N", key: str = "0", shape=(4,), nbytes: int = 16) -> bytes:
    """torch._utils._rebuild_tensor_v3(UntypedStorage record, 0, shape, contiguous, False, {}, torch.DTYPE, metadata)."""
    record = b"(" + U("storage") + G("torch", "UntypedStorage") + U(key) + U("cpu") + I(nbytes) + b"t"
    stride = [1] * len(shape)
    for i in range(len(shape) - 2, -1, -1):
        stride[i] = stride[i + 1] * shape[i + 1]
    return (G("torch._utils", "_rebuild_tensor_v3") + b"(" + record + b"Q" + I(0) + T(*map(I, shape))
            + T(*map(I, stride)) + b"\x89" + G("collections", "OrderedDict") + b")R" + G("torch", dtype)
            + metadata + b"tR")


NEG = D((U("neg"), b"\x88"))


@pytest.mark.parametrize("dtype", ["bool", "float8_e4m3fn", "uint16"])
@pytest.mark.parametrize("command", ["stats", "to_safetensors", "diff"])
def test_neg_bit_on_a_dtype_torch_cannot_negate_never_reaches_the_catch_all(tmp_path, dtype, command):
    """Tensor metadata {"neg": True} on a bool/float8/uint16 tensor (torch.neg raises on them): exit 0 or one error line, never the catch-all."""
    pkl = PROTO2 + D((U("w"), _v3(dtype, NEG))) + b"."
    a = zip_file(tmp_path / "a.pth", pkl, {"0": bytes(range(16))})
    b = zip_file(tmp_path / "b.pth", pkl, {"0": bytes(range(1, 17))})
    args = {"stats": ("inspect", a, "--stats"), "to_safetensors": ("convert", a, "-o", tmp_path / "o.safetensors"),
            "diff": ("diff", a, b)}[command]
    result = run_isolated(tmp_path, *args, memory=CAP)
    if command == "diff":  # exit 1 with no error line is diff's "they differ" verdict; 2 a refusal
        assert result.code in (0, 1, 2) and "CKPTSURGERY_DEBUG" not in result.err and "Traceback" not in result.err, result
        assert (result.code == 2) == result.err.startswith("ckptsurgery: error: "), result
    else:
        assert_isolated_clean(result, within=10)


@pytest.mark.parametrize("args", [("inspect",), ("diff",), ("convert", "o.safetensors")])
def test_zero_sized_tensor_with_20000_huge_dimensions_is_clean_and_quick(tmp_path, args):
    """shape [0] + [2**62] * 20000 (400 KB header): a clean answer within seconds and 2 GiB (multiplying the unbounded strides once ended in MemoryError)."""
    path = safetensors_file(tmp_path / "dims.safetensors",
                            {"w": {"dtype": "U8", "shape": [0] + [2**62] * 20_000, "data_offsets": [0, 0]}}, b"")
    argv = {"inspect": ("inspect", path), "diff": ("diff", path, path),
            "convert": ("convert", path, "-o", tmp_path / "o.safetensors")}[args[0]]
    result = run_isolated(tmp_path, *argv, memory=CAP, timeout=20)
    assert_isolated_clean(result, within=10)


def test_per_channel_scales_of_complex_dtype_print_no_torch_warning(tmp_path):
    """A per-channel qint8 tensor whose scales are complex64: inspect --stats prints no torch UserWarning (with its source line) on stderr."""
    scale = _v3("complex64", key="s", shape=(2,), nbytes=16)
    zero = _v3("int64", key="z", shape=(2,), nbytes=16)
    record = (b"(" + U("storage") + G("torch", "QInt8Storage") + U("0") + U("cpu") + I(4) + b"t")
    qt = (G("torch._utils", "_rebuild_qtensor") + b"(" + record + b"Q" + I(0) + T(I(2), I(2)) + T(I(2), I(1))
          + T(G("torch", "per_channel_affine"), scale, zero, I(0)) + b"\x89" + G("collections", "OrderedDict")
          + b")R" + b"tR")
    path = zip_file(tmp_path / "q.pth", PROTO2 + D((U("w"), qt)) + b".",
                    {"0": bytes(4), "s": bytes(range(16)), "z": bytes(16)})
    result = run_isolated(tmp_path, "inspect", path, "--stats", memory=CAP)
    assert_isolated_clean(result, within=10)
    assert "Warning" not in result.err, result
