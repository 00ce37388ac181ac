"""Former home of the Core ML reference executor, kept so that existing imports keep working.

The numpy executor of ML programs is now the subpackage runtime/mil (`MILProgram`, which knows nothing about
backends); the two Core ML backends live in runtime/coreml_backend.py and are chosen through the registry in
runtime/backends.py. New code imports from those modules.
"""

from __future__ import annotations

from .coreml_backend import CoreMLBackend, CoreMLReferenceBackend
from .mil import MODEL_FILE, load_program
from .mil import MILProgram as CoreMLReferenceProgram

__all__ = ["MODEL_FILE", "CoreMLBackend", "CoreMLReferenceBackend", "CoreMLReferenceProgram", "load_program"]
