"""Remake the tiny presets' tokenizer vocabularies (models/assets/tiny_*.json) from the bundled prompt list.

Run once by hand when the prompt list changes: `python scripts/train_tiny_tokenizers.py`. The vocabularies are
shipped rather than trained at preset build time because the BPE trainer breaks frequency ties in a random
order, so two trainings give different (equally valid) tokenizers, and a rebuilt preset must equal an exported one.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from tokenizers import models, trainers
from tokenizers.pre_tokenizers import ByteLevel
from transformers import CLIPTokenizer, T5Tokenizer

from edit_mobile.models.presets import bundled_prompts


def train_t5(vocab_size: int) -> dict:
    backend = T5Tokenizer(extra_ids=0)._tokenizer  # T5's own normalizer / pre-tokenizer pipeline
    backend.model = models.Unigram()
    trainer = trainers.UnigramTrainer(
        vocab_size=vocab_size, special_tokens=["<pad>", "</s>", "<unk>"], unk_token="<unk>", shrinking_factor=0.75
    )
    backend.train_from_iterator(bundled_prompts(), trainer=trainer)
    return {"vocab": json.loads(backend.to_str())["model"]["vocab"]}


def train_clip(vocab_size: int) -> dict:
    backend = CLIPTokenizer()._tokenizer  # CLIP's own normalizer / pre-tokenizer pipeline
    backend.model = models.BPE(end_of_word_suffix="</w>", unk_token="<|endoftext|>")
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|startoftext|>", "<|endoftext|>"],
        initial_alphabet=ByteLevel.alphabet(),
        end_of_word_suffix="</w>",
        show_progress=False,
    )
    backend.train_from_iterator(bundled_prompts(), trainer=trainer)
    model = json.loads(backend.to_str())["model"]
    return {"vocab": model["vocab"], "merges": [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "models" / "assets"))
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    for name, data in (("tiny_t5_unigram.json", train_t5(600)), ("tiny_clip_bpe.json", train_clip(800))):
        (Path(args.out) / name).write_text(json.dumps(data, ensure_ascii=False, indent=0))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
