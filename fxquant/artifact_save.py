"""Writing an artifact: the graph as JSON data, tensors as whole aligned buffers, an atomic folder swap.

Example:
    >>> save(compiled, "out/digits-w4")                       # doctest: +SKIP
    PosixPath('out/digits-w4')
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from pathlib import Path
from typing import Any

import torch
import torch.fx as fx
from torch.utils import _pytree as pytree

from . import __version__, ir
from . import artifact_schema as S
from .artifact_check import abstract_run
from .artifact_files import FORMAT, check_destination, sha256_file, staged_dir, write_tensor
from .artifact_manifest import FORMAT_VERSION, check_graph_data, check_header
from .artifact_modules import CLASSES, class_name, op_tensors, plain_attrs
from .artifact_ops import target_name
from .errors import ArtifactError
from .input_spec import InputSpec
from .ops import LoweredOp

SELFTEST_MAX_BYTES = 8 << 20          # example inputs + outputs stored for the load-time self-test


def _encode(value: Any, where: str) -> Any:
    if isinstance(value, fx.Node):
        return {"node": value.name}
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else {"float": repr(value)}
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


def _meta(node: fx.Node) -> dict[str, Any]:
    m = node.meta
    d = m.get(ir.DECISION)
    stats = {k: (float(v) if isinstance(v, (int, float)) and math.isfinite(v) else None)
             if not isinstance(v, str) else v for k, v in (m.get(ir.QUANT_STATS) or {}).items()
             if isinstance(v, (int, float, str, type(None))) and not isinstance(v, bool)}
    shape = m.get(ir.SHAPE)
    return {
        "module": m.get(ir.MODULE, ""),
        "module_type": m.get(ir.MODULE_TYPE, ""),
        "source": m.get(ir.SOURCE, ""),
        "provenance": list(m.get(ir.PROVENANCE, ())),
        "shape": list(shape) if isinstance(shape, tuple) and all(isinstance(d, int) for d in shape) else None,
        "dtype": m.get(ir.DTYPE) if isinstance(m.get(ir.DTYPE), str) else None,
        "decision": dataclasses.asdict(d) if d is not None else None,
        "quant_stats": stats,
    }


def _json_data(value: Any) -> Any:
    """Plain JSON data for display fields: non-finite floats become None, other objects their str()."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, dict):
        return {str(k): _json_data(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_data(v) for v in value]
    return str(value)


def _graph_entries(gm: fx.GraphModule, tensors: dict[str, torch.Tensor]) -> tuple[list, dict]:
    entries, modules = [], {}
    for node in gm.graph.nodes:
        target: Any = node.target
        if node.op == "call_module":
            if node.target == "_guards_fn":
                continue  # torch.export's shape guards: generated code, replaced by the inputs' spec
            mod = gm.get_submodule(node.target)
            if not isinstance(mod, LoweredOp) or class_name(mod) not in CLASSES:
                raise ArtifactError(
                    f"node {node.name!r} calls module {type(mod).__name__}; artifacts store only "
                    f"fxquant's lowered ops"
                )
            buffers = {}
            for bname, buf in op_tensors(mod).items():  # buffers and the codes (unpacked)
                buffers[bname] = None if buf is None else f"{node.target}.{bname}"
                if buf is not None:
                    tensors[f"{node.target}.{bname}"] = buf
            modules[node.target] = {
                "class": class_name(mod),
                "buffers": buffers,
                "attrs": {k: _encode(v, f"{node.target}.{k}") for k, v in plain_attrs(mod).items()},
            }
        elif node.op == "get_attr":
            tensors[node.target] = ir.get_attr_value(gm, node.target)
        elif node.op == "call_function":
            target = target_name(node.target)
            if target is None:
                raise ArtifactError(
                    f"node {node.name!r} calls {node.target}, which artifacts cannot store (only ATen "
                    f"tensor ops of fxquant.artifact_ops.ATEN_OPS, operator functions and fxquant "
                    f"ops); keep such code outside the compiled graph"
                )
        where = f"node {node.name!r}"
        entries.append(
            {
                "name": node.name,
                "op": node.op,
                "target": target,
                "args": _encode(node.args, where),
                "kwargs": {k: _encode(v, where) for k, v in node.kwargs.items()},
                "meta": _meta(node),
            }
        )
    return entries, modules


def _codegen_info(gm: fx.GraphModule) -> dict | None:
    info = getattr(gm.graph._codegen, "pytree_info", None)
    if info is None:
        return None
    return {
        "orig_args": list(info.orig_args),
        "in_spec": pytree.treespec_dumps(info.in_spec) if info.in_spec is not None else None,
        "out_spec": pytree.treespec_dumps(info.out_spec) if info.out_spec is not None else None,
    }


def _inputs(cm, spec: InputSpec) -> list[dict]:
    items = spec.to_json()
    examples = list(cm.example_inputs or ()) if spec._flat else []
    placeholders = [n for n in cm.graph_module.graph.nodes if n.op == "placeholder"]
    for i, (item, node) in enumerate(zip(items, placeholders)):
        if item["kind"] != "tensor":
            continue
        ex = examples[i] if i < len(examples) and isinstance(examples[i], torch.Tensor) else None
        shape = tuple(ex.shape) if ex is not None else node.meta.get(ir.SHAPE)
        if shape is None:
            raise ArtifactError(
                f"input {item['name']!r} has no recorded example shape; compile with the default "
                f"pipeline (propagate-shapes) before saving"
            )
        item["example"] = list(shape)
    return items


def _selftest(cm, spec: InputSpec, tensors: dict[str, torch.Tensor]) -> dict | None:
    """The example inputs and this module's outputs on them (into `tensors`), when they are small."""
    examples = cm.example_inputs
    flat = spec._flat or spec._pairs_only     # int8-rows inputs: the float examples, converted by the module
    if not examples or not flat or not all(isinstance(a, torch.Tensor) for a in examples):
        return None
    if sum(a.numel() * a.element_size() for a in examples) > SELFTEST_MAX_BYTES // 2:
        return None
    with torch.no_grad():
        outputs = pytree.tree_leaves(
            cm(*[a.clone() for a in examples])
        )  # clones: a graph may write its inputs
    if (
        not all(isinstance(t, torch.Tensor) for t in outputs)
        or sum(t.numel() * t.element_size() for t in outputs) > SELFTEST_MAX_BYTES // 2
    ):
        return None
    names = {
        "inputs": [f"selftest.input{i}" for i in range(len(examples))],
        "outputs": [f"selftest.output{i}" for i in range(len(outputs))],
    }
    tensors.update(zip(names["inputs"], examples))
    tensors.update(zip(names["outputs"], (t.detach() for t in outputs)))
    return names


def _write_tensors(tmp: Path, file: str, tensors: dict[str, torch.Tensor], code_bits: dict[str, int]) -> dict:
    """Write `tensors` into tmp/file; returns their table entries (a tensor seen twice is an alias)."""
    table, offset, seen = {}, 0, {}
    extra = {} if file == "weights.bin" else {"file": file}
    with open(tmp / file, "wb") as blob:
        for name, t in tensors.items():
            key = (
                t.untyped_storage().data_ptr(),
                t.storage_offset(),
                tuple(t.shape),
                t.dtype,
                tuple(t.stride()),
            )
            if key in seen:  # shared by two modules (tied embedding + projection): stored once
                table[name] = {"alias": seen[key]}
                continue
            seen[key] = name
            bits = code_bits.get(name)
            start, nbytes = write_tensor(blob, offset, t, bits)
            table[name] = {
                "dtype": str(t.dtype).replace("torch.", ""),
                "shape": list(t.shape),
                "offset": start,
                "nbytes": nbytes,
                **({"bits": bits} if bits else {}),
                **extra,
            }
            offset = start + nbytes
    return table


def _kernel_sources(gm: fx.GraphModule, tmp: Path) -> None:
    for name, mod in gm.named_children():
        source = getattr(getattr(mod, "kernel", None), "source", None)
        if isinstance(mod, LoweredOp) and isinstance(source, str):
            (tmp / "kernels").mkdir(exist_ok=True)
            (tmp / "kernels" / f"{S.name_segment(name, 'modules')}.c").write_text(source)


def save(cm, directory: str | os.PathLike) -> Path:
    """Write `cm` (a CompiledModule) to `directory`; an old artifact there is replaced atomically.

    Refuses a folder that holds anything but an fxquant artifact. The manifest written is checked
    by the same schema `load` applies, so an artifact that saves also loads.
    """
    directory = Path(directory)
    check_destination(directory)
    gm = cm.graph_module
    tensors: dict[str, torch.Tensor] = {}
    entries, modules = _graph_entries(gm, tensors)
    spec = getattr(cm, "input_spec", None) or InputSpec.from_graph(gm)
    inputs = _inputs(cm, spec)
    shapes = abstract_run(
        gm,
        [
            dict(it, dtype=S.DTYPES.get(it.get("dtype")), example=tuple(it.get("example", ())))
            for it in inputs
        ],
    )
    for entry in entries:
        entry["out_shape"] = shapes.get(entry["name"])
    checks: dict[str, torch.Tensor] = {}
    selftest = _selftest(cm, spec, checks)
    code_bits = {
        f"{name}.codes": int(m["attrs"]["bits"]) for name, m in modules.items() if "bits" in m["attrs"]
    }
    with staged_dir(directory) as tmp:
        table = _write_tensors(tmp, "weights.bin", tensors, code_bits)
        if checks:  # beside the weights, so weights.bin holds exactly the model
            table.update(_write_tensors(tmp, "selftest.bin", checks, {}))
        (tmp / "forward.py").write_text(gm.code)
        _kernel_sources(gm, tmp)
        files = {
            p.relative_to(tmp).as_posix(): sha256_file(tmp, p.relative_to(tmp).as_posix())
            for p in sorted(tmp.rglob("*"))
            if p.is_file()
        }
        sig = getattr(cm, "_signature", None)
        manifest = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "fxquant_version": __version__,
            "torch_version": torch.__version__,
            "kind": "module",
            "pipeline": cm.pipeline,
            "target": cm.config.get("target", "native"),
            "name": cm.name,
            "config": _json_data(cm.config),
            "fp32_bytes": int(cm.fp32_bytes),
            "signature": list(sig.parameters) if sig is not None else None,
            "inputs": inputs,
            "decisions": _json_data(cm.report_rows()),
            "graph": {"nodes": entries, "codegen": _codegen_info(gm)},
            "modules": modules,
            "tensors": table,
            "files": files,
            "selftest": selftest,
        }
        try:
            check_header(manifest, directory)
            check_graph_data(manifest)
        except ArtifactError as exc:
            raise ArtifactError(
                f"cannot save this module: {exc} (fxquant.load would refuse the artifact; "
                f"please report this as a bug)"
            ) from None
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1, allow_nan=False))
    return directory
