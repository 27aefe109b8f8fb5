"""The zoo tokenizer: byte-level BPE trained with `tokenizers` on the committed corpus.

``python -m workbench.models.tokenizer train`` writes ``data/tokenizer/tokenizer.json`` (plus
the transformers side files); :func:`load` returns it as a ``PreTrainedTokenizerFast``. Every
zoo model directory holds a copy, so ``AutoTokenizer.from_pretrained(model_dir)`` works too.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from workbench.errors import ModelLoadError

TOKENIZER_DIR = Path(__file__).resolve().parents[2] / "data" / "tokenizer"
VOCAB_SIZE = 4096
EOS = "<|endoftext|>"
PAD = "<|pad|>"
TRAIN_COMMAND = "python -m workbench.models.tokenizer train"


def train(out_dir: str | Path | None = None, vocab_size: int = VOCAB_SIZE):
    """Train the byte-level BPE on the corpus's train split and save it; returns the tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from workbench.models.corpus import load_split

    docs = load_split("train")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[EOS, PAD],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator((d.text for d in docs), trainer=trainer, length=len(docs))
    fast = wrap(tok)
    out = Path(out_dir) if out_dir is not None else TOKENIZER_DIR
    out.mkdir(parents=True, exist_ok=True)
    save(fast, out)
    return fast


def save(tok, out_dir: str | Path) -> None:
    """Save `tok` so that transformers 5.x loads it as a PreTrainedTokenizerFast."""
    import json

    out = Path(out_dir)
    tok.save_pretrained(str(out))
    cfg_path = out / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    for k in ("is_local", "local_files_only"):
        cfg.pop(k, None)
    cfg_path.write_text(json.dumps(cfg, indent=2) + "\n")


def wrap(tok):
    """A `tokenizers.Tokenizer` as a transformers PreTrainedTokenizerFast with our specials."""
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=EOS,
        eos_token=EOS,
        unk_token=None,
        pad_token=PAD,
        model_max_length=1 << 20,
        clean_up_tokenization_spaces=False,
    )


def load(path: str | Path | None = None):
    """The zoo tokenizer as a PreTrainedTokenizerFast (from data/tokenizer or `path`)."""
    from transformers import PreTrainedTokenizerFast

    d = Path(path) if path is not None else TOKENIZER_DIR
    f = d / "tokenizer.json"
    if not f.is_file():
        raise ModelLoadError(
            f"tokenizer file {f} is missing. Restore data/tokenizer from git or retrain it with "
            f"`{TRAIN_COMMAND}`."
        )
    try:
        return PreTrainedTokenizerFast.from_pretrained(str(d))
    except Exception as e:  # tokenizers raises plain Exceptions on damaged JSON
        raise ModelLoadError(
            f"tokenizer file {f} could not be read ({e}). Restore it from git or retrain it "
            f"with `{TRAIN_COMMAND}`."
        ) from e


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m workbench.models.tokenizer")
    sub = p.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train")
    t.add_argument("--vocab-size", type=int, default=VOCAB_SIZE)
    t.add_argument("--out", default=None)
    args = p.parse_args(argv)
    tok = train(args.out, args.vocab_size)
    print(f"vocab {len(tok)} saved to {args.out or TOKENIZER_DIR}")


if __name__ == "__main__":
    main()
