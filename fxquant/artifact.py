"""Compiled artifacts: `CompiledModule.save(dir)` and `fxquant.load(dir)`, with no pickle and no trust.

Layout of an artifact folder:
    manifest.json   versions, pipeline, target, the graph as JSON data, the lowered ops' attributes,
                    every tensor's dtype/shape/offset, every file's sha256, the inputs' spec
    weights.bin     all tensors (packed codes, tables, scales, float weights, self-test data), raw
                    little-endian, each at a 64-byte aligned offset
    forward.py      the generated Python forward (for people; never executed on load)
    kernels/*.c     the generated C kernels (for people; load renders its own from checked values)

The manifest is untrusted data (fxquant/artifact_schema.py): identifiers, enums, ranges, an op
allow-list, paths inside the folder. The rebuilt graph is then run on meta tensors at the recorded
shapes (shape arithmetic, nothing computed or allocated) and on the stored example inputs before it is
returned (fxquant/artifact_check.py). Bit-packed codes are kept as the stream read from weights.bin
(validated against their op's shape and width) and go to the kernel packing from there; loading runs
torch's ops on one thread (a busy machine cannot stall it at OpenMP barriers).

Example:
    >>> cm.save("out/digits-w4")                     # doctest: +SKIP
    >>> cm2 = fxquant.load("out/digits-w4")           # doctest: +SKIP
"""
from __future__ import annotations

import copy
import inspect
import os
from pathlib import Path
from typing import Any

import torch
import torch.fx as fx
from torch import nn
from torch.utils import _pytree as pytree

from . import ir
from . import artifact_schema as S
from .artifact_check import abstract_run, self_test
from .artifact_files import (FORMAT, TENSOR_FILES, load_tensors, pack_codes, plain, sha256_file, unpack_codes,
                             unpin)
from .artifact_manifest import FORMAT_VERSION, check_graph_data, check_header, read_manifest
from .artifact_modules import build_module, check_consistency, module_attrs, module_buffers
from .artifact_ops import resolve_target
from .artifact_parts import part_dir, part_names
from .artifact_save import save
from .errors import ArtifactError
from .input_spec import InputSpec
from .runtime import CompiledModule, CompiledSubmodules, tensor_bytes

__all__ = ["FORMAT", "FORMAT_VERSION", "load", "save", "pack_codes", "unpack_codes"]


def _restore_meta(node: fx.Node, m: dict[str, Any]) -> None:
    node.meta[ir.MODULE], node.meta[ir.MODULE_TYPE] = m["module"], m["module_type"]
    node.meta[ir.SOURCE], node.meta[ir.PROVENANCE] = m["source"], m["provenance"]
    if m["shape"] is not None:
        node.meta[ir.SHAPE] = m["shape"]
    if m["dtype"]:
        node.meta[ir.DTYPE] = m["dtype"]
    if m["decision"]:
        node.meta[ir.DECISION] = ir.QuantDecision(**m["decision"])
    if m["quant_stats"]:
        node.meta[ir.QUANT_STATS] = m["quant_stats"]


# -------------------------------------------------------------------------------------------- load
def _check_files(directory: Path, files: dict) -> None:
    for rel, digest in files.items():
        if rel in TENSOR_FILES:
            continue  # hashed while it is read
        if sha256_file(directory, rel) != digest:
            raise ArtifactError(
                f"{directory}/{rel} does not match its checksum in manifest.json: the file is "
                f"corrupted or was modified; re-save the artifact"
            )


def _build_modules(m: dict, tensors: dict[str, torch.Tensor]) -> tuple[nn.Module, set[str]]:
    root, owned = nn.Module(), set()
    for name, spec in m["modules"].items():
        where = f"modules.{name}"
        cls = spec["class"]
        attrs = module_attrs(cls, spec["attrs"], f"{where}.attrs")
        refs = module_buffers(cls, spec["buffers"], f"{where}.buffers")
        bufs = {}
        for key, ref in refs.items():
            if ref is not None and ref not in tensors:
                raise S.fail(f"{where}.buffers.{key}", f"names tensor {ref[:80]!r}, which weights.bin lacks")
            value = None if ref is None else tensors[ref]
            bufs[key] = value if key == "codes" else plain(value)
            owned.add(ref)
        code_spec = m["tensors"].get(refs.get("codes") or "", {})
        check_consistency(
            cls, attrs, bufs, where, code_spec.get("bits") if isinstance(code_spec, dict) else None
        )
        root.add_module(name, build_module(cls, attrs, bufs))
    return root, owned


def _set_tensor(root: nn.Module, dotted: str, value: torch.Tensor, modules: dict) -> None:
    *path, attr = dotted.split(".")
    if (path or [attr])[0] in modules:
        raise S.fail(f"tensors.{dotted}", "a graph constant cannot live inside a lowered op")
    owner = root
    try:
        for part in path:
            if part not in owner._modules:
                owner.add_module(part, nn.Module())
            owner = owner._modules[part]
        owner.register_buffer(attr, value)
    except (KeyError, TypeError, AttributeError) as exc:
        raise S.fail(f"tensors.{dotted}", f"cannot be attached ({exc})") from None


def _build_graph(m: dict, root: nn.Module, constants: set[str]) -> tuple[fx.GraphModule, dict[str, Any]]:
    """The GraphModule, and each node's output shape as recorded at save time (for the abstract run)."""
    graph = fx.Graph()
    nodes: dict[str, fx.Node] = {}
    shapes: dict[str, Any] = {}
    entries = m["graph"]["nodes"]
    placeholders = []
    for i, entry in enumerate(entries):
        where = f"graph.nodes[{i}]"
        S.want_dict(entry, where, required=("name", "op", "target", "args", "kwargs", "meta", "out_shape"))
        name = S.ident(entry["name"], f"{where}.name")
        op = S.want_enum(
            entry["op"], ("placeholder", "get_attr", "call_function", "call_module", "output"), f"{where}.op"
        )
        if name in nodes:
            raise S.fail(f"{where}.name", f"{name!r} is defined twice")

        def lookup(ref: str, where=where) -> fx.Node:
            if ref not in nodes:
                raise S.fail(where, f"refers to node {ref!r} before defining it")
            return nodes[ref]

        args = S.decode_arg(entry["args"], f"{where}.args", lookup)
        kwargs = {
            S.ident(k, f"{where}.kwargs key"): S.decode_arg(v, f"{where}.kwargs.{k}", lookup)
            for k, v in S.want_dict(entry["kwargs"], f"{where}.kwargs", free_keys=True).items()
        }
        if not isinstance(args, tuple):
            raise S.fail(f"{where}.args", "node arguments are a tuple")
        if op == "output":
            if i != len(entries) - 1 or len(args) != 1 or kwargs:
                raise S.fail(where, "the output node comes last and takes one value")
            graph.output(args[0])
            break
        target = entry["target"]
        if op != "call_function" and not isinstance(target, str):
            raise S.fail(f"{where}.target", f"a {op} target is a name, got {type(target).__name__}")
        if op == "call_function":
            target = resolve_target(target, f"{where}.target")
        elif op == "placeholder":
            S.ident(target, f"{where}.target")
            if len(args) > 1 or kwargs or (args and args[0] is not None):
                raise S.fail(where, "a placeholder takes no arguments")
            placeholders.append(target)
        elif op == "get_attr" and (target not in constants or args or kwargs):
            raise S.fail(f"{where}.target", f"{str(target)[:80]!r} is not a stored graph constant")
        elif op == "call_module" and target not in m["modules"]:
            raise S.fail(f"{where}.target", f"{str(target)[:80]!r} is not a lowered op of this artifact")
        node = graph.create_node(op, target, args, kwargs, name=name)
        _restore_meta(node, S.node_meta(entry["meta"], f"{where}.meta"))
        out_shape = entry["out_shape"]
        shapes[node.name] = None if out_shape is None else list(S.shape(out_shape, f"{where}.out_shape", 16))
        nodes[name] = node
    else:
        raise S.fail("graph.nodes", "has no output node")
    _pytree_codegen(graph, m["graph"]["codegen"], placeholders)
    return fx.GraphModule(root, graph), shapes


def _pytree_codegen(graph: fx.Graph, info: Any, placeholders: list[str]) -> None:
    if info is None:
        return
    from torch.fx.graph import _PyTreeCodeGen, _PyTreeInfo

    S.want_dict(info, "graph.codegen", required=("orig_args", "in_spec", "out_spec"))
    orig = [
        S.ident(a, "graph.codegen.orig_args")
        for a in S.want_list(info["orig_args"], "graph.codegen.orig_args")
    ]
    specs = []
    for key in ("in_spec", "out_spec"):
        text = S.want_text(info[key], f"graph.codegen.{key}", 1_000_000)
        try:
            specs.append(pytree.treespec_loads(text))
        except Exception as exc:
            missing = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
            raise ArtifactError(
                f"manifest.json graph.codegen.{key} cannot be read ({missing}). If it names a type "
                f"from another library (e.g. a transformers ModelOutput), import that library "
                f"before fxquant.load so that it registers the type with torch's pytree; "
                f"otherwise the artifact is tampered"
            ) from None
    in_spec, out_spec = specs
    if in_spec.num_leaves != len(placeholders):
        raise S.fail(
            "graph.codegen.in_spec", f"has {in_spec.num_leaves} leaves for {len(placeholders)} inputs"
        )
    graph._codegen = _PyTreeCodeGen(_PyTreeInfo(orig, in_spec, out_spec))


def _input_spec(m: dict, gm: fx.GraphModule) -> tuple[InputSpec, list[dict]]:
    items = S.input_specs(m["inputs"], "inputs")
    names = [n.target for n in gm.graph.nodes if n.op == "placeholder"]
    if [it["name"] for it in items] != names:
        raise S.fail(
            "inputs", f"names {[it['name'] for it in items][:8]} do not match the graph inputs {names[:8]}"
        )
    for i, it in enumerate(items):
        if it["kind"] == "tensor":
            ex = S.shape(m["inputs"][i].get("example"), f"inputs[{i}].example", 16)
            if len(ex) != len(it["shape"]) or any(w is not None and w != d for w, d in zip(it["shape"], ex)):
                raise S.fail(f"inputs[{i}].example", f"{list(ex)} does not fit the shape {list(it['shape'])}")
            it["example"] = ex
    spec = InputSpec(
        [{k: v for k, v in it.items() if k != "example"} for it in items], getattr(gm, "_in_spec", None)
    )
    return spec, items


def _selftest_data(m: dict, tensors: dict[str, torch.Tensor]) -> tuple[list, list] | None:
    st = m["selftest"]
    if st is None:
        return None
    S.want_dict(st, "selftest", required=("inputs", "outputs"))
    out = []
    for key in ("inputs", "outputs"):
        names = S.want_list(st[key], f"selftest.{key}", 4096)
        if not all(isinstance(n, str) and n in tensors for n in names):
            raise S.fail(f"selftest.{key}", "names tensors weights.bin lacks")
        out.append([plain(tensors[n]) for n in names])
    return out[0], out[1]


def load(
    directory: str | os.PathLike,
    target: str | None = None,
    model: nn.Module | None = None,
    check: bool = True,
):
    """Load an artifact written by `save`; kernels are rendered and built (or fetched from the cache) here.

    target: "native" (default for native artifacts), "avx512", "avx2", "portable" or "reference".
    model: for an artifact saved from compile_lowbit(..., submodules=...), the float model whose
    submodules the compiled parts replace. check=False skips the abstract run and the self-test
    (faster; only for artifacts you wrote yourself: the schema checks still run).
    """
    from .codegen.threadpool import pool_owns_threads

    directory = Path(directory)
    manifest = read_manifest(directory)
    if manifest.get("kind") == "submodules":
        return _load_parts(directory, manifest, target, model, check)
    with pool_owns_threads():   # torch's unpacking / packing ops on one thread: no OpenMP barriers to wait at
        return _load_module(directory, manifest, target, check)


def _load_module(directory: Path, manifest: dict, target: str | None, check: bool):
    if target is not None:
        S.want_enum(target, S.target_names(), "load(target=...)")
    check_header(manifest, directory)
    check_graph_data(manifest)
    _check_files(directory, manifest["files"])
    tensors = load_tensors(directory, manifest["tensors"], manifest["files"])
    root, owned = _build_modules(manifest, tensors)
    selftest = _selftest_data(manifest, tensors)
    skip = owned | set(manifest["selftest"]["inputs"] + manifest["selftest"]["outputs"] if selftest else ())
    constants = {name for name in tensors if name not in skip}
    for name in constants:
        _set_tensor(root, name, plain(tensors[name]), manifest["modules"])
    try:
        gm, shapes = _build_graph(manifest, root, constants)
        ir.verify(gm)
    except ArtifactError:
        raise
    except Exception as exc:
        raise ArtifactError(
            f"the graph in {directory}/manifest.json is invalid ({type(exc).__name__}: "
            f"{str(exc)[:300]}): tampered artifact"
        ) from None
    spec, items = _input_spec(manifest, gm)
    if check:
        abstract_run(gm, items, expected=shapes)
    sig = _signature(manifest["signature"])
    saved_target = manifest["target"]
    target = target or (saved_target if saved_target in ("reference", "portable") else "native")
    config = dict(manifest["config"], target=target)
    cm = CompiledModule(
        gm,
        pipeline=manifest["pipeline"],
        config=config,
        signature=sig,
        name=manifest["name"],
        fp32_bytes=manifest["fp32_bytes"],
        input_spec=spec,
    )
    if manifest["modules"] and target != "reference":
        _attach(gm, target, bool(config.get("fallback")))
    unpin(gm, tensors)
    if check and selftest is not None:
        self_test(cm, *selftest)
    from .memory import trim_heap

    tensors = selftest = None  # noqa: F841 - drop the loader's unpacked codes, then give the freed pages back
    trim_heap()
    return cm


def _load_parts(
    directory: Path, manifest: dict, target: str | None, model: nn.Module | None, check: bool
) -> CompiledSubmodules:
    """A copy of `model` whose compiled submodules are the artifact's parts (fxquant/artifact_parts.py)."""
    names = part_names(directory, manifest, model)
    result = copy.deepcopy(model)
    compiled = {}
    for name in names:
        cm = load(part_dir(directory, name), target=target, check=check)
        parent, _, attr = name.rpartition(".")
        setattr(result.get_submodule(parent) if parent else result, attr, cm)
        compiled[name] = cm
    return CompiledSubmodules(result, compiled, fp32_bytes=tensor_bytes(model))


def _signature(params: list[str] | None) -> inspect.Signature | None:
    if not params:
        return None
    if len(set(params)) != len(params):
        raise S.fail("signature", "repeats a parameter name")
    return inspect.Signature([inspect.Parameter(p, inspect.Parameter.POSITIONAL_OR_KEYWORD) for p in params])


def _attach(gm: fx.GraphModule, target: str, fallback: bool) -> None:
    from .codegen import UnsupportedOp, attach_kernels

    try:
        attach_kernels(gm, target=target, fallback=fallback)
    except UnsupportedOp as exc:
        raise ArtifactError(
            f"this artifact cannot run on target {target!r} ({exc}); load it with "
            f"target='portable' or target='reference'"
        ) from None
