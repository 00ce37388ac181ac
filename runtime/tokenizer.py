"""Prompt tokenization with the `tokenizers` library from the package's own tokenizer.json.

`encode` gives what transformers gives for `tokenizer(prompt, padding="max_length", max_length=T,
truncation=True)`: the tokenizer.json post-processor's special tokens (T5 `</s>`, CLIP start / end) are kept,
over-long prompts are cut (keeping the special tokens) with a warning naming the removed text as diffusers logs it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import UserError

logger = logging.getLogger(__name__)


@dataclass
class Encoding:
    input_ids: np.ndarray  # int64 (1, max_length)
    attention_mask: np.ndarray  # int64 (1, max_length)
    truncated_text: str | None = None  # what truncation removed, if anything


class PromptTokenizer:
    """A fixed-length tokenizer: `encode(prompt)` -> int64 (1, max_length) ids and attention mask."""

    def __init__(self, path: str | Path, max_length: int, pad_id: int):
        from tokenizers import Tokenizer

        path = Path(path)
        file = path / "tokenizer.json" if path.is_dir() else path
        if not file.is_file():
            raise UserError(f"tokenizer file {file} is missing")
        try:
            self._full = Tokenizer.from_file(str(file))  # no truncation, no padding: to detect what is cut
            self._fixed = Tokenizer.from_file(str(file))
        except Exception as e:  # tokenizers raises a bare Exception on a malformed file
            raise UserError(f"cannot load tokenizer {file}: {e}") from None
        self.path = file
        self.max_length = int(max_length)
        self.pad_id = int(pad_id)
        pad_token = self._fixed.id_to_token(self.pad_id)
        if pad_token is None:
            raise UserError(f"tokenizer {file}: pad id {pad_id} is not in the vocabulary")
        self._full.no_truncation()
        self._full.no_padding()
        # transformers' defaults for truncation=True / padding="max_length": longest_first, right side, stride 0.
        self._fixed.enable_truncation(self.max_length, stride=0, strategy="longest_first", direction="right")
        self._fixed.enable_padding(direction="right", pad_id=self.pad_id, pad_token=pad_token, length=self.max_length)

    def encode(self, prompt: str) -> Encoding:
        enc = self._fixed.encode(prompt, add_special_tokens=True)
        ids = np.asarray(enc.ids, dtype=np.int64)[None]
        mask = np.asarray(enc.attention_mask, dtype=np.int64)[None]
        removed = None
        full = self._full.encode(prompt, add_special_tokens=True).ids
        if len(full) > self.max_length:
            # As diffusers: decode the untruncated ids from max_length - 1 up to (not including) the last token.
            removed = self._full.decode(full[self.max_length - 1 : -1], skip_special_tokens=False)
            suffix = getattr(self._full.model, "end_of_word_suffix", None)  # CLIP's "</w>": a space, as transformers
            if suffix:
                removed = " ".join(removed.replace(suffix, " ").split())
            logger.warning(
                "The following part of your input was truncated because the text encoder can only "
                "handle sequences up to %d tokens: %s",
                self.max_length,
                removed,
            )
        return Encoding(ids, mask, removed)

    __call__ = encode
