"""Data for training and translation (§5.1): parallel text files, a shared sentencepiece vocabulary,
the synthetic copy / reverse / sort tasks of the demo, and BLEU with sacrebleu.

Token ids follow the model's defaults: 0 = padding, 1 = begin of sentence, 2 = end of sentence;
sentencepiece puts its unknown piece at 3 and learned pieces after it."""

import os
import random

from aiayn.errors import UserInputError

PAD_ID, BOS_ID, EOS_ID, UNK_ID = 0, 1, 2, 3
SYNTHETIC_TASKS = ("copy", "reverse", "sort")


def read_lines(path, what="file"):
    """The lines of a UTF-8 text file without their line ends; every line must hold text."""
    if not os.path.isfile(path):
        raise UserInputError(f"{what} {path!r} does not exist" if not os.path.exists(path)
                             else f"{what} {path!r} is not a regular file")
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except UnicodeDecodeError as e:
        raise UserInputError(f"{what} {path!r} is not UTF-8 text (byte {e.start})") from None
    if not lines:
        raise UserInputError(f"{what} {path!r} is empty")
    for number, line in enumerate(lines, 1):
        if not line.strip():
            raise UserInputError(f"{what} {path!r} line {number} is empty (every line must hold one sentence)")
    return lines


def read_parallel(src_path, tgt_path):
    """Source and target sentences, one per line, aligned by line number."""
    src = read_lines(src_path, "source file")
    tgt = read_lines(tgt_path, "target file")
    if len(src) != len(tgt):
        raise UserInputError(f"source file {src_path!r} has {len(src)} lines but target file {tgt_path!r} "
                             f"has {len(tgt)}; parallel files need one sentence per line on both sides")
    return src, tgt


class Vocabulary:
    """A shared source/target subword vocabulary (BPE or unigram) learned with sentencepiece (§5.1:
    the paper shares ~37000 byte-pair tokens between English and German)."""

    def __init__(self, model_path):
        import sentencepiece as spm

        if not os.path.isfile(model_path):
            raise UserInputError(f"vocabulary {model_path!r} does not exist")
        self.path = model_path
        self.sp = spm.SentencePieceProcessor()
        try:
            self.sp.Load(model_path)
        except (OSError, RuntimeError) as e:
            raise UserInputError(f"vocabulary {model_path!r} is not a sentencepiece model ({e})") from None
        if (self.sp.pad_id(), self.sp.bos_id(), self.sp.eos_id()) != (PAD_ID, BOS_ID, EOS_ID):
            raise UserInputError(f"vocabulary {model_path!r} does not use pad=0, bos=1, eos=2")

    @classmethod
    def train(cls, paths, model_prefix, vocab_size=8000, model_type="bpe", max_sentences=2_000_000, seed=1):
        """Learns one vocabulary from all `paths` together and writes `model_prefix`.model. The size is
        an upper bound on small corpora (sentencepiece stops when no more pieces can be learned)."""
        import sentencepiece as spm

        if model_type not in ("bpe", "unigram"):
            raise UserInputError(f"vocabulary type must be 'bpe' or 'unigram', not {model_type!r}")
        if hasattr(spm, "set_random_generator_seed"):
            spm.set_random_generator_seed(seed)
        spm.SentencePieceTrainer.Train(
            input=list(paths), model_prefix=model_prefix, vocab_size=vocab_size, model_type=model_type,
            pad_id=PAD_ID, bos_id=BOS_ID, eos_id=EOS_ID, unk_id=UNK_ID, character_coverage=1.0,
            hard_vocab_limit=False, input_sentence_size=max_sentences, shuffle_input_sentence=True,
            num_threads=os.cpu_count() or 1, minloglevel=2)
        return cls(model_prefix + ".model")

    def __len__(self):
        return self.sp.GetPieceSize()

    def encode(self, text):
        return self.sp.EncodeAsIds(text)

    def decode(self, ids):
        return self.sp.DecodeIds(list(ids))


def synthetic_pairs(task, count, *, min_len=1, max_len=20, num_symbols=10, seed=0):
    """`count` (source, target) token-id pairs of a synthetic task: `copy` (target = source),
    `reverse` (target = source reversed) or `sort` (target = source sorted). Symbols are ids
    EOS_ID + 1 ... EOS_ID + num_symbols; nothing is downloaded."""
    if task not in SYNTHETIC_TASKS:
        raise UserInputError(f"task must be one of {', '.join(SYNTHETIC_TASKS)}, not {task!r}")
    rng = random.Random(seed)
    first = EOS_ID + 1
    pairs = []
    for _ in range(count):
        src = [rng.randrange(first, first + num_symbols) for _ in range(rng.randint(min_len, max_len))]
        tgt = src[:] if task == "copy" else src[::-1] if task == "reverse" else sorted(src)
        pairs.append((src, tgt))
    return pairs


def corpus_bleu(hypotheses, references):
    """Corpus BLEU (sacrebleu's default 13a tokenization) of detokenized hypotheses against one
    reference each."""
    import sacrebleu

    return sacrebleu.corpus_bleu(list(hypotheses), [list(references)]).score
