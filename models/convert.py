"""Load a teacher (preset or local diffusers folder) and convert its transformer to EDiT / MM-EDiT."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from diffusers import DiffusionPipeline

from ..runtime.atomic import atomic_output_dir, check_output_free
from ..runtime.errors import UserError
from .edit_attention import EDiTConfig
from .families import ARCHS, SUPPORTED_PIPELINES, pipeline_family
from .presets import PRESETS, shipped_shapes_folder

logger = logging.getLogger(__name__)

__all__ = ["ARCHS", "SUPPORTED_PIPELINES", "convert", "convert_pipeline", "load_pipeline", "pipeline_family"]


def load_pipeline(src: str | Path, skip: tuple[str, ...] = ()) -> DiffusionPipeline:
    """A preset name or a local diffusers pipeline folder -> the pipeline (fp32, eval mode). A folder's components
    named in `skip` are not loaded (None in the pipeline: the exporter streams a too-large text encoder itself)."""
    src = str(src)
    if src in PRESETS:
        return PRESETS[src].build()
    path = Path(src)
    if not path.exists():
        raise UserError(f"{src!r} is neither a preset ({', '.join(PRESETS)}) nor an existing folder")
    index = path / "model_index.json"
    if not index.is_file():
        raise UserError(f"{src} is not a diffusers pipeline folder: model_index.json is missing")
    try:
        class_name = json.loads(index.read_text())["_class_name"]
    except (ValueError, KeyError):
        raise UserError(f"{index} is not a valid diffusers model_index.json") from None
    if class_name not in SUPPORTED_PIPELINES:
        raise UserError(f"{src} holds a {class_name}; expected one of {', '.join(SUPPORTED_PIPELINES)}")
    try:
        return DiffusionPipeline.from_pretrained(path, **dict.fromkeys(skip))
    except (OSError, ValueError) as e:
        raise UserError(f"cannot load the pipeline in {src}: {str(e).splitlines()[0]}") from None


def trained_text_tokens(src: str | Path) -> int | None:
    """The T5 prompt length a pipeline was trained or distilled at (`distill --max-text-tokens`, recorded in its
    edit_mobile.json), or None. SD3's joint attention has no prompt mask, so its padding tokens are attended to and
    the length changes the output: a model trained at 32 tokens must be run and exported at 32, not at diffusers'
    default 256. (PixArt-Σ masks the padding: its length only costs time.)"""
    src = str(src)
    folder = shipped_shapes_folder(src) if src in PRESETS else Path(src)
    if folder is None or not (meta := folder / "edit_mobile.json").is_file():
        return None
    try:
        record = json.loads(meta.read_text())
    except ValueError:
        raise UserError(f"{meta} is not valid JSON") from None
    # a distilled student's own length, else a trained model's, else the length `convert` carried from the teacher
    for entry in (record.get("distilled"), record.get("trained"), record):
        if entry and entry.get("max_text_tokens"):
            return entry["max_text_tokens"]
    return None


def convert_pipeline(pipe: DiffusionPipeline, arch: str, edit: EDiTConfig | None = None) -> DiffusionPipeline:
    """Swap the pipeline's transformer for its EDiT / MM-EDiT conversion (teacher weights copied)."""
    family = ARCHS[arch]  # models/families.py
    teacher_cls, student_cls = family.teacher, family.student
    transformer = pipe.transformer
    if type(transformer) is not teacher_cls:
        raise UserError(
            f"--arch {arch} converts a {teacher_cls.__name__}; this pipeline's transformer is a "
            f"{type(transformer).__name__}" + (" (already converted)" if isinstance(transformer, student_cls) else "")
        )
    student = student_cls.from_teacher(transformer, edit).eval()
    pipe.register_modules(transformer=student)
    logger.info(
        "converted %s -> %s (%d layers)", teacher_cls.__name__, student_cls.__name__, len(student.transformer_blocks)
    )
    return pipe


def convert(
    src: str | Path, arch: str, out: str | Path, edit: EDiTConfig | None = None, overwrite: bool = False
) -> Path:
    """`edit-mobile convert`: write a diffusers pipeline folder whose transformer is EDiT / MM-EDiT."""
    if arch not in ARCHS:
        raise UserError(f"unknown --arch {arch!r}; expected one of {', '.join(ARCHS)}")
    check_output_free(out, overwrite)
    pipe = load_pipeline(src)
    pipe = convert_pipeline(pipe, arch, edit)
    meta = {"source": str(src), "arch": arch, "edit_config": pipe.transformer.edit.to_dict()}
    meta["max_text_tokens"] = trained_text_tokens(src)  # the teacher's: the conversion reads prompts as it did
    with atomic_output_dir(out, overwrite=overwrite) as tmp:
        pipe.save_pretrained(tmp, safe_serialization=True)
        (tmp / "edit_mobile.json").write_text(json.dumps(meta, indent=2))
    return Path(out)
