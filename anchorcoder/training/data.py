"""Training data (``data=`` group): documents, the contamination guard, and packed rows.

- :func:`load_documents`: the offline code corpus (the ``.py`` files of this Python's standard
  library, filtered and de-duplicated, split into train / validation by file), optionally the MBPP
  train split (task ids 601-974), or a hub dataset by name;
- :func:`check_contamination`: fails the run if a HumanEval problem or an MBPP test-split solution is
  in the training documents;
- :func:`pack_documents`: every document through ``method.encode`` (so anchors are inserted as at
  inference), then packed into rows of at most ``seq_len`` tokens; a document never straddles two
  rows (a long one is cut into ``seq_len`` pieces, each its own document), and :class:`PackedCollator`
  marks the documents so that attention and positions restart at each one.
"""

from __future__ import annotations

import hashlib
import logging
import re
import sysconfig
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from anchorcoder.methods.anchors import IGNORE_INDEX
from anchorcoder.registry import ConfigError

log = logging.getLogger(__name__)

SOURCES = ("python_stdlib", "hub", "self_distill")
MBPP_TRAIN_IDS = range(601, 975)


class ContaminationError(ConfigError):
    """Benchmark problems found in the training data."""


@dataclass
class Document:
    name: str  # where it came from (a file, a task id, a hub row)
    text: str  # what is trained on (labels)
    prompt: str = ""  # chat documents: the prompt before ``text``, fed but never a target


class Piece(list):
    """A document's token ids; ``prompt_len`` leading ones are its prompt (no labels)."""

    prompt_len: int = 0


# ---------------------------------------------------------------------------- documents
def load_documents(cfg: dict, generator: dict | None = None) -> tuple[list[Document], list[Document]]:
    """(train, validation) documents of a ``data`` config. ``generator``: what ``self_distill`` writes
    its corpus with (``model``, ``tokenizer``, ``device``, ``model_cfg``)."""
    source = cfg.get("source")
    if source not in SOURCES:
        raise ConfigError(f"data.source must be one of {', '.join(SOURCES)}; got '{source}'")
    if source == "self_distill":
        from anchorcoder.training.self_distill import self_distill_documents

        if generator is None:
            raise ConfigError("data=self_distill needs the model to write its answers (train.py passes it)")
        docs = self_distill_documents(cfg, **generator)
    else:
        docs = stdlib_documents(cfg) if source == "python_stdlib" else hub_documents(cfg)
    train, validation = split_by_name(docs, float(cfg.get("validation_fraction", 0.05)))
    if cfg.get("mbpp_train"):
        train += mbpp_train_documents(cfg)
    if not train:
        raise ConfigError(f"data={cfg.get('name')}: no training documents (check data.source and its filters)")
    log.info("data: %d train / %d validation documents", len(train), len(validation))
    return train, validation


def stdlib_documents(cfg: dict) -> list[Document]:
    """``.py`` files of the standard library, without tests and vendored packages, de-duplicated."""
    root = Path(cfg.get("stdlib_dir") or sysconfig.get_paths()["stdlib"]).expanduser()
    if not root.is_dir():
        raise ConfigError(f"data.stdlib_dir '{root}' is not a folder")
    excluded = set(cfg.get("exclude_dirs") or ())
    low, high = int(cfg.get("min_chars", 0)), int(cfg.get("max_chars", 10**9))
    limit = int(cfg.get("max_documents") or 0)
    docs, seen = [], set()
    for path in sorted(root.rglob("*.py")):
        if limit and len(docs) == limit:
            break
        relative = path.relative_to(root)
        if any(part in excluded or part.startswith("test") for part in relative.parts[:-1]):
            continue
        if relative.name.startswith("test_"):
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        if not low <= len(text) <= high or not text.isascii():
            continue
        digest = hashlib.sha1(_normalise(text).encode()).hexdigest()
        if digest in seen:
            continue
        seen.add(digest)
        docs.append(Document(str(relative), text))
    if not docs:
        raise ConfigError(f"data.stdlib_dir '{root}': no Python file passed the filters")
    return docs


def hub_documents(cfg: dict) -> list[Document]:
    """A dataset by name (``data.hub_dataset``), its ``data.text_field`` column."""
    name, field = cfg.get("hub_dataset"), cfg.get("text_field", "content")
    if not name:
        raise ConfigError("data.hub_dataset is required for data.source=hub (e.g. bigcode/the-stack-smol)")
    try:
        import datasets

        rows = datasets.load_dataset(name, cfg.get("hub_config"), split=cfg.get("split", "train"))
    except Exception as err:
        raise ConfigError(f"data.hub_dataset: could not load '{name}': {err}") from err
    if field not in rows.column_names:
        raise ConfigError(f"data.text_field '{field}' is not a column of {name}; columns: {rows.column_names}")
    limit = cfg.get("max_documents")
    rows = rows.select(range(min(int(limit), len(rows)))) if limit else rows
    return [Document(f"{name}/{i}", text) for i, text in enumerate(rows[field]) if text and text.strip()]


def mbpp_train_documents(cfg: dict) -> list[Document]:
    """MBPP train split (task ids 601-974): the task as a docstring with its first test, then the code
    (the layout of ``code_ppl``'s MBPP prompts)."""
    from anchorcoder.benchmarks.mbpp import clean_code

    rows = _mbpp_rows(cfg)
    test_solutions = {_normalise(code) for code in _mbpp_test_solutions(rows).values()}
    docs, dropped = [], []
    for i in MBPP_TRAIN_IDS:
        row = rows[i]
        code = clean_code(row["code"])
        flat = _normalise(code)
        if any(solution in flat for solution in test_solutions):  # MBPP repeats solutions across splits
            dropped.append(i)
            continue
        text = f'"""\n{row["text"]}\n{row["test_list"][0]}\n"""\n{code}\n'
        docs.append(Document(f"MBPP/{i}", text))
    if dropped:
        log.info("MBPP train: dropped task(s) %s, which contain a test-split solution", dropped)
    return docs


def _mbpp_test_solutions(rows: dict[int, dict]) -> dict[str, str]:
    from anchorcoder.benchmarks.mbpp import TEST_IDS, clean_code

    return {f"MBPP/{i}": clean_code(rows[i]["code"]) for i in TEST_IDS}


def _mbpp_rows(cfg: dict) -> dict[int, dict]:
    from anchorcoder.benchmarks.mbpp import load_mbpp_rows

    hub = cfg.get("mbpp_hub_dataset") or "google-research-datasets/mbpp"
    return load_mbpp_rows(cfg.get("mbpp_data_file"), cfg.get("mbpp_sha256"), hub, ("mbpp_data_file", "mbpp_sha256"))


def split_by_name(docs: list[Document], validation_fraction: float) -> tuple[list[Document], list[Document]]:
    """A fixed split by file: a document is in validation when the hash of its name says so."""
    if not 0 <= validation_fraction < 1:
        raise ConfigError(f"data.validation_fraction must be in [0, 1); got {validation_fraction}")
    train, validation = [], []
    for doc in docs:
        bucket = int(hashlib.sha1(doc.name.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
        (validation if bucket < validation_fraction else train).append(doc)
    return train, validation


# ---------------------------------------------------------------------------- contamination guard
def _normalise(text: str) -> str:
    return re.sub(r"\s+", "", text)


def benchmark_needles(cfg: dict) -> dict[str, str]:
    """What must not be in training data: each HumanEval prompt (signature + docstring) and each MBPP
    test-split reference solution."""
    from anchorcoder.benchmarks.humaneval import humaneval_rows

    needles = {task: row["prompt"] for task, row in humaneval_rows().items()}
    return needles | _mbpp_test_solutions(_mbpp_rows(cfg))


GRAM, GRAM_EVERY = 16, 8  # content-defined anchors: 16-character grams whose CRC is 0 mod 8
MIN_NEEDLE_CHARS = 40  # shorter needles (19 MBPP one-liners such as `def f(l): return sum(l)`) match by chance


def _anchor_grams(text: str) -> set[str]:
    """The grams of ``text`` chosen by their content alone, so a copy of a needle inside a document
    holds every gram the needle has, wherever the copy sits."""
    grams = (text[i : i + GRAM] for i in range(len(text) - GRAM + 1))
    return {g for g in grams if zlib.crc32(g.encode()) % GRAM_EVERY == 0}


def check_contamination(docs: list[Document], needles: dict[str, str]) -> None:
    """Raise :class:`ContaminationError` naming every benchmark problem found in ``docs``."""
    found = [f"{name} (in {doc})" for name, doc in find_contamination(docs, needles)]
    if found:
        shown = "; ".join(found[:10])
        raise ContaminationError(
            f"the training data contains {len(found)} benchmark problem(s): {shown}"
            f"{' ...' if len(found) > 10 else ''}. Remove them (data filters) before training."
        )


def find_contamination(docs: list[Document], needles: dict[str, str]) -> list[tuple[str, str]]:
    """(needle name, document name) of every needle found in a document (prompt and text).

    Matching ignores whitespace (so also line breaks and indentation). An index of the corpus'
    content-defined grams narrows each needle to the documents holding one of its grams; the full
    substring test runs on those only. Needles shorter than ``MIN_NEEDLE_CHARS`` are not checked."""
    normalised = [_normalise(doc.prompt + doc.text) for doc in docs]
    index: dict[str, list[int]] = {}
    for d, text in enumerate(normalised):
        for gram in _anchor_grams(text):
            index.setdefault(gram, []).append(d)
    found = []
    for name, raw in needles.items():
        needle = _normalise(raw)
        if len(needle) < MIN_NEEDLE_CHARS:
            continue
        grams = _anchor_grams(needle)
        candidates = min((index.get(g, []) for g in grams), key=len) if grams else range(len(docs))
        found += [(name, docs[d].name) for d in candidates if needle in normalised[d]]
    return found


# ---------------------------------------------------------------------------- packing
def pack_documents(docs: list[Document], method, tokenizer, seq_len: int, pack: bool = True) -> list[list[list[int]]]:
    """Rows of documents (token id lists), each row at most ``seq_len`` tokens in all; ``pack=False``:
    one document per row. A chat document (``prompt``) is its prompt then its text, both encoded
    without special tokens, cut to ``seq_len``; its :class:`Piece` knows the prompt's length."""
    from tqdm.auto import tqdm

    if pack and any(doc.prompt for doc in docs):
        raise ConfigError("data.pack=true: chat documents (with a prompt) train one per row; set data.pack=false")
    eos = tokenizer.eos_token_id
    pieces = []
    for doc in tqdm(docs, desc="tokenising", unit="doc", leave=False):
        end = [eos] if eos is not None else []
        if doc.prompt:
            prompt = method.encode(tokenizer, doc.prompt, add_special_tokens=False)
            piece = Piece((prompt + method.encode(tokenizer, doc.text, add_special_tokens=False) + end)[:seq_len])
            piece.prompt_len = min(len(prompt), seq_len)
            pieces.append(piece)
            continue
        ids = method.encode(tokenizer, doc.text) + end
        pieces += [ids[i : i + seq_len] for i in range(0, len(ids), seq_len)]
    pieces = [_method_piece(method, piece, seq_len) for piece in pieces]
    if not pack:
        return [[piece] for piece in pieces]
    rows, row, used = [], [], 0
    for piece in pieces:
        if used + len(piece) > seq_len:
            rows.append(row)
            row, used = [], 0
        row.append(piece)
        used += len(piece)
    if row:
        rows.append(row)
    return rows


def _method_piece(method, ids: list[int], seq_len: int) -> Piece:
    """A piece as the method trains on it (e.g. span sentinels drawn for it: ``training_piece``)."""
    out, prompt_len = method.training_piece(list(ids), getattr(ids, "prompt_len", 0), seq_len)
    piece = Piece(out)
    piece.prompt_len = prompt_len
    return piece


@dataclass
class PackedCollator:
    """Rows of documents -> right-padded ``input_ids``, ``padding_mask``, ``doc_ids`` and ``labels``.

    Labels are the tokens themselves (the model shifts them), except padding, the first token of each
    document (nothing before it in the row may predict it) and a chat document's prompt.
    ``prompt_lengths`` ``[B]``: the prompt of each row's first document (rows of one chat document:
    what ``compress_prompt=false`` keeps whole; 0 for plain code)."""

    pad_id: int
    relabel: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None  # the method's training_labels

    def __call__(self, rows: list[list[list[int]]]) -> dict[str, torch.Tensor]:
        width = max(sum(len(d) for d in row) for row in rows)
        input_ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        doc_ids = torch.full((len(rows), width), -1, dtype=torch.long)
        labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
        prompt_lengths = torch.tensor([getattr(row[0], "prompt_len", 0) for row in rows], dtype=torch.long)
        for r, row in enumerate(rows):
            start = 0
            for d, ids in enumerate(row):
                end = start + len(ids)
                input_ids[r, start:end] = torch.tensor(ids)
                doc_ids[r, start:end] = d
                first = start + max(1, getattr(ids, "prompt_len", 0))
                labels[r, first:end] = input_ids[r, first:end]
                start = end
        if self.relabel is not None:
            labels = self.relabel(input_ids, labels)
        return {
            "input_ids": input_ids, "padding_mask": doc_ids >= 0, "doc_ids": doc_ids, "labels": labels,
            "prompt_lengths": prompt_lengths,
        }  # fmt: skip
