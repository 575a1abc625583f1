"""The part of ONNX's protobuf schema that qwen-edge reads, built at run time so loading an artifact needs no `onnx`.

`import onnx` costs ~0.8 s on some machines (most of it ml_dtypes' extension), more than half of what onnxruntime
itself takes to load a 0.5B int4 graph. Load only reads the graph: its inputs and outputs, nodes (op type, inputs,
integer and graph attributes), initializers (name, type, dims, where their bytes are) and opsets. The messages
below declare those fields with ONNX's field numbers (onnx/onnx.proto, proto2); every other field is kept as an
unknown field, so a parsed model serializes back with everything it had (onnxruntime reads the bytes, not these
classes). The package name differs from ONNX's (`onnx`), so the two schemas never meet in one descriptor pool."""

from __future__ import annotations

from functools import lru_cache
from typing import Any

PACKAGE = "qwen_edge_onnx_subset"

# (message, [(field name, number, label, type, message type or None)]); label "r" repeated, "o" optional.
# type: a protobuf scalar name or "m" (a message of this file).
_SCHEMA: tuple[tuple[str, tuple[tuple[str, int, str, str, str | None], ...]], ...] = (
    ("StringStringEntryProto", (("key", 1, "o", "string", None), ("value", 2, "o", "string", None))),
    ("OperatorSetIdProto", (("domain", 1, "o", "string", None), ("version", 2, "o", "int64", None))),
    ("TensorProto", (("dims", 1, "r", "int64", None), ("data_type", 2, "o", "int32", None),
                     ("name", 8, "o", "string", None), ("raw_data", 9, "o", "bytes", None),
                     ("external_data", 13, "r", "m", "StringStringEntryProto"),
                     ("data_location", 14, "o", "int32", None))),
    ("Dimension", (("dim_value", 1, "o", "int64", None), ("dim_param", 2, "o", "string", None))),
    ("TensorShapeProto", (("dim", 1, "r", "m", "Dimension"),)),
    ("TensorTypeProto", (("elem_type", 1, "o", "int32", None), ("shape", 2, "o", "m", "TensorShapeProto"))),
    ("TypeProto", (("tensor_type", 1, "o", "m", "TensorTypeProto"),)),
    ("ValueInfoProto", (("name", 1, "o", "string", None), ("type", 2, "o", "m", "TypeProto"))),
    ("AttributeProto", (("name", 1, "o", "string", None), ("f", 2, "o", "float", None), ("i", 3, "o", "int64", None),
                        ("s", 4, "o", "bytes", None), ("g", 6, "o", "m", "GraphProto"),
                        ("ints", 8, "r", "int64", None), ("type", 20, "o", "int32", None))),
    ("NodeProto", (("input", 1, "r", "string", None), ("output", 2, "r", "string", None),
                   ("name", 3, "o", "string", None), ("op_type", 4, "o", "string", None),
                   ("attribute", 5, "r", "m", "AttributeProto"), ("domain", 7, "o", "string", None))),
    ("GraphProto", (("node", 1, "r", "m", "NodeProto"), ("name", 2, "o", "string", None),
                    ("initializer", 5, "r", "m", "TensorProto"), ("input", 11, "r", "m", "ValueInfoProto"),
                    ("output", 12, "r", "m", "ValueInfoProto"))),
    ("ModelProto", (("ir_version", 1, "o", "int64", None), ("producer_name", 2, "o", "string", None),
                    ("producer_version", 3, "o", "string", None), ("graph", 7, "o", "m", "GraphProto"),
                    ("opset_import", 8, "r", "m", "OperatorSetIdProto"))),
)


@lru_cache(maxsize=None)
def message_classes() -> dict[str, Any]:
    """{message name: class} of the subset, built once per process (a private descriptor pool)."""
    from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

    F = descriptor_pb2.FieldDescriptorProto
    fdp = descriptor_pb2.FileDescriptorProto(name=f"{PACKAGE}.proto", package=PACKAGE, syntax="proto2")
    for msg_name, fields in _SCHEMA:
        msg = fdp.message_type.add(name=msg_name)
        for name, number, label, kind, ref in fields:
            f = msg.field.add(name=name, number=number,
                              label=F.LABEL_REPEATED if label == "r" else F.LABEL_OPTIONAL)
            if kind == "m":
                f.type, f.type_name = F.TYPE_MESSAGE, f".{PACKAGE}.{ref}"
            else:
                f.type = getattr(F, "TYPE_" + kind.upper())
    pool = descriptor_pool.DescriptorPool()
    pool.Add(fdp)
    return {name: message_factory.GetMessageClass(pool.FindMessageTypeByName(f"{PACKAGE}.{name}"))
            for name, _ in _SCHEMA}


def parse_model(data: bytes) -> Any:
    """A ModelProto of the subset from serialized bytes; google.protobuf's DecodeError when they do not parse."""
    m = message_classes()["ModelProto"]()
    m.ParseFromString(data)
    return m
