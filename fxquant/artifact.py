"""Compiled artifacts: `CompiledModule.save(dir)` and `fxquant.load(dir)`, with no pickle anywhere.

Layout of an artifact directory:
    manifest.json   versions, pipeline, target, per-node decisions, the graph as JSON data,
                    every tensor's dtype/shape/offset/sha256, every file's sha256
    weights.bin     all tensors (packed codes, tables, scales, float weights), raw little-endian
    forward.py      the generated Python forward (for people; never executed on load)
    kernels/*.c     the generated C kernels (rebuilt for the loading host through the build cache)

Loading resolves call targets only from an allow-list (ATen ops, `operator`, fxquant's lowered ops),
checks every checksum and shape, and raises ArtifactError naming what is wrong.

Example:
    >>> cm.save("out/digits-w4")                     # doctest: +SKIP
    >>> cm2 = fxquant.load("out/digits-w4")           # doctest: +SKIP
"""
from __future__ import annotations

import dataclasses
import hashlib
import importlib
import json
import operator
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
import torch.fx as fx
from torch import nn
from torch.utils import _pytree as pytree

from . import __version__, ir
from .errors import ArtifactError
from .ops import LoweredOp, _QWeightStore

FORMAT = "fxquant-artifact"
FORMAT_VERSION = 1
_DTYPES = {str(d).replace("torch.", ""): d for d in (torch.float32, torch.float64, torch.float16, torch.bfloat16,
                                                      torch.int8, torch.uint8, torch.int16, torch.int32,
                                                      torch.int64, torch.bool)}
_SKIP_ATTRS = {"training", "kernel", "backend"}


# ---------------------------------------------------------------------------------------- encoding
def _encode(value: Any, where: str) -> Any:
    if isinstance(value, fx.Node):
        return {"node": value.name}
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if value == value and abs(value) != float("inf") else {"float": repr(value)}
    if isinstance(value, (list, tuple)):
        items = [_encode(v, where) for v in value]
        return items if isinstance(value, list) else {"tuple": items}
    if isinstance(value, torch.dtype):
        return {"dtype": str(value).replace("torch.", "")}
    if isinstance(value, torch.device):
        return {"device": str(value)}
    if isinstance(value, (torch.memory_format, torch.layout)):
        return {"torch": str(value).replace("torch.", "")}
    raise ArtifactError(f"{where}: cannot store an argument of type {type(value).__name__} in an artifact")


def _decode(value: Any, nodes: dict[str, fx.Node]) -> Any:
    if isinstance(value, list):
        return [_decode(v, nodes) for v in value]
    if not isinstance(value, dict):
        return value
    if "node" in value:
        if value["node"] not in nodes:
            raise ArtifactError(f"graph refers to node {value['node']!r} before defining it")
        return nodes[value["node"]]
    if "tuple" in value:
        return tuple(_decode(v, nodes) for v in value["tuple"])
    if "float" in value:
        return float(value["float"])
    if "dtype" in value:
        return _dtype(value["dtype"])
    if "device" in value:
        return torch.device(value["device"])
    if "torch" in value and value["torch"] in ("contiguous_format", "channels_last", "preserve_format", "strided"):
        return getattr(torch, value["torch"])
    raise ArtifactError(f"unknown encoded value {value!r}")


def _dtype(name: str) -> torch.dtype:
    if name not in _DTYPES:
        raise ArtifactError(f"unsupported tensor dtype {name!r}")
    return _DTYPES[name]


def _target_name(node: fx.Node) -> str:
    t = node.target
    if isinstance(t, torch._ops.OpOverload):
        return f"torch.ops.{t.namespace}.{t._schema.name.split('::')[1]}.{t._overloadname}"
    if getattr(t, "__module__", None) in ("_operator", "operator") and hasattr(operator, t.__name__):
        return f"operator.{t.__name__}"
    raise ArtifactError(f"node {node.name!r} calls {t!r}, which artifacts cannot store (only ATen ops, "
                        f"operator functions and fxquant ops); keep such code outside the compiled graph")


def _resolve_target(name: str) -> Any:
    parts = name.split(".")
    if parts[:3] == ["torch", "ops", "aten"] and len(parts) == 5:
        try:
            return getattr(getattr(torch.ops.aten, parts[3]), parts[4])
        except AttributeError:
            raise ArtifactError(f"unknown ATen op {name!r} (artifact from another torch version?)") from None
    if parts[0] == "operator" and len(parts) == 2 and hasattr(operator, parts[1]):
        return getattr(operator, parts[1])
    raise ArtifactError(f"call target {name!r} is not allowed in an artifact")


def _meta(node: fx.Node) -> dict[str, Any]:
    m = node.meta
    d = m.get(ir.DECISION)
    stats = {k: (float(v) if isinstance(v, (int, float)) else v)
             for k, v in (m.get(ir.QUANT_STATS) or {}).items() if isinstance(v, (int, float, str, type(None)))}
    return {"module": m.get(ir.MODULE, ""), "module_type": m.get(ir.MODULE_TYPE, ""), "source": m.get(ir.SOURCE, ""),
            "provenance": list(m.get(ir.PROVENANCE, ())), "shape": m.get(ir.SHAPE), "dtype": m.get(ir.DTYPE),
            "decision": dataclasses.asdict(d) if d is not None else None, "quant_stats": stats}


def _restore_meta(node: fx.Node, data: dict[str, Any]) -> None:
    node.meta[ir.MODULE] = data.get("module", "")
    node.meta[ir.MODULE_TYPE] = data.get("module_type", "")
    node.meta[ir.SOURCE] = data.get("source", "")
    node.meta[ir.PROVENANCE] = tuple(data.get("provenance", ()))
    if data.get("shape") is not None:
        node.meta[ir.SHAPE] = tuple(data["shape"])
    if data.get("dtype"):
        node.meta[ir.DTYPE] = data["dtype"]
    if data.get("decision"):
        node.meta[ir.DECISION] = ir.QuantDecision(**data["decision"])
    if data.get("quant_stats"):
        node.meta[ir.QUANT_STATS] = dict(data["quant_stats"])


def _plain_attrs(module: nn.Module) -> dict[str, Any]:
    """The module's own plain attributes; one that cannot be stored is an error, not silently dropped."""
    return {key: _encode(value, f"{type(module).__name__} attribute {key!r}") for key, value in vars(module).items()
            if not key.startswith("_") and key not in _SKIP_ATTRS}


def pack_codes(codes: torch.Tensor, bits: int) -> bytes:
    """b-bit codes -> a little-endian bit stream (8 codes fill `bits` bytes)."""
    flat = codes.reshape(-1).to(torch.int64)
    groups = torch.nn.functional.pad(flat, (0, (-flat.numel()) % 8)).view(-1, 8)
    if bits == 8:
        return bytes(groups.to(torch.uint8).contiguous().untyped_storage())
    word = (groups << (bits * torch.arange(8))).sum(1)                 # 8*bits <= 56 bits
    out = ((word[:, None] >> (8 * torch.arange(bits))) & 0xFF).to(torch.uint8)
    return bytes(out.contiguous().untyped_storage())


def unpack_codes(data: bytes, bits: int, numel: int) -> torch.Tensor:
    """Inverse of pack_codes: uint8 codes, `numel` of them."""
    raw = torch.frombuffer(bytearray(data), dtype=torch.uint8).to(torch.int64)
    if bits == 8:
        return raw[:numel].to(torch.uint8)
    word = (raw.view(-1, bits) << (8 * torch.arange(bits))).sum(1)
    codes = (word[:, None] >> (bits * torch.arange(8))) & ((1 << bits) - 1)
    return codes.reshape(-1)[:numel].to(torch.uint8)


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# -------------------------------------------------------------------------------------------- save
def _graph_entries(gm: fx.GraphModule, tensors: dict[str, torch.Tensor]) -> tuple[list, dict]:
    entries, modules = [], {}
    for node in gm.graph.nodes:
        target: Any = node.target
        if node.op == "call_module":
            if node.target == "_guards_fn":
                continue  # torch.export's shape guards: generated code, rebuilt as input checks on load
            mod = gm.get_submodule(node.target)
            if not isinstance(mod, LoweredOp):
                raise ArtifactError(f"node {node.name!r} calls module {type(mod).__name__}; artifacts store only "
                                    f"fxquant's lowered ops")
            buffers = {}
            for bname, buf in mod._buffers.items():
                buffers[bname] = None if buf is None else f"{node.target}.{bname}"
                if buf is not None:
                    tensors[f"{node.target}.{bname}"] = buf
            modules[node.target] = {"class": f"{type(mod).__module__}.{type(mod).__qualname__}",
                                    "attrs": _plain_attrs(mod), "buffers": buffers}
        elif node.op == "get_attr":
            tensors[node.target] = ir.get_attr_value(gm, node.target)
        elif node.op == "call_function":
            target = _target_name(node)
        where = f"node {node.name!r}"
        entries.append({"name": node.name, "op": node.op, "target": target,
                        "args": _encode(node.args, where),
                        "kwargs": {k: _encode(v, where) for k, v in node.kwargs.items()}, "meta": _meta(node)})
    return entries, modules


def _codegen_info(gm: fx.GraphModule) -> dict | None:
    info = getattr(gm.graph._codegen, "pytree_info", None)
    if info is None:
        return None
    return {"orig_args": list(info.orig_args),
            "in_spec": pytree.treespec_dumps(info.in_spec) if info.in_spec is not None else None,
            "out_spec": pytree.treespec_dumps(info.out_spec) if info.out_spec is not None else None}


def save(cm, directory: str | os.PathLike) -> Path:
    """Write `cm` (a CompiledModule) to `directory` atomically (a temp folder renamed into place)."""
    directory = Path(directory)
    gm = cm.graph_module
    tensors: dict[str, torch.Tensor] = {}
    entries, modules = _graph_entries(gm, tensors)
    code_bits = {f"{name}.codes": int(spec["attrs"]["bits"]) for name, spec in modules.items()
                 if "bits" in spec["attrs"]}
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.tmp-", dir=directory.parent))
    try:
        table, offset, seen = {}, 0, {}
        with open(tmp / "weights.bin", "wb") as blob:
            for name, t in tensors.items():
                key = (t.data_ptr(), tuple(t.shape), t.dtype, tuple(t.stride()))
                if key in seen:  # shared by two modules (tied embedding + projection): stored once
                    table[name] = {"alias": seen[key]}
                    continue
                seen[key] = name
                bits = code_bits.get(name)
                if bits is not None:
                    data = pack_codes(t, bits)
                else:
                    data = bytes(t.detach().cpu().clone().contiguous().untyped_storage()) if t.numel() else b""
                blob.write(data)
                table[name] = {"dtype": str(t.dtype).replace("torch.", ""), "shape": list(t.shape),
                               "offset": offset, "nbytes": len(data), **({"bits": bits} if bits else {})}
                offset += len(data)
        (tmp / "forward.py").write_text(gm.code)
        target = cm.config.get("target", "native")
        if modules and target != "reference":
            try:
                from .codegen import attach_kernels

                attach_kernels(gm, target=target, fallback=bool(cm.config.get("fallback")), out_dir=tmp / "kernels")
            except Exception as exc:  # sources are documentation; the artifact stays valid without them
                (tmp / "kernels.txt").write_text(f"kernel sources not written: {exc}\n")
        files = {p.relative_to(tmp).as_posix(): _sha256(p.read_bytes()) for p in sorted(tmp.rglob("*")) if p.is_file()}
        sig = getattr(cm, "_signature", None)
        manifest = {
            "format": FORMAT, "format_version": FORMAT_VERSION, "fxquant_version": __version__,
            "torch_version": torch.__version__, "pipeline": cm.pipeline, "target": target, "name": cm.name,
            "config": json.loads(json.dumps(cm.config, default=str)), "fp32_bytes": cm.fp32_bytes,
            "signature": list(sig.parameters) if sig is not None else None,
            "decisions": [{k: v for k, v in r.items()} for r in cm.report_rows()],
            "graph": {"nodes": entries, "codegen": _codegen_info(gm)}, "modules": modules, "tensors": table,
            "files": files,
        }
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1, default=str))
        os.chmod(tmp, 0o755)
        if directory.exists():
            shutil.rmtree(directory)
        os.replace(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return directory


# -------------------------------------------------------------------------------------------- load
def _read_manifest(directory: Path) -> dict:
    path = directory / "manifest.json"
    if not path.is_file():
        raise ArtifactError(f"{directory} has no manifest.json: not an fxquant artifact "
                            f"(create one with compiled.save(dir))")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ArtifactError(f"{path} is corrupt ({exc}); re-save the artifact") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ArtifactError(f"{path} is not an fxquant artifact manifest")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ArtifactError(f"{directory} uses artifact format {manifest.get('format_version')}, this fxquant "
                            f"reads format {FORMAT_VERSION}; recompile the model with this version")
    for key in ("graph", "modules", "tensors", "files"):
        if key not in manifest:
            raise ArtifactError(f"{path} lacks {key!r}: truncated or tampered")
    return manifest


def _check_files(directory: Path, manifest: dict) -> None:
    for rel, digest in manifest["files"].items():
        path = directory / rel
        if not path.is_file():
            raise ArtifactError(f"{directory} is missing {rel}; the artifact is incomplete")
        if _sha256(path.read_bytes()) != digest:
            raise ArtifactError(f"{path} does not match its checksum in manifest.json: the file is corrupted or "
                                f"was modified; re-save the artifact")
    if "weights.bin" not in manifest["files"]:
        raise ArtifactError("manifest.json does not list weights.bin: tampered artifact")


def _load_tensors(directory: Path, table: dict) -> dict[str, torch.Tensor]:
    blob = (directory / "weights.bin").read_bytes()
    out = {}
    for name, spec in table.items():
        if "alias" in spec:
            if spec["alias"] not in out:
                raise ArtifactError(f"tensor {name!r} aliases {spec['alias']!r}, which is not stored before it")
            out[name] = out[spec["alias"]]
            continue
        dtype, shape = _dtype(spec["dtype"]), spec["shape"]
        numel = 1
        for d in shape:
            numel *= int(d)
        bits = spec.get("bits")
        if bits is not None and (not isinstance(bits, int) or not 2 <= bits <= 8 or dtype != torch.uint8):
            raise ArtifactError(f"tensor {name!r} has an invalid code width {bits!r}: tampered artifact")
        nbytes = (-(-numel // 8) * bits) if bits else numel * torch.empty((), dtype=dtype).element_size()
        off = int(spec["offset"])
        if nbytes != spec["nbytes"] or off < 0 or off + nbytes > len(blob):
            raise ArtifactError(f"tensor {name!r} {shape} {spec['dtype']} does not fit weights.bin: truncated or "
                                f"tampered artifact")
        if bits:
            t = unpack_codes(blob[off:off + nbytes], bits, numel)
        else:
            t = torch.frombuffer(bytearray(blob[off:off + nbytes]), dtype=dtype) if nbytes else \
                torch.empty(0, dtype=dtype)
        out[name] = t.reshape(shape)
    return out


def _set_tensor(root: nn.Module, dotted: str, value: torch.Tensor) -> None:
    owner = root
    *path, attr = dotted.split(".")
    for part in path:
        if part not in owner._modules:
            owner.add_module(part, nn.Module())
        owner = owner._modules[part]
    owner.register_buffer(attr, value)


def _build_module(name: str, spec: dict, tensors: dict[str, torch.Tensor]) -> nn.Module:
    cls_path = spec.get("class", "")
    mod_name, _, cls_name = cls_path.rpartition(".")
    if not mod_name.startswith("fxquant."):
        raise ArtifactError(f"module {name!r} has class {cls_path!r}; only fxquant's lowered ops may be loaded")
    try:
        cls = getattr(importlib.import_module(mod_name), cls_name)
    except (ImportError, AttributeError):
        raise ArtifactError(f"module {name!r}: class {cls_path!r} does not exist in this fxquant") from None
    if not (isinstance(cls, type) and issubclass(cls, LoweredOp)):
        raise ArtifactError(f"module {name!r}: {cls_path!r} is not a lowered fxquant op")
    mod = cls.__new__(cls)
    nn.Module.__init__(mod)
    for key, value in spec.get("attrs", {}).items():
        setattr(mod, key, _decode(value, {}))
    for bname, tname in spec.get("buffers", {}).items():
        if tname is not None and tname not in tensors:
            raise ArtifactError(f"module {name!r} needs tensor {tname!r}, which weights.bin lacks")
        mod.register_buffer(bname, None if tname is None else tensors[tname])
    mod.kernel, mod.backend = None, "reference"
    if not isinstance(mod, _QWeightStore):
        return mod
    try:
        qw = mod.qweight
        levels = 1 << qw.bits
        if qw.codes.numel() == 0 or int(qw.codes.max()) >= levels or int(qw.table_index.min()) < 0 or \
                int(qw.table_index.max()) >= qw.table.shape[0]:
            raise ValueError("codes or table indices out of range")
    except (ValueError, AttributeError, RuntimeError, TypeError) as exc:
        raise ArtifactError(f"module {name!r} holds an invalid quantized weight ({exc}): tampered artifact") from None
    return mod


def _build_graph(manifest: dict, root: nn.Module) -> fx.GraphModule:
    graph = fx.Graph()
    nodes: dict[str, fx.Node] = {}
    for entry in manifest["graph"]["nodes"]:
        op, target = entry["op"], entry["target"]
        if op not in ("placeholder", "get_attr", "call_function", "call_module", "output"):
            raise ArtifactError(f"node {entry.get('name')!r} has unknown op {op!r}")
        if op == "call_function":
            target = _resolve_target(target)
        args = _decode(entry["args"], nodes)
        kwargs = {k: _decode(v, nodes) for k, v in entry["kwargs"].items()}
        if op == "output":
            graph.output(args[0])
            continue
        node = graph.create_node(op, target, tuple(args), kwargs, name=entry["name"])
        _restore_meta(node, entry.get("meta", {}))
        nodes[entry["name"]] = node
    info = manifest["graph"].get("codegen")
    if info:
        from torch.fx.graph import _PyTreeCodeGen, _PyTreeInfo

        in_spec = pytree.treespec_loads(info["in_spec"]) if info["in_spec"] else None
        out_spec = pytree.treespec_loads(info["out_spec"]) if info["out_spec"] else None
        graph._codegen = _PyTreeCodeGen(_PyTreeInfo(info["orig_args"], in_spec, out_spec))
    gm = fx.GraphModule(root, graph)
    if info:
        gm._in_spec, gm._out_spec = graph._codegen.pytree_info.in_spec, graph._codegen.pytree_info.out_spec
    return gm


def load(directory: str | os.PathLike, target: str | None = None):
    """Load an artifact written by `save`; kernels are rebuilt (or fetched from the cache) for this host."""
    import inspect

    from .runtime import CompiledModule

    directory = Path(directory)
    manifest = _read_manifest(directory)
    _check_files(directory, manifest)
    tensors = _load_tensors(directory, manifest["tensors"])
    root = nn.Module()
    for name, spec in manifest["modules"].items():
        root.add_module(name, _build_module(name, spec, tensors))
    owned = {t for spec in manifest["modules"].values() for t in spec.get("buffers", {}).values() if t}
    for name, t in tensors.items():
        if name not in owned:
            _set_tensor(root, name, t)
    try:
        gm = _build_graph(manifest, root)
        gm.graph.lint()
        ir.verify(gm)
    except ArtifactError:
        raise
    except Exception as exc:
        raise ArtifactError(f"the graph in {directory}/manifest.json is invalid ({exc}): tampered artifact") from None
    params = manifest.get("signature")
    sig = inspect.Signature([inspect.Parameter(p, inspect.Parameter.POSITIONAL_OR_KEYWORD) for p in params]) \
        if params else None
    saved_target = manifest.get("target", "native")
    target = target or (saved_target if saved_target in ("reference", "portable") else "native")
    config = dict(manifest.get("config", {}), target=target)
    cm = CompiledModule(gm, pipeline=manifest.get("pipeline", ""), config=config, signature=sig,
                        name=manifest.get("name", ""), fp32_bytes=manifest.get("fp32_bytes"))
    if manifest["modules"] and target != "reference":
        from .codegen import attach_kernels

        attach_kernels(gm, target=target, fallback=bool(config.get("fallback")))
    return cm
