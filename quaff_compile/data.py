"""Training text: loading, held-out split, tokenization, packing and batching.

The default corpus is Ambrose Bierce's The Devil's Dictionary as shipped by the
Debian package `dict-devil` in dictd format.
"""

from __future__ import annotations

import gzip
import json
import logging
import random
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from itertools import chain
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

DEVIL_DICT = Path("/usr/share/dictd/devil.dict.dz")
DEVIL_INDEX = Path("/usr/share/dictd/devil.index")

# dictd writes offsets and lengths as base-64 numbers, most significant digit first.
_DICTD_DIGITS = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
_DICTD_DIGIT_VALUES = {digit: value for value, digit in enumerate(_DICTD_DIGITS)}

# dictd stores its own metadata (database name, URL, notice) as entries with these headwords.
_DICTD_METADATA_PREFIXES = ("00database", "00-database")

# An entry opens with its upper-case heading, then a part-of-speech label:
# "ABASEMENT, n.  A decent ...", "BABE or BABY, n.", "TZETZE (or TSETSE) FLY, n.",
# "IMPOSTOR n.", "INFERIAE,n.", "WHITE, adj. and n.".
_HEADING_WITH_LABEL = re.compile(
    r"(?P<head>[A-Z][^a-z\n]*?(?: or [^a-z\n]+?| \(or [^a-z\n]+?\)[^a-z\n]*?)?)"
    r"(?:,\s*|\s+)(?=(?:[a-z]+\.)+\s)"
)
# Some headings have no label and end in a period or question mark:
# "ABRACADABRA.", "CUI BONO?", "LL.D.", "R.I.P.".
_HEADING_ALONE = re.compile(r"(?P<head>[A-Z][^a-z\n]*?)(?P<end>[.?])(?=\s)")
# An upper-case word of two or more letters that is not part of an abbreviation such as "LL.D.".
_UPPER_CASE_WORD = re.compile(r"\b[A-Z][A-Z'\-]*[A-Z]\b(?!\.)")


@dataclass(frozen=True)
class Example:
    """One training text: a prompt and its response, or plain text with prompt ""."""

    prompt: str
    response: str


def _decode_dictd_number(digits: str) -> int:
    value = 0
    for digit in digits:
        value = value * 64 + _DICTD_DIGIT_VALUES[digit]
    return value


def _read_dictd_index(index_path: Path) -> list[tuple[str, int, int]]:
    """Parse dictd index lines `headword<TAB>offset<TAB>length` into (headword, offset, length)."""
    entries = []
    lines = index_path.read_text(encoding="utf-8").splitlines()
    for line_number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        fields = line.split("\t")
        if len(fields) != 3:
            raise ValueError(
                f"{index_path}:{line_number}: expected 'headword<TAB>offset<TAB>length', got {line!r}; "
                "reinstall dict-devil or pass a valid dictd index"
            )
        headword, offset, length = fields
        try:
            entries.append((headword, _decode_dictd_number(offset), _decode_dictd_number(length)))
        except KeyError as error:
            raise ValueError(
                f"{index_path}:{line_number}: invalid dictd base-64 digit {error.args[0]!r} in {line!r}; "
                "reinstall dict-devil or pass a valid dictd index"
            ) from None
    return entries


def _title_case(heading: str) -> str:
    """Turn "KING'S EVIL" into "King's Evil", keeping single letters and abbreviations like "LL.D."."""
    return _UPPER_CASE_WORD.sub(lambda match: match.group().capitalize(), heading)


def _parse_devil_entry(index_headword: str, text: str) -> Example:
    """Split an entry into its heading and definition, with whitespace collapsed."""
    match = _HEADING_WITH_LABEL.match(text)
    if match:
        heading = match["head"]
    else:
        match = _HEADING_ALONE.match(text)
        if match:
            heading = match["head"]
            # Keep the final period of an abbreviation ("R.I.P."), drop it after a plain word.
            if "." in heading:
                heading += match["end"]
    if match:
        definition = text[match.end() :]
    else:
        # Letter entries ("I is the first letter ...") open with a sentence, so keep all of it.
        heading = index_headword
        definition = text
    headword = _title_case(heading.strip())
    headword = headword[:1].upper() + headword[1:]
    # An abbreviation ("R.I.P.") already ends the sentence with its own period.
    prompt = f"Define the word {headword}" if headword.endswith(".") else f"Define the word {headword}."
    return Example(prompt=prompt, response=" ".join(definition.split()))


def load_devil_examples(dict_path: Path = DEVIL_DICT, index_path: Path = DEVIL_INDEX) -> list[Example]:
    """Load The Devil's Dictionary as "Define the word X." prompts with their definitions.

    Index lines that point at the same text (aliases such as "babe" and "baby", and
    entries printed twice in the source) give one example.
    """
    dict_path, index_path = Path(dict_path), Path(index_path)
    for path in (dict_path, index_path):
        if not path.is_file():
            raise FileNotFoundError(
                f"The Devil's Dictionary file {path} was not found; install it with "
                "`apt-get install dict-devil` or pass a training file instead"
            )

    # A .dict.dz file is dictzip, which is gzip with an index of chunks, so gzip can read it whole.
    with gzip.open(dict_path, "rb") as file:
        data = file.read()

    examples = []
    seen_texts = set()
    for headword, offset, length in _read_dictd_index(index_path):
        if headword.startswith(_DICTD_METADATA_PREFIXES):
            continue
        if offset + length > len(data):
            raise ValueError(
                f"{index_path}: entry {headword!r} ends at byte {offset + length}, past the end of "
                f"{dict_path} ({len(data)} bytes); the two files do not match, reinstall dict-devil"
            )
        text = data[offset : offset + length].decode("utf-8").strip()
        if not text or text in seen_texts:
            continue
        seen_texts.add(text)
        example = _parse_devil_entry(headword, text)
        if not example.response:
            logger.debug("Skipping entry %r, which has no definition text", headword)
            continue
        examples.append(example)

    if not examples:
        raise ValueError(f"{dict_path} contains no dictionary entries; reinstall dict-devil")
    logger.debug("Loaded %d entries from %s", len(examples), dict_path)
    return examples


def _parse_json_line(path: Path, line_number: int, line: str) -> Example:
    expected = "expected one JSON object per line with 'prompt' and 'response' strings, or a 'text' string"
    try:
        record = json.loads(line)
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}:{line_number}: invalid JSON ({error.msg}); {expected}") from None
    if not isinstance(record, dict):
        raise ValueError(f"{path}:{line_number}: got a JSON {type(record).__name__}; {expected}")

    if "prompt" in record and "response" in record:
        prompt, response = record["prompt"], record["response"]
    elif "text" in record:
        prompt, response = "", record["text"]
    else:
        raise ValueError(f"{path}:{line_number}: got keys {sorted(record)}; {expected}")

    if not isinstance(prompt, str) or not isinstance(response, str):
        raise ValueError(
            f"{path}:{line_number}: got prompt {type(prompt).__name__} and response/text "
            f"{type(response).__name__}; {expected}"
        )
    if not response.strip():
        raise ValueError(f"{path}:{line_number}: the response or text is empty; remove the line or fill it in")
    return Example(prompt=prompt, response=response)


def load_examples(path: str | Path | None) -> list[Example]:
    """Load training examples from a file, or The Devil's Dictionary when `path` is None.

    A `.jsonl` file gives one example per line. Any other file is read as UTF-8 plain
    text and split into paragraphs on blank lines, each with an empty prompt.
    """
    if path is None:
        return load_devil_examples()

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Training file {path} was not found; pass an existing .jsonl or text file")
    text = path.read_text(encoding="utf-8")

    if path.suffix == ".jsonl":
        examples = [
            _parse_json_line(path, line_number, line)
            for line_number, line in enumerate(text.splitlines(), start=1)
            if line.strip()
        ]
    else:
        paragraphs = (paragraph.strip() for paragraph in re.split(r"\n[ \t\r\f\v]*\n", text))
        examples = [Example(prompt="", response=paragraph) for paragraph in paragraphs if paragraph]

    if not examples:
        raise ValueError(f"{path} contains no examples; add text to it or pass another file")
    return examples


def split_held_out(
    examples: Sequence[Example], fraction: float = 0.1, seed: int = 0
) -> tuple[list[Example], list[Example]]:
    """Shuffle with `random.Random(seed)` and return (train, held_out).

    The held-out part has round(len * fraction) examples, but at least one, and the
    training part keeps at least one.
    """
    if not 0 < fraction < 1:
        raise ValueError(f"Held-out fraction must be between 0 and 1 (exclusive), got {fraction}")
    if len(examples) < 2:
        raise ValueError(
            f"Splitting off held-out examples needs at least 2 examples, got {len(examples)}; add more text"
        )

    shuffled = list(examples)
    random.Random(seed).shuffle(shuffled)
    held_out_count = min(len(shuffled) - 1, max(1, round(len(shuffled) * fraction)))
    return shuffled[held_out_count:], shuffled[:held_out_count]


def tokenize_examples(tokenizer, examples: Sequence[Example]) -> list[list[int]]:
    """Tokenize each example into token ids ending with the tokenizer's EOS token, if it has one.

    An example with a prompt is formatted as a user and assistant exchange with the
    tokenizer's chat template. A tokenizer without a chat template gets the response
    alone, so the prompt is dropped. No special tokens are added besides the EOS.
    """
    has_chat_template = bool(getattr(tokenizer, "chat_template", None))
    eos_token_id = getattr(tokenizer, "eos_token_id", None)

    token_lists = []
    for example in examples:
        if example.prompt and has_chat_template:
            messages = [
                {"role": "user", "content": example.prompt},
                {"role": "assistant", "content": example.response},
            ]
            text = tokenizer.apply_chat_template(messages, tokenize=False)
            # Templates such as SmolLM2's end each turn with the EOS token and a newline
            # ("<|im_end|>\n"). Dropping the newline lets the sequence end on that EOS token
            # instead of getting a second one.
            text = text.rstrip()
        else:
            text = example.response
        token_ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
        if eos_token_id is not None and (not token_ids or token_ids[-1] != eos_token_id):
            token_ids.append(eos_token_id)
        token_lists.append(token_ids)
    return token_lists


def pack_sequences(token_lists: Sequence[Sequence[int]], seq_len: int) -> torch.Tensor:
    """Concatenate token lists and cut them into int64 rows of `seq_len`, dropping the ragged tail."""
    if seq_len < 1:
        raise ValueError(f"seq_len must be a positive number of tokens, got {seq_len}")
    tokens = list(chain.from_iterable(token_lists))
    row_count = len(tokens) // seq_len
    if row_count == 0:
        raise ValueError(
            f"Packing needs at least seq_len={seq_len} tokens for one row, but the examples have "
            f"{len(tokens)} tokens; lower seq_len or add more text"
        )
    return torch.tensor(tokens[: row_count * seq_len], dtype=torch.int64).view(row_count, seq_len)


def batch_iterator(
    rows: torch.Tensor, batch_size: int, steps: int, seed: int = 0
) -> Iterator[dict[str, torch.Tensor]]:
    """Return an iterator of `steps` batches of `batch_size` distinct rows as `input_ids` and `labels`.

    Rows are drawn in a random order from a `torch.Generator` seeded with `seed`. When
    fewer than `batch_size` rows are left in the epoch, they are skipped and the rows are
    reshuffled. `labels` is a copy of `input_ids`, because the model shifts it itself.
    """
    if rows.dim() != 2:
        raise ValueError(f"rows must be a 2-D tensor [rows, seq_len], got shape {tuple(rows.shape)}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if batch_size > rows.shape[0]:
        raise ValueError(
            f"batch_size={batch_size} exceeds the {rows.shape[0]} packed rows available; "
            "lower batch_size or seq_len, or add more text"
        )
    if steps < 0:
        raise ValueError(f"steps must be zero or positive, got {steps}")
    # The checks above run at the call, the drawing below only once iteration starts.
    return _draw_batches(rows, batch_size, steps, seed)


def _draw_batches(rows: torch.Tensor, batch_size: int, steps: int, seed: int) -> Iterator[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(rows.shape[0], generator=generator)
    position = 0
    for _ in range(steps):
        if position + batch_size > rows.shape[0]:
            order = torch.randperm(rows.shape[0], generator=generator)
            position = 0
        indices = order[position : position + batch_size].to(rows.device)
        position += batch_size
        input_ids = rows[indices]
        yield {"input_ids": input_ids, "labels": input_ids.clone()}
