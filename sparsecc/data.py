"""Calibration and evaluation data: where model feeds come from.

A `FeedSource` yields feed dicts (input name -> array) for a model. Three kinds:
- `TextWindows`: a text file or folder of text files, tokenized, cut into windows of N
  tokens; each window starts the way the tokenizer starts a text (with its BOS token when it
  adds one), so windowed perplexity matches the model's training convention.
- `NpzFeeds`: an `.npz` whose keys are model input names and whose axis 0 indexes samples.
- `IterableFeeds`: any Python iterable of feed dicts, or an object with `get_next()` (ONNX
  Runtime's CalibrationDataReader).
"""
from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np

from sparsecc.errors import SparseccError, one_line

# Text holding more of these (C0 controls but tab, newline, carriage return, form feed, vertical
# tab) than this share is binary data that happens to decode, not text to calibrate on.
_CONTROLS = {chr(c) for c in range(32) if chr(c) not in "\t\n\r\f\v"}
MAX_CONTROL_SHARE = 0.001


class Tokenizer:
    """A text tokenizer read from local files: a `tokenizer.json` (or a folder holding one),
    or a `.gguf` file (through transformers). Knows whether it starts texts with a BOS."""

    def __init__(self, path: str | os.PathLike):
        path = Path(path)
        if not path.exists():
            raise SparseccError(f"tokenizer not found: {path}; pass a tokenizer.json, a folder holding one, or a .gguf file")
        self.path = self.file = path
        if path.suffix == ".gguf":
            self._encode = self._load_gguf(path)
        else:
            file = path / "tokenizer.json" if path.is_dir() else path
            if not file.is_file():
                raise SparseccError(f"no tokenizer.json in {path}; pass a tokenizer.json, a folder holding one, or a .gguf file")
            self.file = file
            from tokenizers import Tokenizer as HFTokenizer
            try:
                tok = HFTokenizer.from_file(str(file))
            except Exception as exc:
                raise SparseccError(f"cannot read tokenizer {file}: {str(exc).splitlines()[0]}; "
                                    "pass a valid tokenizer.json (as saved by the tokenizers library)") from None
            unknown = _unknown_token(file)
            if unknown is not None and tok.token_to_id(unknown) is None:
                raise SparseccError(f"tokenizer {file} names {unknown!r} as its unknown token but its vocabulary "
                                    "lacks it; add it to the vocabulary or fix model.unk_token")
            self._encode = lambda text, special: tok.encode(text, add_special_tokens=special).ids
        with_special, plain = self.encode_ids("a", True), self.encode_ids("a", False)
        extra = len(with_special) - len(plain)
        self.bos_id = with_special[0] if extra > 0 and with_special[extra:] == plain else None

    @staticmethod
    def _load_gguf(path: Path):
        try:
            from transformers import AutoTokenizer
        except ImportError:
            raise SparseccError("reading a tokenizer from .gguf needs transformers and gguf: "
                                "pip install 'sparsecc[export]'") from None
        tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        return lambda text, special: tok(text, add_special_tokens=special)["input_ids"]

    def encode_ids(self, text: str, special: bool) -> list[int]:
        try:
            return self._encode(text, special)
        except Exception as exc:   # the Rust library's errors
            raise SparseccError(f"tokenizer {self.path} cannot encode text ({one_line(str(exc).split(chr(10))[0])[:160]}); "
                                "fix the tokenizer (e.g. its unknown token must be in its vocabulary)") from None
        except BaseException as exc:
            if type(exc).__name__ != "PanicException":   # pyo3's panics derive from BaseException
                raise
            raise SparseccError(f"tokenizer {self.path} cannot encode text (it panicked: {one_line(str(exc))[:160]}); "
                                "fix the tokenizer (e.g. its unknown token must be in its vocabulary)") from None

    def encode(self, text: str) -> np.ndarray:
        """Token ids of `text` with no special tokens."""
        return np.asarray(self.encode_ids(text, False), dtype=np.int64)


def tokenizer_file(path: str | os.PathLike) -> Path:
    """The file a tokenizer path names: its folder's tokenizer.json, or the file itself."""
    path = Path(path)
    return path / "tokenizer.json" if path.is_dir() else path


def _unknown_token(file: Path) -> str | None:
    """The unknown token a tokenizer.json's model names (None: it has none)."""
    import json

    try:
        unknown = json.loads(file.read_text(encoding="utf-8")).get("model", {}).get("unk_token")
    except (ValueError, AttributeError):
        return None
    return unknown if isinstance(unknown, str) else None


def text_files(path: str | os.PathLike) -> list[Path]:
    """The files a text source reads: the file itself, or every `*.txt` under a folder
    (recursively), in sorted order."""
    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*.txt") if p.is_file())
        if not files:
            raise SparseccError(f"no .txt files under {path}; point at a text file or a folder of .txt files")
        return files
    if path.is_file():
        return [path]
    raise SparseccError(f"text data not found: {path}; check the path")


# a file or folder name with the word test/tests in it (test.txt, wiki.test.tokens, en_test/,
# test-00001.txt), not merely the letters (latest.txt, contest.txt)
_TEST_SPLIT = re.compile(r"(?:^|[^a-z0-9])tests?(?:[^a-z0-9]|$)", re.IGNORECASE)


def named_like_test_split(path: Path, root: Path) -> bool:
    """Whether `path` (a file of the source `root`, or `root` itself) or a folder between them
    is named like a test split; the folders above `root` do not count."""
    parts = path.relative_to(root).parts if path != root else (path.name,)
    return any(_TEST_SPLIT.search(part) for part in parts)


def read_text(path: str | os.PathLike) -> str:
    """A text file, or every `*.txt` under a folder in sorted order, as one string."""
    files = text_files(path)
    parts = []
    for file in files:
        try:
            parts.append(file.read_text(encoding="utf-8"))
        except UnicodeDecodeError as exc:
            raise SparseccError(f"{file} is not UTF-8 text (bad byte at offset {exc.start}); convert it to UTF-8") from None
        _check_is_text(file, parts[-1])
    text = "\n".join(parts)
    if not text.strip():
        raise SparseccError(f"{path} holds no text; give a non-empty text file")
    return text


def _check_is_text(file: Path, text: str) -> None:
    """Refuse binary data that decodes as UTF-8 (NUL bytes, control codes): its windows would
    calibrate thresholds on noise."""
    if "\x00" in text:
        raise SparseccError(f"{file} holds NUL bytes at offset {text.index(chr(0))}: binary data, not text; "
                            "give a UTF-8 text file")
    controls = sum(text.count(c) for c in _CONTROLS)
    if controls > MAX_CONTROL_SHARE * len(text):
        raise SparseccError(f"{file} holds {controls} control characters in {len(text)}: binary data, not text; "
                            "give a UTF-8 text file")


class FeedSource:
    """Yields feed dicts for a model. `key()` identifies the data for caching (None: not cacheable)."""

    def feeds(self, input_names: list[str]) -> Iterator[dict[str, np.ndarray]]:
        raise NotImplementedError

    def __len__(self) -> int:
        raise NotImplementedError

    def key(self) -> str | None:
        return None

    def describe(self) -> dict:
        return {"kind": type(self).__name__}

    def paths(self) -> list[Path]:
        """The files and folders the data is read from (an output must not replace them)."""
        return []

    def with_windows(self, limit: int | None) -> FeedSource:
        """The same data with another window count (None: every window there is); sources
        that cannot be re-cut return themselves."""
        return self

    def test_split_files(self) -> list[str]:
        """The files it reads that are named like a test split (compile refuses to calibrate on them)."""
        return []


def windows(ids: np.ndarray, seq_len: int, bos_id: int | None, limit: int | None = None) -> np.ndarray:
    """Cut `ids` into full windows of `seq_len` tokens, each led by `bos_id` when given.
    With `limit`, keep that many windows spread evenly over the text (not just its start)."""
    if seq_len < 2:
        raise SparseccError(f"window length {seq_len} is too short; use --seq-len 2 or more")
    body = seq_len - (bos_id is not None)
    count = len(ids) // body
    if count == 0:
        raise SparseccError(f"the text has {len(ids)} tokens, fewer than one window of {seq_len}; "
                            "give more text or a smaller --seq-len")
    rows = ids[: count * body].reshape(count, body)
    if limit is not None and limit < count:
        rows = rows[np.linspace(0, count - 1, limit).round().astype(np.int64)]
    if bos_id is not None:
        rows = np.concatenate([np.full((len(rows), 1), bos_id, dtype=np.int64), rows], axis=1)
    return rows


def feeds_for_ids(window: np.ndarray, input_names: list[str]) -> dict[str, np.ndarray]:
    """Feeds of a decoder LM for one window: input_ids plus the usual companion inputs."""
    n = window.shape[-1]
    known = {
        "input_ids": window[None],
        "attention_mask": np.ones((1, n), dtype=np.int64),
        "position_ids": np.arange(n, dtype=np.int64)[None],
        "token_type_ids": np.zeros((1, n), dtype=np.int64),
    }
    missing = [name for name in input_names if name not in known]
    if missing:
        raise SparseccError(f"model input {missing[0]!r} cannot be fed from text; "
                            "give calibration feeds as an .npz instead (keys = input names)")
    return {name: known[name] for name in input_names}


class TextWindows(FeedSource):
    def __init__(self, text: str | os.PathLike, tokenizer: str | os.PathLike | Tokenizer | None,
                 seq_len: int = 256, limit: int | None = None):
        if tokenizer is None:
            raise SparseccError("text data needs a tokenizer: pass --tokenizer (tokenizer.json, its folder, or a .gguf)")
        if limit is not None and limit < 1:
            raise SparseccError(f"window count must be at least 1 (got {limit})")
        self.tokenizer = tokenizer if isinstance(tokenizer, Tokenizer) else Tokenizer(tokenizer)
        self.path, self.seq_len = Path(text), seq_len
        self.files = text_files(text)
        ids = self.tokenizer.encode(read_text(text))
        self.rows = windows(ids, seq_len, self.tokenizer.bos_id, limit)
        self.available = len(ids) // (seq_len - (self.tokenizer.bos_id is not None))   # windows the text holds

    def __len__(self) -> int:
        return len(self.rows)

    def feeds(self, input_names):
        for row in self.rows:
            yield feeds_for_ids(row, input_names)

    def key(self) -> str:
        return hashlib.sha256(self.rows.tobytes()).hexdigest()

    def with_windows(self, limit):
        return TextWindows(self.path, self.tokenizer, self.seq_len, limit)

    def paths(self):
        return [self.path, self.tokenizer.file]

    def test_split_files(self):
        return [str(f) for f in self.files if named_like_test_split(f, self.path)]

    def describe(self) -> dict:
        return {"kind": "text", "path": str(self.path), "files": [str(f) for f in self.files],
                "tokenizer": str(self.tokenizer.path), "seq_len": self.seq_len, "windows": len(self.rows),
                "windows_available": self.available, "tokens": int(self.rows.size), "bos": self.tokenizer.bos_id}


class NpzFeeds(FeedSource):
    def __init__(self, path: str | os.PathLike, limit: int | None = None):
        if limit is not None and limit < 1:
            raise SparseccError(f"window count must be at least 1 (got {limit})")
        self.path = Path(path)
        if not self.path.is_file():
            raise SparseccError(f"feed file not found: {self.path}; check the path")
        try:
            with np.load(self.path, allow_pickle=False) as data:
                self.arrays = {k: data[k] for k in data.files}
        except Exception as exc:
            raise SparseccError(f"{self.path} is not a readable .npz ({type(exc).__name__}); "
                                "save feeds with numpy.savez") from None
        scalar = next((k for k, a in self.arrays.items() if a.ndim == 0), None)
        if scalar is not None:
            raise SparseccError(f"{self.path}: {scalar!r} is a 0-d array (one number, no samples); each array "
                                "needs samples on axis 0, e.g. shape [samples, rows, features]")
        counts = {len(a) for a in self.arrays.values()}
        if len(counts) != 1 or 0 in counts:
            raise SparseccError(f"{self.path}: every array needs the same, non-zero number of samples on axis 0")
        empty = next((k for k, a in self.arrays.items() if 0 in a.shape[1:]), None)
        if empty is not None:
            raise SparseccError(f"{self.path}: the samples of {empty!r} are empty (shape {list(self.arrays[empty].shape)}); "
                                "each needs at least one token or row")
        self.available = counts.pop()
        self.count = min(self.available, limit or 2**62)

    def __len__(self):
        return self.count

    def feeds(self, input_names):
        missing = [n for n in input_names if n not in self.arrays]
        if missing:
            raise SparseccError(f"{self.path} lacks model input {missing[0]!r} (has {sorted(self.arrays)})")
        for i in range(self.count):
            yield {n: self.arrays[n][i] for n in input_names}

    def key(self):
        digest = hashlib.sha256()
        for name in sorted(self.arrays):
            digest.update(name.encode())
            digest.update(np.ascontiguousarray(self.arrays[name][: self.count]).tobytes())
        return digest.hexdigest()

    def test_split_files(self):
        return [str(self.path)] if named_like_test_split(self.path, self.path) else []

    def describe(self):
        return {"kind": "npz", "path": str(self.path), "samples": self.count, "samples_available": self.available}

    def with_windows(self, limit):
        return NpzFeeds(self.path, limit)

    def paths(self):
        return [self.path]


class IterableFeeds(FeedSource):
    """Feed dicts from Python: materialised once (they are replayed when a pass calibrates twice)."""

    def __init__(self, source: Iterable[dict] | object):
        if hasattr(source, "get_next"):
            items = list(iter(source.get_next, None))
        else:
            items = list(source)
        if not items:
            raise SparseccError("the calibration iterable yielded no feeds")
        self.items = items

    def __len__(self):
        return len(self.items)

    def feeds(self, input_names):
        for item in self.items:
            yield {n: np.asarray(item[n]) for n in input_names}


class MixedFeeds(FeedSource):
    """Several sources one after the other (e.g. the user's text and text sampled from the model)."""

    def __init__(self, sources: list[FeedSource]):
        self.sources = list(sources)

    def __len__(self):
        return sum(len(s) for s in self.sources)

    def feeds(self, input_names):
        for source in self.sources:
            yield from source.feeds(input_names)

    def key(self):
        keys = [s.key() for s in self.sources]
        return None if None in keys else hashlib.sha256("\n".join(keys).encode()).hexdigest()

    def test_split_files(self):
        return [f for s in self.sources for f in s.test_split_files()]

    def describe(self):
        return {"kind": "mixed", "windows": len(self), "parts": [s.describe() for s in self.sources]}

    def with_windows(self, limit):
        return MixedFeeds([s.with_windows(limit) for s in self.sources])

    def paths(self):
        return [p for s in self.sources for p in s.paths()]


def as_feed_source(data: FeedSource | Iterable[dict] | object | None) -> FeedSource | None:
    """Accept a FeedSource, an iterable of feed dicts, or a CalibrationDataReader."""
    if data is None or isinstance(data, FeedSource):
        return data
    if hasattr(data, "get_next") or (isinstance(data, Iterable) and not isinstance(data, (str, bytes, os.PathLike))):
        return IterableFeeds(data)
    raise SparseccError(f"cannot use {type(data).__name__} as calibration data; give a FeedSource, "
                        "an iterable of feed dicts, or a CalibrationDataReader")
