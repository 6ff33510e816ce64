"""The checkpoint's tokenizer, as the GGUF runtime expects it in tokenizer.ggml.* keys.

BPE tokenizers (tokenizer.json) are read with the `tokenizers` library; SentencePiece models
(tokenizer.model) with `sentencepiece`. Special tokens, merges, add_bos/add_eos and the chat
template are gathered by gguf's SpecialVocab, as llama.cpp's converter gathers them.
The token lists follow convert_hf_to_gguf.py (get_vocab_base, _create_vocab_sentencepiece).
"""
from __future__ import annotations

import json
from hashlib import sha256
from importlib import resources
from pathlib import Path
from typing import Any

import gguf

from qconvert.errors import InputError
from qconvert.read.config import read_json

# The check text whose token ids identify a BPE pre-tokenizer (convert_hf_to_gguf.py).
CHECK_TEXT = '\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis concatenated) ✅ 🦙🦙 3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ ------======= нещо на Български \'\'\'\'\'\'```````""""......!!!!!!?????? I\'ve been \'told he\'s there, \'RE you sure? \'M not sure I\'ll make it, \'D you like some tea? We\'Ve a\'lL'

# HF pre-tokenizer regexes that llama.cpp implements, for tokenizers whose vocabulary is new
# (fine-tuned, retrained) and so has a hash no table knows. Same regex -> same pre-tokenization.
_LLAMA3_RE = ("(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*"
              "|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+")
_QWEN2_RE = ("(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*"
             "|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+")
STRUCTURAL_PRE = [
    # (signature of tokenizer.json's pre_tokenizer, tokenizer.ggml.pre)
    ((("ByteLevel", True),), "gpt-2"),  # GPT-2, Pythia / GPT-NeoX-20B
    ((("Split", _LLAMA3_RE), ("ByteLevel", False)), "llama-bpe"),  # Llama 3
    ((("Split", _QWEN2_RE), ("ByteLevel", False)), "qwen2"),  # Qwen2, Qwen2.5, Qwen3
    ((("Digits", True), ("ByteLevel", True)), "smollm"),  # SmolLM, SmolLM2, StarCoder
]


def _hash_table() -> dict[str, tuple[str, str]]:
    table: dict[str, tuple[str, str]] = {}
    text = resources.files("qconvert.arch").joinpath("bpe_pre.tsv").read_text(encoding="utf-8")
    for line in text.splitlines():
        if line and not line.startswith("#"):
            h, name, ref = (line.split("\t") + [""])[:3]
            table[h] = (name, ref)  # a later row wins, as in convert_hf_to_gguf.py
    return table


def _signature(pre: Any) -> tuple | None:
    if not isinstance(pre, dict):
        return None
    items = pre.get("pretokenizers") if pre.get("type") == "Sequence" else [pre]
    sig = []
    for p in items or []:
        t = p.get("type")
        if t == "ByteLevel":
            if p.get("add_prefix_space"):
                return None
            sig.append(("ByteLevel", bool(p.get("use_regex", True))))
        elif t == "Split":
            pattern = p.get("pattern", {})
            if p.get("invert") or p.get("behavior") != "Isolated" or "Regex" not in pattern:
                return None
            sig.append(("Split", pattern["Regex"]))
        elif t == "Digits":
            sig.append(("Digits", bool(p.get("individual_digits"))))
        else:
            return None
    return tuple(sig)


def identify_pre(tokenizer: Any, tokenizer_json: dict, path: Path) -> str:
    """tokenizer.ggml.pre: by the hash of the check text's ids as llama.cpp's converter does;
    for a vocabulary no table knows, by the pre-tokenizer's definition when llama.cpp
    implements the same one; otherwise an error naming the tokenizer."""
    ids = tokenizer.encode(CHECK_TEXT, add_special_tokens=True).ids
    digest = sha256(str(ids).encode()).hexdigest()
    known = _hash_table().get(digest)
    if known:
        return known[0]
    sig = _signature(tokenizer_json.get("pre_tokenizer"))
    for s, name in STRUCTURAL_PRE:
        if sig == s:
            return name
    names = sorted({n for _, n in STRUCTURAL_PRE} | {n for n, _ in _hash_table().values()})
    raise InputError(
        f"{path}: unknown BPE pre-tokenizer (check hash {digest[:16]}…, pre_tokenizer "
        f"{json.dumps(tokenizer_json.get('pre_tokenizer'))[:120]}); llama.cpp knows: {', '.join(names[:12])}, …")


def _looks_special(text: str) -> bool:
    """convert_hf_to_gguf.py does_token_look_special: added tokens that ought to be control."""
    return (text in ("<pad>", "<mask>", "<2mass>", "[@BOS@]")
            or (text.startswith("<|") and text.endswith("|>"))
            or (text.startswith("<｜") and text.endswith("｜>"))
            or (text.startswith("<unused") and text.endswith(">")))


_CLEANUPS = [(" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
             (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")]


def load_bpe(path: Path):
    """A tokenizer.json through the tokenizers library; a file it cannot load is an input error."""
    from tokenizers import Tokenizer

    try:
        return Tokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises a bare Exception on malformed files
        raise InputError(f"{path}: cannot load tokenizer: {str(e).splitlines()[0] if str(e) else type(e).__name__}") \
            from None


def load_spm(path: Path):
    """A SentencePiece tokenizer.model; a file it cannot load is an input error."""
    from sentencepiece import SentencePieceProcessor

    sp = SentencePieceProcessor()
    try:
        sp.LoadFromFile(str(path))
    except Exception as e:  # sentencepiece raises OSError, RuntimeError ("INTERNAL: ...") and more
        raise InputError(f"{path}: cannot load SentencePiece model: {str(e).splitlines()[0] if str(e) else e!r}") \
            from None
    return sp


def bpe_vocab(model_dir: Path, vocab_size: int | None, kv: gguf.GGUFWriter) -> None:
    """tokenizer.ggml.model "gpt2": tokens, types, pre-tokenizer, merges and special tokens."""
    path = model_dir / "tokenizer.json"
    if not path.is_file():
        raise InputError(f"{path}: file not found (a BPE tokenizer.json, or a SentencePiece tokenizer.model, is needed)")
    tok = load_bpe(path)
    tj = read_json(path)
    tcfg = _json_or_empty(model_dir / "tokenizer_config.json")
    vocab = tok.get_vocab(with_added_tokens=True)
    n = vocab_size if vocab_size is not None else len(vocab)
    if vocab and max(vocab.values()) >= n:
        raise InputError(f"{path}: token id {max(vocab.values())} does not fit vocab_size {n} of config.json")
    pre = identify_pre(tok, tj, path)

    added = tok.get_added_tokens_decoder()  # id -> AddedToken
    added_by_text = {t.content: i for i, t in added.items()}
    reverse = {i: t for t, i in vocab.items()}
    cleanup = bool(tcfg.get("clean_up_tokenization_spaces", False))
    tokens: list[str] = []
    types: list[int] = []
    for i in range(n):
        if i not in reverse:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
            continue
        text = reverse[i]
        if text in added_by_text:
            info = added[i] if i in added else added[added_by_text[text]]
            if not info.normalized:
                # llama.cpp assumes control/user tokens pre-normalized: round-trip them
                again = tok.decode(tok.encode(text, add_special_tokens=False).ids, skip_special_tokens=False)
                if cleanup:
                    for a, b in _CLEANUPS:
                        again = again.replace(a, b)
                text = again
            if info.special or _looks_special(text):
                types.append(gguf.TokenType.CONTROL)
            else:
                text = text.replace("\u2581", " ")  # pre-normalize user-defined spaces
                types.append(gguf.TokenType.USER_DEFINED)
        else:
            types.append(gguf.TokenType.NORMAL)
        tokens.append(text)

    kv.add_tokenizer_model("gpt2")
    kv.add_tokenizer_pre(pre)
    kv.add_token_list(tokens)
    kv.add_token_types(types)
    gguf.SpecialVocab(model_dir, load_merges=True).add_to_gguf(kv, quiet=True)


def spm_vocab(model_dir: Path, vocab_size: int | None, kv: gguf.GGUFWriter, added_as_written: bool = False) -> None:
    """tokenizer.ggml.model "llama": SentencePiece pieces with scores and types. Added tokens as
    the converter's _set_vocab_sentencepiece takes them, or (`added_as_written`, its Phi-3 reading)
    every added token of tokenizer_config.json and tokenizer.json as written, control if special."""
    path = model_dir / "tokenizer.model"
    sp = load_spm(path)
    n = vocab_size or sp.vocab_size()
    tokens = [f"[PAD{i}]".encode() for i in range(n)]
    scores = [-10000.0] * n
    types = [gguf.TokenType.UNUSED] * n
    for i in range(min(sp.vocab_size(), n)):
        t = gguf.TokenType.NORMAL
        if sp.IsUnknown(i):
            t = gguf.TokenType.UNKNOWN
        elif sp.IsControl(i):
            t = gguf.TokenType.CONTROL
        elif sp.IsUnused(i):
            t = gguf.TokenType.UNUSED
        elif sp.IsByte(i):
            t = gguf.TokenType.BYTE
        tokens[i], scores[i], types[i] = sp.IdToPiece(i).encode("utf-8"), sp.GetScore(i), t
    for text, i in _json_or_empty(model_dir / "added_tokens.json").items():
        if isinstance(i, int) and 0 <= i < n:
            tokens[i], scores[i], types[i] = text.encode("utf-8"), -1000.0, gguf.TokenType.USER_DEFINED
    decoder = _json_or_empty(model_dir / "tokenizer_config.json").get("added_tokens_decoder", {})
    added = list(decoder.items()) if isinstance(decoder, dict) else []
    if added_as_written:
        listed = _json_or_empty(model_dir / "tokenizer.json").get("added_tokens", [])
        added += [(data.get("id"), data) for data in listed if isinstance(data, dict)] if isinstance(listed, list) else []
    for key, data in added:
        i = int(key) if isinstance(key, int) or (isinstance(key, str) and key.isdigit()) else -1
        if not 0 <= i < n or not isinstance(data, dict) or not isinstance(data.get("content"), str):
            continue  # an id out of the vocabulary, or a malformed entry: as the converter, nothing to write
        text = data["content"]
        if added_as_written:
            types[i] = gguf.TokenType.CONTROL if data.get("special") else gguf.TokenType.USER_DEFINED
        elif data.get("special") or _looks_special(text):
            types[i] = gguf.TokenType.CONTROL
        else:
            text = text.replace("\u2581", " ")
            types[i] = gguf.TokenType.USER_DEFINED
        scores[i], tokens[i] = -1000.0, text.encode("utf-8")
    kv.add_tokenizer_model("llama")
    kv.add_tokenizer_pre("default")
    kv.add_token_list(tokens)
    kv.add_token_scores(scores)
    kv.add_token_types(types)
    gguf.SpecialVocab(model_dir, n_vocab=len(tokens)).add_to_gguf(kv, quiet=True)


def added_bos(model_dir: Path, n_vocab: int | None) -> int | None:
    """The BOS id when the tokenizer adds one at the start of a text, as llama.cpp sees it
    (tokenizer.ggml.add_bos_token and bos_token_id, gathered by gguf's SpecialVocab from the
    tokenizer files, as bpe_vocab / spm_vocab write them); None when it adds none."""
    sv = gguf.SpecialVocab(model_dir, load_merges=False, n_vocab=n_vocab)
    bos = sv.special_token_ids.get("bos")
    return int(bos) if sv.add_special_token.get("bos") and bos is not None else None


def spm_piece_count(model_dir: Path, vocab_size: int | None) -> int:
    return vocab_size or load_spm(model_dir / "tokenizer.model").vocab_size()


def _json_or_empty(path: Path) -> dict:
    if not path.is_file():
        return {}
    data = read_json(path)
    return data if isinstance(data, dict) else {}
