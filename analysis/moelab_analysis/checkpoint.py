"""moelab checkpoints in numpy: load, verify, write; expert-weight measures.

    tensors, meta = load_checkpoint("runs/x_checkpoints/step_000600.ckpt")
    tensors["block0.moe.experts.w1"]          # numpy array [E, D, 2F]
    meta["config"], meta["step"], meta["run_id"]

A moelab checkpoint (format 2, docs/checkpoints.md) is a safetensors file: 8 bytes N
(little-endian), N bytes of JSON header, the tensor data. This module parses it with the
standard library and numpy alone (no safetensors package) and verifies everything moelab's
C++ reader verifies: the SHA-256 of the header (`checkpoint.header_sha256`, computed with its
own 64 digits as '0'), the recorded file size (`checkpoint.file_size`), that the tensors tile the
data exactly, each tensor's dtype, shape and byte count, and each tensor's SHA-256
(`checkpoint.sha256.NAME`). A defect raises CheckpointError naming the file (and the tensor).

Format 1 (moelab's binary layout with the magic "MOELABCK", written before format 2) is read
too; its FNV-1a checksums are computed in pure Python (about 10 MB/s: pass verify=False to skip
them for a large old file).

Dtypes: F64, F32, I32 and U64 arrays keep their dtype; BF16 becomes float32 (exact: bf16 is the
top half of a float32). Blobs (RNG state, data position) come back as uint64 arrays under their
stored name "__blob__.NAME". Only numpy is needed (`_deps.require(("numpy",))`).
"""
from __future__ import annotations

from ._deps import require as _require

_require(("numpy",))

import hashlib  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import re  # noqa: E402
import struct  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Dict, List, Optional, Sequence, Tuple, Union  # noqa: E402

import numpy as np  # noqa: E402

PathLike = Union[str, Path]

FORMAT_VERSION = 2
MAX_HEADER = 100_000_000          # the safetensors reference's limit
BLOB_PREFIX = "__blob__."
RESERVED = "checkpoint."
_HASH_KEY = "checkpoint.header_sha256"
_SIZE_KEY = "checkpoint.file_size"
_HASH_PREFIX = "checkpoint.sha256."
_HEX_PREFIX = "checkpoint.meta_hex."
_MAGIC_V1 = b"MOELABCK"

# safetensors dtype -> (numpy dtype, bytes per element). BF16 is read as uint16 and widened.
_ST_DTYPES = {
    "F64": ("<f8", 8), "F32": ("<f4", 4), "F16": ("<f2", 2), "BF16": ("<u2", 2),
    "I64": ("<i8", 8), "I32": ("<i4", 4), "I16": ("<i2", 2), "I8": ("i1", 1),
    "U64": ("<u8", 8), "U32": ("<u4", 4), "U16": ("<u2", 2), "U8": ("u1", 1), "BOOL": ("?", 1),
}
# The reference writer's dtype order (it sorts tensors by it, largest first), for the writer.
_ST_ORDER = ["BOOL", "F4", "F6_E2M3", "F6_E3M2", "U8", "I8", "F8_E5M2", "F8_E4M3", "F8_E8M0",
             "F8_E4M3FNUZ", "F8_E5M2FNUZ", "I16", "U16", "F16", "BF16", "I32", "U32", "F32", "C64",
             "F64", "I64", "U64"]
_CKPT_DTYPES = ("F64", "F32", "BF16", "I32")


class CheckpointError(ValueError):
    """A file that is not a moelab checkpoint, or a damaged one (the message names the file)."""


# --------------------------------------------------------------------------------------------
# Reading


def bf16_to_float32(raw: np.ndarray) -> np.ndarray:
    """uint16 bf16 bit patterns -> float32 (exact; NaN payloads and -0 kept)."""
    return (np.asarray(raw, dtype=np.uint16).astype(np.uint32) << np.uint32(16)).view(np.float32)


def _no_duplicates(pairs):
    out = {}
    for k, v in pairs:
        if k in out:
            raise ValueError("duplicate key {!r}".format(k))
        out[k] = v
    return out


def load_checkpoint(path: PathLike, verify: bool = True, names: Optional[Sequence[str]] = None,
                    raw_bf16: bool = False) -> Tuple[Dict[str, np.ndarray], Dict[str, str]]:
    """(tensors, metadata) of a moelab checkpoint (format 2, or format 1).

    tensors: name -> numpy array, in the order the trainer added them (weights, "adam.m.*" and
    "adam.v.*", "router_bias.N", blobs as "__blob__.NAME" uint64). BF16 becomes float32.
    metadata: the trainer's keys (config, step, run_id, kind, moelab_version, ...) as strings;
    the format's own "checkpoint.*" keys are checked and left out.
    verify: check every checksum (format 2: SHA-256 with hashlib, about 1 GB/s).
    names: load only these tensors (all are still verified when `verify`); KeyError if absent.
    raw_bf16: BF16 tensors as their uint16 bit patterns instead of float32 (for a bit-exact
    write_checkpoint(..., bf16=[their names])).
    """
    path = Path(path)
    with open(path, "rb") as f:
        head = f.read(8)
    if not head:
        raise CheckpointError("checkpoint {} is empty".format(path))
    if _MAGIC_V1.startswith(head):
        return _load_v1(path, verify, names, raw_bf16)
    return _load_v2(path, verify, names, raw_bf16)


def read_header(path: PathLike) -> Tuple[Dict[str, dict], Dict[str, str]]:
    """The safetensors header of a format-2 checkpoint, checked (header checksum, file size) but
    without reading the tensors: ({name: {"dtype", "shape", "data_offsets"}}, raw __metadata__)."""
    path = Path(path)
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        h, meta, _ = _read_v2_header(path, f, size)
    return h, meta


def _fail(path, msg):
    raise CheckpointError("checkpoint {} {}".format(path, msg))


def _meta_value_at(header: bytes, key: str) -> List[int]:
    """Where the value of metadata entry `key` starts in the raw header, for every hit."""
    pat = ('"' + key + '":"').encode()
    out, at = [], header.find(pat)
    while at >= 0:
        if at > 0 and header[at - 1:at] in (b"{", b","):
            out.append(at + len(pat))
        at = header.find(pat, at + 1)
    return out


def _read_v2_header(path, f, size):
    if size < 8:
        _fail(path, "is truncated (expected at least 8 bytes, found {})".format(size))
    prefix = f.read(8)
    (n,) = struct.unpack("<Q", prefix)
    if n < 2 or n > MAX_HEADER:
        _fail(path, "is not a moelab checkpoint (it starts with neither \"MOELABCK\", format 1, "
                    "nor the header length of a safetensors file, format 2)")
    if 8 + n > size:
        _fail(path, "is truncated (expected at least {} bytes, found {})".format(8 + n, size))
    header = f.read(n)
    # The header's checksum, on the raw bytes, before anything in them is trusted. The entry is
    # '"KEY":"' right after '{' or ',': inside a JSON string every '"' is escaped, so '{"' and
    # ',"' never occur there (a key that merely contains the text, escaped, is not a hit).
    hits = _meta_value_at(header, _HASH_KEY)
    if not hits:
        _fail(path, "is not a moelab checkpoint (no {} in its safetensors metadata: a safetensors "
                    "file of another tool, or a checkpoint whose header is corrupted)".format(_HASH_KEY))
    v = hits[0]
    stored = header[v:v + 64]
    if len(hits) > 1 or header[v + 64:v + 65] != b'"' or not re.fullmatch(rb"[0-9a-f]{64}", stored):
        _fail(path, "is corrupted: checksum mismatch in the header ({} is not one value of 64 hex "
                    "digits)".format(_HASH_KEY))
    zeroed = header[:v] + b"0" * 64 + header[v + 64:]
    if hashlib.sha256(prefix + zeroed).hexdigest().encode() != stored:
        _fail(path, "is corrupted: checksum mismatch in the header (the JSON with the tensor names, "
                    "dtypes, shapes, offsets, checksums and metadata)")
    try:
        h = json.loads(header.decode("utf-8"), object_pairs_hook=_no_duplicates)
    except ValueError as exc:
        _fail(path, "is corrupted: the header is not valid JSON ({})".format(exc))
    if not isinstance(h, dict):
        _fail(path, "is corrupted: the header is not a JSON object")
    meta = h.pop("__metadata__", None) or {}
    if not isinstance(meta, dict) or not all(isinstance(x, str) for x in meta.values()):
        _fail(path, "is corrupted: __metadata__ is not an object of strings")
    m = re.fullmatch(r"[0-9]{20}", meta.get(_SIZE_KEY, ""))
    if not m:
        _fail(path, "is not a moelab checkpoint ({} is missing or not 20 digits)".format(_SIZE_KEY))
    expected = int(meta[_SIZE_KEY])
    if size < expected:
        _fail(path, "is truncated (expected {} bytes, found {})".format(expected, size))
    if size > expected:
        _fail(path, "is corrupted: it has {} bytes of trailing garbage (expected {} bytes, found {})"
              .format(size - expected, expected, size))
    return h, meta, n


def _load_v2(path, verify, names, raw_bf16=False):
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        h, meta, n = _read_v2_header(path, f, size)
    data_start = 8 + n
    data_len = size - data_start

    if meta.get("checkpoint.format") != "moelab":
        _fail(path, "is not a moelab checkpoint (its metadata checkpoint.format is {!r}, expected "
                    "'moelab')".format(meta.get("checkpoint.format")))
    version = meta.get("checkpoint.version", "")
    if not re.fullmatch(r"[0-9]{1,9}", version):
        _fail(path, "is corrupted: checkpoint.version is {!r}, not a number".format(version))
    if int(version) > FORMAT_VERSION:
        _fail(path, "has format version {}, newer than the version {} this reader knows; update "
                    "moelab_analysis".format(version, FORMAT_VERSION))
    if int(version) < 2:
        _fail(path, "has unsupported format version {} in a safetensors file".format(version))

    # The tensors: fields, dtypes, shapes, byte counts; they must tile the data exactly.
    spans = []
    for name, t in h.items():
        if not isinstance(t, dict) or set(t) != {"dtype", "shape", "data_offsets"}:
            _fail(path, "is corrupted: tensor {!r} is not {{dtype, shape, data_offsets}}".format(name))
        dt, shape, off = t["dtype"], t["shape"], t["data_offsets"]
        if dt not in _ST_DTYPES:
            _fail(path, "is corrupted: tensor {!r} has dtype {!r}".format(name, dt))
        if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
            _fail(path, "is corrupted: tensor {!r} has shape {!r}".format(name, shape))
        if not (isinstance(off, list) and len(off) == 2 and all(isinstance(o, int) for o in off)
                and 0 <= off[0] <= off[1] <= data_len):
            _fail(path, "is corrupted: tensor {!r} has data_offsets {!r} outside the {} data bytes"
                  .format(name, off, data_len))
        need = int(np.prod(shape, dtype=np.int64)) * _ST_DTYPES[dt][1]
        if off[1] - off[0] != need:
            _fail(path, "is corrupted: tensor {!r}: {}{} needs {} bytes, data_offsets hold {}"
                  .format(name, dt, shape, need, off[1] - off[0]))
        spans.append((off[0], off[1], name))
    pos = 0
    for b, e, name in sorted(spans):
        if b != pos:
            _fail(path, "is corrupted: tensor {!r} starts at data byte {}, expected {} (gap or overlap)"
                  .format(name, b, pos))
        pos = e
    if pos != data_len:
        _fail(path, "is corrupted: the last {} data bytes belong to no tensor".format(data_len - pos))

    try:
        order = json.loads(meta.get("checkpoint.order", ""))
    except ValueError:
        order = None
    if not isinstance(order, list) or sorted(order) != sorted(h) or len(set(order)) != len(order):
        _fail(path, "is corrupted: checkpoint.order does not list every tensor once")
    for name in order:
        dt = h[name]["dtype"]
        if name.startswith(BLOB_PREFIX):
            if dt != "U64" or len(h[name]["shape"]) != 1:
                _fail(path, "is corrupted: blob {!r} is {} of rank {}".format(name, dt, len(h[name]["shape"])))
        elif dt not in _CKPT_DTYPES or len(h[name]["shape"]) > 4:
            _fail(path, "is corrupted: tensor {!r} is {}{}".format(name, dt, h[name]["shape"]))
        if not re.fullmatch(r"[0-9a-f]{64}", meta.get(_HASH_PREFIX + name, "")):
            _fail(path, "is corrupted: tensor {!r} has no checksum ({}{})".format(name, _HASH_PREFIX, name))
    if names is not None:
        for want in names:
            if want not in h:
                raise KeyError("checkpoint {} has no tensor {!r}".format(path, want))

    tensors: Dict[str, np.ndarray] = {}
    mm = np.memmap(path, dtype=np.uint8, mode="r") if size > 0 else np.zeros(0, np.uint8)
    try:
        for name in order:
            b, e = h[name]["data_offsets"]
            raw = mm[data_start + b:data_start + e]
            if verify and hashlib.sha256(raw).hexdigest() != meta[_HASH_PREFIX + name]:
                kind = "blob" if name.startswith(BLOB_PREFIX) else "tensor"
                shown = name[len(BLOB_PREFIX):] if kind == "blob" else name
                _fail(path, "is corrupted: checksum mismatch in {} {!r}".format(kind, shown))
            if names is not None and name not in names:
                continue
            dt = h[name]["dtype"]
            arr = np.frombuffer(raw, dtype=_ST_DTYPES[dt][0]).reshape(h[name]["shape"])
            tensors[name] = bf16_to_float32(arr) if dt == "BF16" and not raw_bf16 else \
                arr.astype(arr.dtype.newbyteorder("="))
    finally:
        del mm
    user = {}
    for k, v in meta.items():
        if not k.startswith(RESERVED):
            user[k] = v
        elif k.startswith(_HEX_PREFIX):
            user[bytes.fromhex(k[len(_HEX_PREFIX):]).decode("utf-8", "surrogateescape")] = \
                bytes.fromhex(v).decode("utf-8", "surrogateescape")
        elif k not in ("checkpoint.format", "checkpoint.version", "checkpoint.order", _SIZE_KEY, _HASH_KEY) \
                and not (k.startswith(_HASH_PREFIX) and k[len(_HASH_PREFIX):] in h):
            _fail(path, "is corrupted: unknown metadata key {!r}".format(k))
    return tensors, user


# ---- format 1 ---------------------------------------------------------------------------------

_FNV_OFFSET = 0xcbf29ce484222325
_FNV_PRIME = 0x100000001b3
_M64 = (1 << 64) - 1
_V1_DTYPES = {0: ("<f8", 8), 1: ("<f4", 4), 2: ("<u2", 2), 3: ("<i4", 4)}


def fnv1a64(data: bytes, h: int = _FNV_OFFSET) -> int:
    """FNV-1a 64 (format 1's checksum), continuing from h. Pure Python: about 10 MB/s."""
    for b in data:
        h = ((h ^ b) * _FNV_PRIME) & _M64
    return h


def _load_v1(path, verify, names, raw_bf16=False):
    b = Path(path).read_bytes()
    size = len(b)
    if size < 32:
        _fail(path, "is truncated (expected at least 32 bytes, found {})".format(size))
    if verify and struct.unpack_from("<Q", b, 24)[0] != fnv1a64(b[:24]):
        _fail(path, "is corrupted: checksum mismatch in the file header")
    version, hsize, total = struct.unpack_from("<IIQ", b, 8)
    if version != 1 or hsize != 32:
        _fail(path, "has format version {} (header size {}); this reader knows version 1".format(version, hsize))
    if size != total:
        _fail(path, "is truncated (expected {} bytes, found {})".format(total, size) if size < total else
              "is corrupted: it has {} bytes of trailing garbage".format(size - total))
    tensors: Dict[str, np.ndarray] = {}
    meta: Dict[str, str] = {}
    off, end, count = 32, size - 24, 0
    while off < end:
        kind, dcode, ndim = b[off], b[off + 1], b[off + 2]
        (name_len,) = struct.unpack_from("<I", b, off + 4)
        shape = struct.unpack_from("<4q", b, off + 8)[:ndim]
        (length,) = struct.unpack_from("<Q", b, off + 40)
        head_end = off + 48 + name_len
        if head_end + 16 + length > end:
            _fail(path, "is corrupted: an entry at byte {} runs past the end of the entries".format(off))
        name = b[off + 48:head_end].decode("utf-8", "surrogateescape")
        payload = b[head_end + 8:head_end + 8 + length]
        if verify:
            if struct.unpack_from("<Q", b, head_end)[0] != fnv1a64(b[off:head_end]):
                _fail(path, "is corrupted: checksum mismatch in the header or name of the entry at byte {}".format(off))
            if struct.unpack_from("<Q", b, head_end + 8 + length)[0] != fnv1a64(payload):
                _fail(path, "is corrupted: checksum mismatch in {!r}".format(name))
        if kind == 3:
            meta[name] = payload.decode("utf-8", "surrogateescape")
        elif kind == 2:
            if names is None or BLOB_PREFIX + name in names:
                tensors[BLOB_PREFIX + name] = np.frombuffer(payload, dtype="<u8").astype(np.uint64)
        elif kind == 1 and dcode in _V1_DTYPES:
            if names is None or name in names:
                arr = np.frombuffer(payload, dtype=_V1_DTYPES[dcode][0]).reshape(shape)
                tensors[name] = bf16_to_float32(arr) if dcode == 2 and not raw_bf16 else \
                    arr.astype(arr.dtype.newbyteorder("="))
        else:
            _fail(path, "is corrupted: entry {!r} has kind {} dtype {}".format(name, kind, dcode))
        off = head_end + 16 + length
        count += 1
    if b[end:end + 8] != b"CKPT_END" or struct.unpack_from("<Q", b, end + 8)[0] != count:
        _fail(path, "is corrupted: bad trailer")
    if verify and struct.unpack_from("<Q", b, end + 16)[0] != fnv1a64(b[:end + 16]):
        _fail(path, "is corrupted: whole-file checksum mismatch")
    if names is not None:
        for want in names:
            if want not in tensors:
                raise KeyError("checkpoint {} has no tensor {!r}".format(path, want))
    return tensors, meta


# --------------------------------------------------------------------------------------------
# Writing (format 2, byte for byte what moelab's C++ writer makes for the same content)


def _json_string(s: str) -> str:
    """A JSON string as serde_json / nlohmann write it: '"', '\\' and control characters
    escaped, everything else verbatim."""
    return json.dumps(s, ensure_ascii=False)


def _st_dtype(arr: np.ndarray, name: str, bf16: bool) -> str:
    if name.startswith(BLOB_PREFIX):
        return "U64"
    kind = np.dtype(arr.dtype)
    if bf16:
        return "BF16"
    for st, np_kind in (("F64", np.float64), ("F32", np.float32), ("I32", np.int32)):
        if kind == np_kind:
            return st
    raise TypeError("tensor {!r}: dtype {} is not a checkpoint dtype (float64, float32, int32, or "
                    "bf16 given as uint16 bit patterns)".format(name, kind))


def write_checkpoint(path: PathLike, tensors: Dict[str, np.ndarray], meta: Dict[str, str],
                     bf16: Sequence[str] = ()) -> Path:
    """Writes a format-2 checkpoint that moelab reads (`moelab generate --checkpoint`, --resume if
    the content is a training state): tensors in dict order (float64, float32, int32; names in
    `bf16` are uint16 bf16 bit patterns; "__blob__.NAME" uint64 blobs), metadata strings.
    Written to PATH.tmp, then renamed over PATH."""
    path = Path(path)
    entries = []
    for name, arr in tensors.items():
        if name in bf16:
            arr = np.ascontiguousarray(arr, dtype=np.uint16)
        elif name.startswith(BLOB_PREFIX):
            arr = np.ascontiguousarray(arr, dtype=np.uint64).reshape(-1)
        else:
            arr = np.ascontiguousarray(arr)
        st = _st_dtype(arr, name, name in bf16)
        data = arr.astype(arr.dtype.newbyteorder("<"), copy=False).tobytes()
        entries.append((name, st, list(arr.shape), data))
    md = {}
    for k, v in meta.items():
        if k.startswith(RESERVED):
            raise ValueError("meta key {!r}: keys starting with 'checkpoint.' are the format's".format(k))
        try:
            k.encode("utf-8")
            v.encode("utf-8")
            md[k] = v
        except UnicodeEncodeError:   # bytes that are not UTF-8 (load_checkpoint's surrogateescape)
            md[_HEX_PREFIX + k.encode("utf-8", "surrogateescape").hex()] = \
                v.encode("utf-8", "surrogateescape").hex()
    for name, _, _, data in entries:
        md[_HASH_PREFIX + name] = hashlib.sha256(data).hexdigest()
    md["checkpoint.format"] = "moelab"
    md["checkpoint.version"] = str(FORMAT_VERSION)
    md["checkpoint.order"] = json.dumps([e[0] for e in entries], ensure_ascii=False, separators=(",", ":"))
    md[_SIZE_KEY] = "0" * 20
    md[_HASH_KEY] = "0" * 64
    ordered = sorted(entries, key=lambda e: (-_ST_ORDER.index(e[1]), e[0].encode()))

    def header() -> bytes:
        parts = ["{", '"__metadata__":{',
                 ",".join(_json_string(k) + ":" + _json_string(md[k])
                          for k in sorted(md, key=lambda k: k.encode())), "}"]
        off = 0
        for name, st, shape, data in ordered:
            parts.append(",{}:{{\"dtype\":\"{}\",\"shape\":[{}],\"data_offsets\":[{},{}]}}".format(
                _json_string(name), st, ",".join(str(d) for d in shape), off, off + len(data)))
            off += len(data)
        text = ("".join(parts) + "}").encode()
        return text + b" " * ((8 - len(text) % 8) % 8)

    n = len(header())
    md[_SIZE_KEY] = "{:020d}".format(8 + n + sum(len(e[3]) for e in entries))
    prefix = struct.pack("<Q", n)
    md[_HASH_KEY] = hashlib.sha256(prefix + header()).hexdigest()
    text = header()
    assert len(text) == n
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(prefix)
        f.write(text)
        for e in ordered:
            f.write(e[3])
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


# --------------------------------------------------------------------------------------------
# Runs and expert weights


_STEP_FILE = re.compile(r"^step_(\d{6,})\.ckpt$")


def list_checkpoints(folder: PathLike) -> List[Tuple[int, Path]]:
    """(step, path) of every checkpoint in a run's checkpoint folder (step_NNNNNN.ckpt), by step."""
    folder = Path(folder)
    out = []
    for p in folder.iterdir() if folder.is_dir() else []:
        m = _STEP_FILE.match(p.name)
        if m and p.is_file():
            out.append((int(m.group(1)), p))
    return sorted(out)


def moe_blocks(tensors: Dict[str, np.ndarray]) -> List[int]:
    """The indices of the transformer blocks with an MoE layer ("blockN.moe.experts.w1")."""
    found = []
    for name in tensors:
        m = re.fullmatch(r"block(\d+)\.moe\.experts\.w1", name)
        if m:
            found.append(int(m.group(1)))
    return sorted(found)


def expert_matrices(tensors: Dict[str, np.ndarray], block: int) -> Dict[str, np.ndarray]:
    """The SwiGLU expert weights of one MoE block, split as in the literature:
    w1 (gate) [E, D, F], w3 (up) [E, D, F], w2 (down) [E, F, D]. moelab stores w1 and w3 side by
    side as experts.w1 [E, D, 2F] ([gate | up])."""
    fused = tensors["block{}.moe.experts.w1".format(block)]
    f = fused.shape[-1] // 2
    return {"w1": fused[..., :f], "w3": fused[..., f:],
            "w2": tensors["block{}.moe.experts.w2".format(block)]}


def expert_cosine_similarity(w: np.ndarray) -> np.ndarray:
    """[E, E] cosine similarity between experts: each expert's weights (w[e]) flattened."""
    flat = np.asarray(w, dtype=np.float64).reshape(w.shape[0], -1)
    norms = np.linalg.norm(flat, axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        unit = flat / np.where(norms > 0, norms, 1.0)[:, None]
    sim = unit @ unit.T
    sim[norms == 0, :] = np.nan
    sim[:, norms == 0] = np.nan
    return sim


def mean_off_diagonal(sim: np.ndarray) -> float:
    """The mean of an [E, E] similarity matrix without its diagonal (NaN for E < 2)."""
    e = sim.shape[0]
    if e < 2:
        return float("nan")
    return float(np.nanmean(sim[~np.eye(e, dtype=bool)]))


def router_weight_norms(tensors: Dict[str, np.ndarray], block: int) -> np.ndarray:
    """[E] L2 norm of each expert's router column (router.w is [D, E]: logit_e = x . w[:, e])."""
    w = np.asarray(tensors["block{}.moe.router.w".format(block)], dtype=np.float64)
    return np.linalg.norm(w, axis=0)


def expert_weight_trajectory(checkpoints: Sequence[Tuple[int, PathLike]], verify: bool = True) -> dict:
    """What changes in the expert weights across a run's checkpoints, one checkpoint at a time
    (only the expert and router tensors are loaded).

    Returns {"steps": [S], "blocks": [B...], per block b: {"similarity": {"w1"|"w3"|"w2":
    [S, E, E]}, "mean_similarity": {...: [S]}, "router_norm": [S, E], "expert_norm": {...:
    [S, E]}}}."""
    steps, per_block = [], {}
    blocks: List[int] = []
    for step, path in checkpoints:
        names = None
        if _is_v2(path):
            header, _ = read_header(path)
            names = [n for n in header if re.fullmatch(r"block\d+\.moe\.(experts\.w[12]|router\.w)", n)]
        tensors, _ = load_checkpoint(path, verify=verify, names=names)
        bl = moe_blocks(tensors)
        if not blocks:
            blocks = bl
        elif bl != blocks:
            raise CheckpointError("checkpoint {} has MoE blocks {}, the earlier ones {}".format(path, bl, blocks))
        steps.append(step)
        for b in bl:
            d = per_block.setdefault(b, {"similarity": {}, "mean_similarity": {}, "router_norm": [],
                                         "expert_norm": {}})
            for key, w in expert_matrices(tensors, b).items():
                sim = expert_cosine_similarity(w)
                d["similarity"].setdefault(key, []).append(sim)
                d["mean_similarity"].setdefault(key, []).append(mean_off_diagonal(sim))
                d["expert_norm"].setdefault(key, []).append(
                    np.linalg.norm(np.asarray(w, np.float64).reshape(w.shape[0], -1), axis=1))
            d["router_norm"].append(router_weight_norms(tensors, b))
    out = {"steps": np.asarray(steps), "blocks": blocks}
    for b, d in per_block.items():
        out[b] = {
            "similarity": {k: np.stack(v) for k, v in d["similarity"].items()},
            "mean_similarity": {k: np.asarray(v) for k, v in d["mean_similarity"].items()},
            "router_norm": np.stack(d["router_norm"]),
            "expert_norm": {k: np.stack(v) for k, v in d["expert_norm"].items()},
        }
    return out


def _is_v2(path: PathLike) -> bool:
    with open(path, "rb") as f:
        head = f.read(8)
    return len(head) == 8 and not _MAGIC_V1.startswith(head)
