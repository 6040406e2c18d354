import gzip
import json

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from tokenizers import Regex, Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from quaff_compile.data import (
    DEVIL_DICT,
    DEVIL_INDEX,
    Example,
    batch_iterator,
    load_devil_examples,
    load_examples,
    pack_sequences,
    split_held_out,
    tokenize_examples,
)

needs_dict_devil = pytest.mark.skipif(
    not (DEVIL_DICT.is_file() and DEVIL_INDEX.is_file()),
    reason="the Debian package dict-devil is not installed",
)

DICTD_DIGITS = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
WORDS = ["<eos>", "[UNK]", "\n", "user", "assistant", ":", "define", "the", "word", "cat", ".", "a", "small", "lion"]
CHAT_TEMPLATE = "{% for message in messages %}{{ message['role'] }}: {{ message['content'] }}<eos>\n{% endfor %}"


def encode_dictd_number(value):
    digits = ""
    while True:
        digits = DICTD_DIGITS[value % 64] + digits
        value //= 64
        if value == 0:
            return digits


def write_dictd(tmp_path, entries):
    """Write (headword, text) pairs as a gzip-compressed dictd database and its index."""
    data = b""
    index_lines = []
    for headword, text in entries:
        encoded = text.encode()
        index_lines.append(f"{headword}\t{encode_dictd_number(len(data))}\t{encode_dictd_number(len(encoded))}")
        data += encoded
    dict_path = tmp_path / "test.dict.dz"
    index_path = tmp_path / "test.index"
    dict_path.write_bytes(gzip.compress(data))
    index_path.write_text("\n".join(index_lines) + "\n")
    return dict_path, index_path


def make_tokenizer(chat_template=None, eos=True):
    """Build a word-level tokenizer offline, with `<eos>` as EOS token when `eos` is set."""
    backend = Tokenizer(models.WordLevel(vocab={word: i for i, word in enumerate(WORDS)}, unk_token="[UNK]"))
    # Newlines are tokens, as in SmolLM2's byte-level tokenizer, and other whitespace separates words.
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(r"[^\S\n]+"), behavior="removed"),
            pre_tokenizers.Split(Regex(r"\n|[.:]"), behavior="isolated"),
        ]
    )
    if eos:
        tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<eos>", unk_token="[UNK]")
    else:
        tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]")
    tokenizer.chat_template = chat_template
    return tokenizer


def ids(*words):
    return [WORDS.index(word) for word in words]


# The Devil's Dictionary as installed by dict-devil


@needs_dict_devil
def test_devil_entry_count():
    examples = load_devil_examples()

    # dict-devil 1.0-13.1 gives 997: 1008 index lines, less 5 dictd metadata entries,
    # 4 aliases of another line's text and 2 entries printed twice in the source.
    assert 950 <= len(examples) <= 1050
    assert len(set(examples)) == len(examples)


@needs_dict_devil
def test_devil_known_entries():
    by_prompt = {}
    for example in load_devil_examples():
        by_prompt.setdefault(example.prompt, []).append(example.response)

    assert by_prompt["Define the word Abasement."] == [
        "n. A decent and customary mental attitude in the presence of wealth of power. "
        "Peculiarly appropriate in an employee when addressing an employer."
    ]
    assert by_prompt["Define the word Cui Bono."] == ["[Latin] What good would that do _me_?"]
    assert by_prompt["Define the word R.I.P."][0].startswith("A careless abbreviation of _requiescat in pace_")
    assert by_prompt["Define the word I."][0].startswith("I is the first letter of the alphabet")
    # "babe" and "baby" index the same text, and PRECEDENT is printed twice in the source.
    assert len(by_prompt["Define the word Babe or Baby."]) == 1
    assert len(by_prompt["Define the word Precedent."]) == 1
    # REASON has two entries with different definitions.
    assert sorted(by_prompt["Define the word Reason."]) == [
        "n. Propensitate of prejudice.",
        "v.i. To weight probabilities in the scales of desire.",
    ]


@needs_dict_devil
def test_devil_no_metadata_or_headings():
    examples = load_devil_examples()

    for example in examples:
        assert example.prompt.startswith("Define the word "), example
        assert "00database" not in example.prompt, example
        assert "00-database" not in example.response, example
        assert "wiretap" not in example.response, example
        assert "\n" not in example.response, example
        assert "  " not in example.response, example
        assert example.response == example.response.strip(), example

    abasement = next(example for example in examples if example.prompt == "Define the word Abasement.")
    assert "ABASEMENT" not in abasement.response


@needs_dict_devil
def test_load_examples_none_is_devil():
    assert load_examples(None) == load_devil_examples()


# dictd parsing on files written here


def test_dictd_parsing_synthetic(tmp_path):
    dict_path, index_path = write_dictd(
        tmp_path,
        [
            ("00databaseshort", "00-database-short\n     Test Dictionary\n"),
            ("00-database-url", "http://example.invalid/\n"),
            ("cat", "CAT, n.  A soft, indestructible\nautomaton.\n\n"),
            ("hand", "HAND, n.  A singular   instrument.\n\n    A verse line\n    Author\n\n"),
            ("ll", "LL.D.  Letters indicating a degree.\n"),
            ("q", "Q is a letter that nobody needs.\n"),
        ],
    )

    examples = load_devil_examples(dict_path, index_path)

    assert examples == [
        Example("Define the word Cat.", "n. A soft, indestructible automaton."),
        Example("Define the word Hand.", "n. A singular instrument. A verse line Author"),
        Example("Define the word LL.D.", "Letters indicating a degree."),
        Example("Define the word Q.", "Q is a letter that nobody needs."),
    ]


def test_dictd_large_offsets(tmp_path):
    # Offsets above 64**2 need three dictd digits.
    filler = [(f"word{i}", f"WORD{i}, n.  {'x' * 100}\n") for i in range(60)]
    dict_path, index_path = write_dictd(tmp_path, [*filler, ("last", "LAST, adj.  The final one.\n")])

    examples = load_devil_examples(dict_path, index_path)

    assert len(examples) == 61
    assert examples[-1] == Example("Define the word Last.", "adj. The final one.")


def test_devil_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="apt-get install dict-devil"):
        load_devil_examples(tmp_path / "missing.dict.dz", tmp_path / "missing.index")


def test_dictd_malformed_index(tmp_path):
    dict_path, index_path = write_dictd(tmp_path, [("cat", "CAT, n.  A cat.\n")])
    index_path.write_text("cat\tA\n")

    with pytest.raises(ValueError, match=r"test\.index:1"):
        load_devil_examples(dict_path, index_path)


# Training files


def test_plain_text_paragraphs(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("First paragraph,\nsecond line.\n\n\nSecond paragraph.\n  \t\nThird.\n")

    examples = load_examples(path)

    assert examples == [
        Example("", "First paragraph,\nsecond line."),
        Example("", "Second paragraph."),
        Example("", "Third."),
    ]


def test_jsonl_prompt_and_text(tmp_path):
    path = tmp_path / "train.jsonl"
    lines = [
        json.dumps({"prompt": "Define cat.", "response": "A small lion."}),
        "",
        json.dumps({"text": "Plain text line."}),
    ]
    path.write_text("\n".join(lines) + "\n")

    examples = load_examples(str(path))

    assert examples == [Example("Define cat.", "A small lion."), Example("", "Plain text line.")]


def test_jsonl_malformed_line(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text(json.dumps({"text": "good"}) + "\n" + json.dumps({"text": "good"}) + "\n{not json\n")

    with pytest.raises(ValueError, match=r"train\.jsonl:3: invalid JSON"):
        load_examples(path)


@pytest.mark.parametrize(
    "line",
    [
        json.dumps({"prompt": "only a prompt"}),
        json.dumps(["a", "list"]),
        json.dumps({"prompt": "p", "response": 3}),
        json.dumps({"text": "   "}),
    ],
)
def test_jsonl_invalid_record(tmp_path, line):
    path = tmp_path / "train.jsonl"
    path.write_text(json.dumps({"text": "good"}) + "\n" + line + "\n")

    with pytest.raises(ValueError, match=r"train\.jsonl:2:"):
        load_examples(path)


@pytest.mark.parametrize("name", ["empty.txt", "empty.jsonl"])
def test_empty_training_file(tmp_path, name):
    path = tmp_path / name
    path.write_text("\n  \n\n")

    with pytest.raises(ValueError, match=name):
        load_examples(path)


def test_missing_training_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing.jsonl"):
        load_examples(tmp_path / "nothing.jsonl")


# Held-out split


def test_split_deterministic_and_disjoint():
    examples = [Example("", f"text {i}") for i in range(50)]

    train, held_out = split_held_out(examples, fraction=0.2, seed=3)
    train_again, held_out_again = split_held_out(examples, fraction=0.2, seed=3)
    _, held_out_other_seed = split_held_out(examples, fraction=0.2, seed=4)

    assert (train, held_out) == (train_again, held_out_again)
    assert len(held_out) == 10
    assert len(train) == 40
    assert not set(train) & set(held_out)
    assert sorted(train + held_out, key=examples.index) == examples
    assert held_out != held_out_other_seed


def test_split_at_least_one_each():
    examples = [Example("", f"text {i}") for i in range(3)]

    train, held_out = split_held_out(examples, fraction=0.01)
    assert len(held_out) == 1
    assert len(train) == 2

    train, held_out = split_held_out(examples, fraction=0.99)
    assert len(held_out) == 2
    assert len(train) == 1


@pytest.mark.parametrize("fraction", [0, 1, -0.1, 1.5])
def test_split_invalid_fraction(fraction):
    examples = [Example("", "a"), Example("", "b")]

    with pytest.raises(ValueError, match=str(fraction)):
        split_held_out(examples, fraction=fraction)


def test_split_too_few_examples():
    with pytest.raises(ValueError, match="got 1"):
        split_held_out([Example("", "a")])


# Tokenization


def test_tokenize_plain_text_appends_eos():
    tokenizer = make_tokenizer(chat_template=CHAT_TEMPLATE)

    token_lists = tokenize_examples(tokenizer, [Example("", "a small lion")])

    assert token_lists == [ids("a", "small", "lion", "<eos>")]


def test_tokenize_prompt_uses_chat_template():
    tokenizer = make_tokenizer(chat_template=CHAT_TEMPLATE)

    token_lists = tokenize_examples(tokenizer, [Example("define the word cat .", "a small lion")])

    # The template's final newline is dropped, so the sequence ends on a single EOS.
    expected = ids("user", ":", "define", "the", "word", "cat", ".", "<eos>", "\n")
    expected += ids("assistant", ":", "a", "small", "lion", "<eos>")
    assert token_lists == [expected]


def test_tokenize_prompt_without_template():
    tokenizer = make_tokenizer(chat_template=None)

    token_lists = tokenize_examples(tokenizer, [Example("define the word cat .", "a small lion")])

    assert token_lists == [ids("a", "small", "lion", "<eos>")]


def test_tokenize_no_double_eos():
    tokenizer = make_tokenizer()

    token_lists = tokenize_examples(tokenizer, [Example("", "a small lion <eos>")])

    assert token_lists == [ids("a", "small", "lion", "<eos>")]


def test_tokenize_without_eos_token():
    tokenizer = make_tokenizer(eos=False)

    token_lists = tokenize_examples(tokenizer, [Example("", "a small lion")])

    assert token_lists == [ids("a", "small", "lion")]


# Packing and batching


def test_pack_shapes_and_tail():
    rows = pack_sequences([[1, 2, 3], [4, 5], [6, 7, 8, 9]], seq_len=4)

    assert rows.dtype == torch.int64
    assert rows.shape == (2, 4)
    assert rows.tolist() == [[1, 2, 3, 4], [5, 6, 7, 8]]


@given(
    token_lists=st.lists(st.lists(st.integers(0, 1000), max_size=20), min_size=1, max_size=10),
    seq_len=st.integers(1, 16),
)
def test_pack_is_prefix_of_concatenation(token_lists, seq_len):
    tokens = [token for token_list in token_lists for token in token_list]
    if len(tokens) < seq_len:
        return

    rows = pack_sequences(token_lists, seq_len)

    assert rows.shape == (len(tokens) // seq_len, seq_len)
    assert rows.flatten().tolist() == tokens[: rows.numel()]


def test_pack_too_short():
    with pytest.raises(ValueError, match=r"seq_len=8 .* 5 tokens"):
        pack_sequences([[1, 2], [3, 4, 5]], seq_len=8)


def test_batch_shapes_and_labels():
    rows = torch.arange(40).view(10, 4)

    batches = list(batch_iterator(rows, batch_size=3, steps=7))

    assert len(batches) == 7
    for batch in batches:
        assert set(batch) == {"input_ids", "labels"}
        assert batch["input_ids"].shape == (3, 4)
        assert torch.equal(batch["labels"], batch["input_ids"])
        assert batch["labels"].data_ptr() != batch["input_ids"].data_ptr()
        first_tokens = batch["input_ids"][:, 0].tolist()
        assert len(set(first_tokens)) == 3
        for row in batch["input_ids"]:
            assert torch.equal(row, rows[row[0] // 4])


def test_batch_epoch_covers_all_rows():
    rows = torch.arange(12).view(6, 2)

    batches = list(batch_iterator(rows, batch_size=2, steps=6, seed=1))

    for epoch in (batches[:3], batches[3:]):
        seen = sorted(row[0].item() // 2 for batch in epoch for row in batch["input_ids"])
        assert seen == list(range(6))
    epoch_orders = [torch.cat([batch["input_ids"] for batch in epoch]) for epoch in (batches[:3], batches[3:])]
    assert not torch.equal(epoch_orders[0], epoch_orders[1])


def test_batch_deterministic_seed():
    rows = torch.arange(64).view(16, 4)

    first = [batch["input_ids"] for batch in batch_iterator(rows, batch_size=4, steps=5, seed=7)]
    again = [batch["input_ids"] for batch in batch_iterator(rows, batch_size=4, steps=5, seed=7)]
    other = [batch["input_ids"] for batch in batch_iterator(rows, batch_size=4, steps=5, seed=8)]

    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert not all(torch.equal(a, b) for a, b in zip(first, other))


def test_batch_size_too_large():
    rows = torch.zeros(3, 4, dtype=torch.int64)

    with pytest.raises(ValueError, match="batch_size=4 exceeds the 3"):
        batch_iterator(rows, batch_size=4, steps=1)
