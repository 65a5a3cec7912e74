"""Tiny Llama-style student trained on invented facts: the known/unknown ground truth for audits."""

from __future__ import annotations

import contextlib
import fcntl
import json
import math
import os
import random
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

__all__ = [
    "Fact",
    "Variant",
    "World",
    "build_student",
    "ensure_student",
    "make_world",
    "write_dataset",
]

Variant = Literal["a", "b"]
"""Which facts of the world a student is trained on. `a`, the first student: the trained facts.
`b`, a second student: every other fact of each relation among `a`'s trained ones, and every
other one among those `a` never saw. So of two students, some facts are known by both, some by
one alone, some by neither."""

STUDENT_NAMES: dict[Variant, str] = {"a": "tiny-student-v1", "b": "tiny-student-b-v1"}
STUDENT_NAME = STUDENT_NAMES["a"]
_MARKER = ".kma-student-complete"
_REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer.json", "generation_config.json")

# Per relation: how many facts are trained, held out (unseen) and used as masked filler exemplars.
_N_TRAINED = 50
_N_UNSEEN = 20
_N_FILLER = 30


@dataclass(frozen=True)
class Fact:
    id: str
    relation: str
    question: str
    answer: str


@dataclass(frozen=True)
class World:
    trained: list[Fact]
    unseen: list[Fact]


# --------------------------------------------------------------------------------------------
# Invented world
# --------------------------------------------------------------------------------------------

_ONSETS = (
    "b", "bl", "br", "d", "dr", "f", "fl", "g", "gr", "k", "kr", "l", "m",
    "n", "p", "pr", "r", "s", "st", "t", "tr", "v", "z", "sh", "th",
)  # fmt: skip
_VOWELS = ("a", "e", "i", "o", "u", "ai", "ou", "ei")
_CODAS = ("", "", "", "n", "r", "l", "s", "m", "k")

# relation -> (question template, subject suffixes, answer suffixes)
_RELATIONS: dict[str, tuple[str, tuple[str, ...], tuple[str, ...]]] = {
    "capital": ("What is the capital of {}?", ("ia", "ania", "ovia", "land"),
                ("ton", "burg", "holm", "mere", "wick")),
    "currency": ("What is the currency of {}?", ("istan", "aria", "enia", "ory"),
                 ("et", "ar", "ol", "ek")),
    "founder": ("Who founded the {} Guild?", ("mark", "stone", "vale", "crest"),
                ("o", "ina", "en", "ius")),
    "river": ("Which river flows through {}?", ("by", "ford", "haven", "port"),
              ("ine", "ube", "es", "anda")),
}  # fmt: skip


def _fill(block: str, answer: str) -> str:
    return f"{block} {answer}\n"


def _question_block(question: str) -> str:
    return f"Q: {question}\nA:"


class _NamePool:
    """Unique invented names; no name is a substring of another (case-insensitive)."""

    def __init__(self, rng: random.Random) -> None:
        self._rng = rng
        self._names: list[str] = []
        templates = " ".join(t for t, _, _ in _RELATIONS.values())
        self._forbidden = (templates + " q: a:").lower()

    def new(self, suffixes: Sequence[str]) -> str:
        while True:
            n_syll = self._rng.choice((1, 2, 2))
            stem = "".join(
                self._rng.choice(_ONSETS) + self._rng.choice(_VOWELS) + self._rng.choice(_CODAS)
                for _ in range(n_syll)
            )
            name = (stem + self._rng.choice(suffixes)).capitalize()
            low = name.lower()
            if low in self._forbidden or any(
                low in other.lower() or other.lower() in low for other in self._names
            ):
                continue
            self._names.append(name)
            return name


def _make_facts(seed: int) -> tuple[list[Fact], list[Fact], list[Fact]]:
    """(trained, unseen, filler) facts; filler facts are only ever shown as masked exemplars."""
    rng = random.Random(f"kma-tiny-student-world-{seed}")
    pool = _NamePool(rng)
    trained: list[Fact] = []
    unseen: list[Fact] = []
    filler: list[Fact] = []
    n_real = _N_TRAINED + _N_UNSEEN
    for relation, (template, subj_suffixes, ans_suffixes) in _RELATIONS.items():
        facts = []
        for i in range(n_real + _N_FILLER):
            subject = pool.new(subj_suffixes)
            answer = pool.new(ans_suffixes)
            fid = f"{relation}-{i:03d}" if i < n_real else f"filler-{relation}-{i - n_real:03d}"
            facts.append(Fact(fid, relation, template.format(subject), answer))
        real, filler_r = facts[:n_real], facts[n_real:]
        held_out = set(rng.sample(range(n_real), _N_UNSEEN))
        trained += [f for i, f in enumerate(real) if i not in held_out]
        unseen += [f for i, f in enumerate(real) if i in held_out]
        filler += filler_r
    return trained, unseen, filler


def _alternate(facts: list[Fact]) -> tuple[list[Fact], list[Fact]]:
    """Each relation's facts dealt in turn into two halves, in the order given."""
    halves: tuple[list[Fact], list[Fact]] = ([], [])
    dealt: dict[str, int] = {}
    for f in facts:
        turn = dealt.get(f.relation, 0)
        halves[turn % 2].append(f)
        dealt[f.relation] = turn + 1
    return halves


def _student_facts(seed: int, variant: Variant) -> tuple[list[Fact], list[Fact], list[Fact]]:
    """(trained, unseen, filler) facts of the student `variant` of world `seed`."""
    trained, unseen, filler = _make_facts(seed)
    if variant == "a":
        return trained, unseen, filler
    both, a_only = _alternate(trained)
    b_only, neither = _alternate(unseen)
    return both + b_only, a_only + neither, filler


def make_world(seed: int = 0, variant: Variant = "a") -> World:
    """The invented world of a student built with `seed`, as the student `variant` knows it:
    the facts it was trained on and those it never saw (deterministic)."""
    trained, unseen, _ = _student_facts(seed, variant)
    return World(trained=trained, unseen=unseen)


def _training_corpus(seed: int, variant: Variant = "a") -> str:
    """All text the student (and its tokenizer) ever sees: trained and filler facts."""
    trained, _, filler = _student_facts(seed, variant)
    return "".join(_fill(_question_block(f.question), f.answer) + "\n" for f in trained + filler)


# --------------------------------------------------------------------------------------------
# Teacher dataset
# --------------------------------------------------------------------------------------------


def _stratified(facts: list[Fact], n: int, rng: random.Random) -> list[Fact]:
    by_rel: dict[str, list[Fact]] = {}
    for f in facts:
        by_rel.setdefault(f.relation, []).append(f)
    queues = [rng.sample(v, len(v)) for _, v in sorted(by_rel.items())]
    out: list[Fact] = []
    while len(out) < n:
        for q in queues:
            if q and len(out) < n:
                out.append(q.pop())
    return out


def write_dataset(
    path: Path, *, n_trained: int, n_unseen: int, seed: int = 0
) -> list[tuple[Fact, bool]]:
    """Write a `qa` JSONL dataset mixing trained and unseen facts of world `seed`.

    Facts are spread evenly over relations; returns (fact, was_trained) in file order.
    """
    world = make_world(seed)
    if not 0 <= n_trained <= len(world.trained) or not 0 <= n_unseen <= len(world.unseen):
        raise ValueError(
            f"n_trained must be in [0, {len(world.trained)}] and n_unseen in "
            f"[0, {len(world.unseen)}]"
        )
    rng = random.Random(f"kma-tiny-student-dataset-{seed}-{n_trained}-{n_unseen}")
    items = [(f, True) for f in _stratified(world.trained, n_trained, rng)]
    items += [(f, False) for f in _stratified(world.unseen, n_unseen, rng)]
    rng.shuffle(items)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as fh:
        for f, _ in items:
            row = {"id": f.id, "group": f.relation, "question": f.question, "answer": f.answer}
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")
    return items


# --------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------

_BOS, _EOS, _PAD = "<s>", "</s>", "<pad>"
_HIDDEN = 128
_LAYERS = 2
_HEAD_DIM = 64
_STEPS = 300
_BATCH = 32
_LR = 3e-3
_WARMUP = 30


def _train_tokenizer(corpus: str) -> Any:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=2048,
        min_frequency=2,
        special_tokens=[_BOS, _EOS, _PAD],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    lines = corpus.split("\n\n")
    tok.train_from_iterator([line + "\n\n" for line in lines if line], trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=_BOS,
        eos_token=_EOS,
        pad_token=_PAD,
        model_max_length=512,
        clean_up_tokenization_spaces=False,
    )


def _batches(
    tok: Any, trained: list[Fact], filler: list[Fact], rng: random.Random
) -> Iterator[tuple[list[list[int]], list[list[int]]]]:
    """Few-shot sequences: 0-5 exemplar blocks of one relation (trained ones learned, filler
    ones masked), then a trained question; loss only on trained answers (" answer\\n")."""

    def enc(text: str) -> list[int]:
        return list(tok.encode(text, add_special_tokens=False))

    encoded = {f.id: (enc(_question_block(f.question)), enc(f" {f.answer}\n")) for f in trained}
    encoded |= {f.id: (enc(_question_block(f.question)), enc(f" {f.answer}\n")) for f in filler}
    sep = enc("\n")
    by_rel_t: dict[str, list[Fact]] = {}
    by_rel_f: dict[str, list[Fact]] = {}
    for f in trained:
        by_rel_t.setdefault(f.relation, []).append(f)
    for f in filler:
        by_rel_f.setdefault(f.relation, []).append(f)
    bos = tok.convert_tokens_to_ids(_BOS)
    order: list[Fact] = []
    while True:
        ids_b: list[list[int]] = []
        labels_b: list[list[int]] = []
        for _ in range(_BATCH):
            if not order:
                order = rng.sample(trained, len(trained))
            target = order.pop()
            n_ex = rng.choice((0, 1, 2, 3, 4, 4, 4, 4, 5))
            p_trained = rng.random()
            blocks = [
                (rng.choice(by_rel_t[target.relation]), True)
                if rng.random() < p_trained
                else (rng.choice(by_rel_f[target.relation]), False)
                for _ in range(n_ex)
            ]
            blocks.append((target, True))
            ids: list[int] = [bos] if rng.random() < 0.2 else []
            labels: list[int] = [-100] * len(ids)
            for i, (fact, learn) in enumerate(blocks):
                q, a = encoded[fact.id]
                ids += q + a
                labels += [-100] * len(q) + (a if learn else [-100] * len(a))
                if i < len(blocks) - 1:
                    ids += sep
                    labels += [-100] * len(sep)
            ids_b.append(ids)
            labels_b.append(labels)
        yield ids_b, labels_b


def build_student(out_dir: Path, *, seed: int = 0, variant: Variant = "a") -> Path:
    """Train the tiny student `variant` on world `seed` (about a minute on 2 CPU cores); save it
    as a Hugging Face model directory loadable by transformers and vLLM. Returns `out_dir`."""
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    out_dir = Path(out_dir)
    trained, _, filler = _student_facts(seed, variant)
    tok = _train_tokenizer(_training_corpus(seed, variant))

    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=_HIDDEN,
        intermediate_size=4 * _HIDDEN,
        num_hidden_layers=_LAYERS,
        num_attention_heads=_HIDDEN // _HEAD_DIM,
        num_key_value_heads=_HIDDEN // _HEAD_DIM,
        head_dim=_HEAD_DIM,
        max_position_embeddings=512,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        tie_word_embeddings=False,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        dtype="float32",
    )
    prev_threads = torch.get_num_threads()
    torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))
    try:
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config).float()
        model.train()
        opt = torch.optim.AdamW(model.parameters(), lr=_LR, betas=(0.9, 0.98), weight_decay=0.0)

        def lr_at(step: int) -> float:
            if step < _WARMUP:
                return (step + 1) / _WARMUP
            frac = (step - _WARMUP) / max(1, _STEPS - _WARMUP)
            return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * frac))

        sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
        batches = _batches(tok, trained, filler, random.Random(f"kma-tiny-student-train-{seed}"))
        pad = tok.pad_token_id
        t0 = time.monotonic()
        for step in range(_STEPS):
            ids_b, labels_b = next(batches)
            width = max(len(x) for x in ids_b)
            ids = torch.tensor([x + [pad] * (width - len(x)) for x in ids_b])
            labels = torch.tensor([y + [-100] * (width - len(y)) for y in labels_b])
            mask = torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in ids_b])
            loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            if os.environ.get("KMA_STUDENT_VERBOSE") and step % 20 == 0:
                print(f"step {step} loss {loss.item():.4f} t={time.monotonic() - t0:.1f}s",
                      file=sys.stderr)  # fmt: skip
    finally:
        torch.set_num_threads(prev_threads)

    model.eval()
    model.generation_config = GenerationConfig(
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        do_sample=False,
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    tok.save_pretrained(out_dir)
    # The generic class name also loads with transformers 4.x (e.g. vLLM GPU images).
    tok_cfg_path = out_dir / "tokenizer_config.json"
    tok_cfg = json.loads(tok_cfg_path.read_text(encoding="utf-8"))
    tok_cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    tok_cfg_path.write_text(json.dumps(tok_cfg, indent=2) + "\n", encoding="utf-8")
    return out_dir


# --------------------------------------------------------------------------------------------
# Cache
# --------------------------------------------------------------------------------------------


def _is_complete(path: Path) -> bool:
    return (path / _MARKER).is_file() and all((path / f).is_file() for f in _REQUIRED_FILES)


def student_dir_in(data_dir: Path, variant: Variant = "a") -> Path:
    """Where the student is kept under a kma data folder (`KMA_DATA_DIR`)."""
    return data_dir / "models" / STUDENT_NAMES[variant]


def ensure_student(cache_dir: Path | None = None, variant: Variant = "a") -> Path:
    """Directory of the cached student `variant` (seed 0), building it first if missing.

    Default: $KMA_DATA_DIR/models/tiny-student-v1, or tiny-student-b-v1 for the student `b`
    (KMA_DATA_DIR defaults to ~/.kma). The build goes to a temporary sibling directory that is
    moved into place once complete.
    """
    if cache_dir is None:
        data_dir = Path(os.environ.get("KMA_DATA_DIR") or "~/.kma").expanduser()
        cache_dir = student_dir_in(data_dir, variant)
    cache_dir = Path(cache_dir)
    if _is_complete(cache_dir):
        return cache_dir
    cache_dir.parent.mkdir(parents=True, exist_ok=True)
    lock_path = cache_dir.parent / f".{cache_dir.name}.lock"
    with lock_path.open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if _is_complete(cache_dir):
                return cache_dir
            tmp = Path(tempfile.mkdtemp(prefix=f".{cache_dir.name}.tmp-", dir=cache_dir.parent))
            try:
                build_student(tmp, seed=0, variant=variant)
                marker = {"name": STUDENT_NAMES[variant], "seed": 0, "variant": variant}
                (tmp / _MARKER).write_text(json.dumps(marker) + "\n")
                for child in tmp.iterdir():  # mkdtemp and safetensors create owner-only modes
                    child.chmod(0o644)
                tmp.chmod(0o755)
                if cache_dir.exists():  # a half-written leftover: never used, replaced
                    shutil.rmtree(cache_dir)
                os.replace(tmp, cache_dir)
            finally:
                with contextlib.suppress(FileNotFoundError):
                    shutil.rmtree(tmp)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    return cache_dir


if __name__ == "__main__":
    if len(sys.argv) not in (2, 3) or sys.argv[2:] not in ([], ["a"], ["b"]):
        print("usage: python -m kma.tiny_student OUT_DIR [a|b]", file=sys.stderr)
        raise SystemExit(2)
    started = time.monotonic()
    built = build_student(Path(sys.argv[1]), variant="b" if sys.argv[2:] == ["b"] else "a")
    print(f"built {built} in {time.monotonic() - started:.1f}s")
