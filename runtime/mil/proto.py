"""coremltools' generated protobuf modules (Model_pb2, MIL_pb2), loaded without importing coremltools itself.

Importing `coremltools` imports torch. Its `proto` folder, however, is a set of plain generated modules that import
each other relatively (`from . import FeatureTypes_pb2`), so they can be loaded as a package of their own: under a
private name (`_edit_mobile_coreml_proto`) registered in `sys.modules`. Where coremltools is already imported, its
own modules are used instead (the protobuf descriptor pool must hold one copy of each message type).
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
import types

from ..errors import UserError

PROTO_ALIAS = "_edit_mobile_coreml_proto"


def proto_modules() -> tuple[types.ModuleType, types.ModuleType]:
    """(Model_pb2, MIL_pb2) of the installed coremltools."""
    if "coremltools.proto.Model_pb2" in sys.modules:  # coremltools already imported: share its descriptors
        return sys.modules["coremltools.proto.Model_pb2"], sys.modules["coremltools.proto.MIL_pb2"]
    if PROTO_ALIAS + ".Model_pb2" not in sys.modules:
        spec = importlib.util.find_spec("coremltools")
        if spec is None or not spec.submodule_search_locations:
            raise UserError("reading Core ML packages needs coremltools (pip install 'edit-mobile[coreml]')")
        package = types.ModuleType(PROTO_ALIAS)
        package.__path__ = [os.path.join(spec.submodule_search_locations[0], "proto")]
        sys.modules[PROTO_ALIAS] = package
    return importlib.import_module(PROTO_ALIAS + ".Model_pb2"), importlib.import_module(PROTO_ALIAS + ".MIL_pb2")
