"""The naming pass of the trace stage: every node named after the module that made it.

TensorRT names each layer after its ONNX node, so these names are what a user reads in trtexec's
layer info and profiles, TREx, Polygraphy and ModelOpt's ``nodes_to_exclude``. The exporter
names nodes by counters (``node_conv2d_35``), but records on each node the module scopes it was
traced in (``pkg.torch.onnx.name_scopes``); this pass turns them into TorchScript-style names,
as CUDA-BEVFusion's files have them: ``/backbone/layer3/layer3.3/conv2/Conv``,
``/backbone/layer3/layer3.3/conv2/input_quantizer/QuantizeLinear``.

Module paths are relative to the camera branch whatever wrapper was traced (``BackboneGraph``,
``VTransformGraph``, ``CastIO``) and whatever layout prefix the checkpoint had: the spelling
``backbone.layer3.3.conv2`` is the same in node names, ``--keep-fp32`` globs, the lint and the
report. Each node keeps that path in ``lean.module``. Initializers keep the state-dict key
names (``backbone.layer3.3.conv2.weight``). Runs after the optimizer, which re-creates nodes.
"""

from __future__ import annotations

import ast

SCOPES = "pkg.torch.onnx.name_scopes"
MODULE = "lean.module"  # node metadata: the module path relative to the camera branch
FP32_NOTE = "lean.fp32"  # node metadata: why the node computes in FP32 (a declared island, lean.widen)
# Metadata kept in the file; the exporter's stack traces (with the machine's paths) are not.
KEPT_METADATA = (SCOPES, "pkg.torch.onnx.class_hierarchy", "namespace", MODULE, FP32_NOTE)


def scope_map(wrapper, branch) -> dict[str, str]:
    """Module paths inside ``wrapper`` -> paths inside ``branch``, for the shallowest submodules of
    ``wrapper`` that are ``branch`` or one of its modules (``branch`` -> '', ``downsample`` ->
    ``vtransform.downsample``)."""
    ours = {}
    for name, module in branch.named_modules(remove_duplicate=False):
        ours.setdefault(id(module), name)
    found: dict[str, str] = {}
    for name, module in wrapper.named_modules(remove_duplicate=False):
        inside = any(p == "" or name.startswith(p + ".") for p in found)
        if id(module) in ours and not inside:
            found[name] = ours[id(module)]
    return found


def branch_path(path: str, scopes: dict[str, str]) -> str:
    """A wrapper's module path as a path inside the camera branch ('' when it is outside it)."""
    best = max((p for p in scopes if p == "" or path == p or path.startswith(p + ".")), key=len, default=None)
    if best is None:
        return ""
    rest = path[len(best):].lstrip(".")
    return ".".join(x for x in (scopes[best], rest) if x)


def scoped_name(module_path: str, op_type: str) -> str:
    """``backbone.layer3.3.conv2`` + ``Conv`` -> ``/backbone/layer3/layer3.3/conv2/Conv``: an index
    into a Sequential or ModuleList is spelled with its list's name, as TorchScript did."""
    parts = module_path.split(".") if module_path else []
    out = []
    for i, part in enumerate(parts):
        out.append(f"{parts[i - 1]}.{part}" if part.isdigit() and i else part)
    return "/" + "/".join([*out, op_type])


def unique(name: str, taken: set[str]) -> str:
    """``name``, or ``name_1``, ``name_2``, ... the first not in ``taken`` (which it joins)."""
    out, i = name, 0
    while out in taken:
        i += 1
        out = f"{name}_{i}"
    taken.add(out)
    return out


def module_of(node) -> str:
    """The module path an (onnx_ir) node was traced in, from the exporter's scopes ('' if none)."""
    scopes = node.metadata_props.get(SCOPES)
    if not scopes:
        return ""
    names = ast.literal_eval(scopes)  # ['', 'branch', 'branch.backbone', ..., '<fx node>']
    return names[-2] if len(names) >= 2 else ""


def name_nodes(model, scopes: dict[str, str]) -> None:
    """Name every node of an ``onnx_ir.Model`` by its module (in graph order: deterministic), strip
    the wrapper from initializer names, and keep only the lasting metadata (in place)."""
    taken: set[str] = set()
    for node in model.graph:
        path = branch_path(module_of(node), scopes)
        for key in [k for k in node.metadata_props if k not in KEPT_METADATA]:
            del node.metadata_props[key]
        node.metadata_props[MODULE] = path
        node.name = unique(scoped_name(path, node.op_type), taken)
    for value in list(model.graph.initializers.values()):
        new = branch_path(value.name, scopes) or _folded_name(value)
        if new and new != value.name and new not in model.graph.initializers:
            value.name = new


def _folded_name(value) -> str | None:
    """A name for a constant the optimizer folded (``val_24``): a Linear's transposed weight is
    ``<module>.weight.T``; another constant read in one module is ``<module>.<its name>``."""
    readers = {u.node.metadata_props.get(MODULE, "") for u in value.uses()}
    if len(readers) != 1 or not next(iter(readers)):
        return None
    module = readers.pop()
    if all(u.node.op_type in ("MatMul", "Gemm") and u.idx == 1 for u in value.uses()):
        return f"{module}.weight.T"
    return f"{module}.{value.name}"
