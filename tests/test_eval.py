"""gpt2cu/eval.py and dev/data/hellaswag.py: llm.c's eval file (exact layout, round trip, every error),
HellaSwag batching (masking, left truncation, rank sharding with uneven division), scoring through a
fake model whose losses we control, the whole path on a tiny numpy GPT against an independent
reference, and the validation loss."""
from __future__ import annotations

import importlib.util
import json
import os

import numpy as np
import pytest

from gpt2cu.backends.numpy_ops import NumpyBackend
from gpt2cu.eval import (EvalFileError, Example, count_correct, evaluate_hellaswag, evaluate_val_loss,
                         hellaswag_batches, read_eval_file, write_eval_file)
from gpt2cu.formats import EVAL_FILE, HEADER_BYTES
from gpt2cu.models.gpt2 import GPTConfig

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class FakeComm:
    """One simulated rank: the all-reduce is the identity, so summing results over ranks gives the total."""

    def __init__(self, rank=0, world_size=1):
        self.rank, self.world_size = rank, world_size

    def all_reduce_scalar(self, x):
        return float(x)


def random_examples(n, seed=0, max_ctx=10, max_end=6, vocab=500):
    rng = np.random.default_rng(seed)
    tokens = lambda k: tuple(int(t) for t in rng.integers(0, vocab, k))
    return [Example(label=int(rng.integers(4)), context=tokens(rng.integers(1, max_ctx + 1)),
                    endings=tuple(tokens(rng.integers(1, max_end + 1)) for _ in range(4))) for _ in range(n)]


# ---- the file format ----------------------------------------------------------------------------------
def test_layout_matches_llmc(tmp_path):
    path = str(tmp_path / "e.bin")
    ex = Example(label=2, context=(10, 11, 12), endings=((1,), (2, 3), (4, 5, 6), (7,)))
    write_eval_file(path, [ex, ex])
    header = np.fromfile(path, dtype="<i4", count=256)
    record = [65535, 0, 0, 2, 4, 3, 10, 11, 12, 1, 1, 2, 2, 3, 3, 4, 5, 6, 1, 7]
    record[1] = 2 * len(record)
    assert header[:4].tolist() == [EVAL_FILE.magic, 1, 2, 2 * len(record)] and not header[4:].any()
    second = list(record)
    second[2] = 1  # the example index
    assert np.fromfile(path, dtype="<u2", offset=HEADER_BYTES).tolist() == record + second


def test_round_trip(tmp_path):
    path = str(tmp_path / "e.bin")
    examples = random_examples(37)
    write_eval_file(path, examples)
    assert read_eval_file(path) == examples


def _corrupt(tmp_path, edit):
    path = str(tmp_path / "e.bin")
    write_eval_file(path, random_examples(3))
    raw = bytearray(open(path, "rb").read())
    raw = edit(raw)
    open(path, "wb").write(bytes(raw))
    return path


def _set_u16(raw, index, value):
    raw[HEADER_BYTES + 2 * index:HEADER_BYTES + 2 * index + 2] = int(value).to_bytes(2, "little")
    return raw


@pytest.mark.parametrize("edit, needle", [
    (lambda r: r[:100], "truncated header"),
    (lambda r: b"\x00\x00\x00\x00" + r[4:], "bad magic"),
    (lambda r: r[:4] + (7).to_bytes(4, "little") + r[8:], "version 7"),
    (lambda r: r[:8] + (5).to_bytes(4, "little") + r[12:], "header says 5 examples, found 3"),
    (lambda r: r[:-4], "truncated"),
    (lambda r: r[:-1], "odd number of bytes"),
    (lambda r: r + b"\x01\x00", "trailing data"),
    (lambda r: _set_u16(r, 0, 12345), "START delimiter"),
    (lambda r: _set_u16(r, 2, 9), "index 9"),
    (lambda r: _set_u16(r, 3, 4), "label 4"),
    (lambda r: _set_u16(r, 4, 3), "3 completions"),
    (lambda r: _set_u16(r, 1, 2 * 7), "record"),
])
def test_format_errors_name_the_problem(tmp_path, edit, needle):
    path = _corrupt(tmp_path, edit)
    with pytest.raises(EvalFileError, match=needle) as e:
        read_eval_file(path)
    assert path in str(e.value)


def test_missing_file_and_unwritable_examples(tmp_path):
    with pytest.raises(FileNotFoundError, match="dev/data/hellaswag.py"):
        read_eval_file(str(tmp_path / "nope.bin"))
    good = random_examples(1)[0]
    for bad, needle in ((Example(0, (1,), ((1,),) * 3), "3 endings"),
                        (Example(5, good.context, good.endings), "label 5"),
                        (Example(0, (), good.endings), "empty"),
                        (Example(0, (65535,), good.endings), "tokens must be")):
        with pytest.raises(ValueError, match=needle):
            write_eval_file(str(tmp_path / "x.bin"), [bad])


# ---- batching -----------------------------------------------------------------------------------------
def test_rows_and_targets_cover_the_ending_only():
    ex = Example(label=1, context=(5, 6, 7), endings=((8,), (9, 10), (11, 12, 13), (14,)))
    (inputs, targets, labels), = hellaswag_batches([ex], B=8, T=8)
    assert labels.tolist() == [1, -1]
    assert inputs[2].tolist() == [5, 6, 7, 11, 12, 13, 0, 0]
    # position 2 (last context token) predicts the ending's first token, and so on
    assert targets[2].tolist() == [-1, -1, 11, 12, 13, -1, -1, -1]
    assert targets[0].tolist() == [-1, -1, 8, -1, -1, -1, -1, -1]
    assert (targets[4:] == -1).all()  # the empty slot scores nothing


def test_long_examples_are_cut_from_the_left():
    ex = Example(label=0, context=tuple(range(100, 110)), endings=((1, 2, 3), (4,), (5, 6, 7, 8, 9, 10), (11,)))
    with pytest.warns(UserWarning, match="truncated from the left"):
        (inputs, targets, _), = hellaswag_batches([ex], B=4, T=5)
    assert inputs[0].tolist() == [108, 109, 1, 2, 3]
    assert targets[0].tolist() == [-1, 1, 2, 3, -1]
    # an ending longer than T keeps its last T tokens; the first kept one has no predecessor to score it
    assert inputs[2].tolist() == [6, 7, 8, 9, 10] and targets[2].tolist() == [7, 8, 9, 10, -1]


def test_batch_size_must_hold_whole_examples():
    with pytest.raises(ValueError, match="multiple of 4"):
        next(hellaswag_batches(random_examples(2), B=6, T=16))
    with pytest.raises(ValueError, match="multiple of 4"):
        next(hellaswag_batches(random_examples(2), B=2, T=16))


@pytest.mark.parametrize("n, world, B", [(7, 3, 8), (10, 4, 4), (2, 3, 4), (9, 1, 8)])
def test_ranks_share_examples_and_run_equal_batch_counts(n, world, B):
    # example i is recognizable by its first context token 1000 + i
    examples = [Example(0, (1000 + i, 1), ex.endings) for i, ex in enumerate(random_examples(n))]
    counts = []
    for rank in range(world):
        batches = list(hellaswag_batches(examples, B, 32, rank, world))
        counts.append(len(batches))
        mine = [int(inputs[4 * slot, 0]) - 1000
                for inputs, _, labels in batches for slot in np.flatnonzero(labels >= 0)]
        assert mine == list(range(rank, n, world))
    per_rank = -(-n // world)
    assert counts == [-(-per_rank // (B // 4))] * world


# ---- scoring ------------------------------------------------------------------------------------------
GOOD, BAD = 7, 9  # ending tokens the fake model likes / dislikes


class FakeModel:
    """Per-token loss 1.0 for predicting GOOD, 2.0 for anything else; a huge negative 'loss' at unscored
    positions, which would win every argmin if the scorer did not mask them. Counts its forwards."""

    def __init__(self, B, T):
        self.B, self.T, self.calls = B, T, 0
        self.acts = {"losses": np.zeros((B, T), np.float32)}

    def forward(self, batch, dloss=0.0):
        assert dloss == 0.0
        self.calls += 1
        targets = batch.targets
        self.acts["losses"][...] = np.where(targets == GOOD, 1.0, np.where(targets >= 0, 2.0, -1e6))


def planted_examples(n, wrong_labels):
    """The GOOD ending (6 tokens: mean loss 1, sum 6) competes with short BAD ones (2 tokens: mean 2,
    sum 4), so acc_norm (mean) picks it where a sum would not. Examples in wrong_labels carry a label
    that is not the GOOD ending."""
    rng = np.random.default_rng(1)
    out = []
    for i in range(n):
        best = int(rng.integers(4))
        endings = tuple((GOOD,) * 6 if c == best else (BAD,) * 2 for c in range(4))
        label = (best + 1) % 4 if i in wrong_labels else best
        out.append(Example(label=label, context=tuple(int(t) for t in rng.integers(0, 50, 5)), endings=endings))
    return out


def test_count_correct_masks_and_normalizes():
    examples = planted_examples(2, wrong_labels={1})
    (inputs, targets, labels), = hellaswag_batches(examples, 8, 16)
    model = FakeModel(8, 16)
    model.forward(NumpyBackend().set_batch(inputs, targets))
    assert count_correct(model.acts["losses"], targets, labels) == 1


@pytest.mark.parametrize("world", [1, 3])
def test_fake_model_accuracy_over_uneven_ranks(world):
    examples = planted_examples(10, wrong_labels={2, 5, 9})  # 10 examples, 3 mislabelled, 2 per batch
    total, calls = 0.0, []
    for rank in range(world):
        model = FakeModel(8, 16)
        total += evaluate_hellaswag(model, NumpyBackend(), examples, FakeComm(rank, world))
        calls.append(model.calls)
    assert total == pytest.approx(0.7)
    assert len(set(calls)) == 1  # every rank ran the same number of forwards


# ---- the whole path on a real (tiny) numpy GPT --------------------------------------------------------
CFG = GPTConfig(n_layer=1, n_head=2, n_embd=16, max_seq_len=32, vocab_size=500, padded_vocab_size=512)


def tiny_model(B, T, seed=3):
    from gpt2cu.models.gpt2 import GPT, init_params
    backend = NumpyBackend()
    params = init_params(CFG, seed=seed)
    params += np.random.default_rng(seed).normal(0, 0.5, params.shape).astype(np.float32)  # sharper preferences
    return GPT(CFG, backend, B, T, params), backend


def reference_predictions(examples):
    """Each ending scored alone at B=1 from the logits, by a log-softmax written here."""
    preds = []
    for ex in examples:
        mean_nll = []
        for ending in ex.endings:
            row = list(ex.context + ending)
            model, _ = tiny_model(1, len(row))
            model.forward(model.ops.set_batch(np.array([row], np.int32)))
            z = model.logits()[0, :, :CFG.vocab_size].astype(np.float64)
            logp = z - z.max(-1, keepdims=True)
            logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
            n_ctx = len(ex.context)
            mean_nll.append(-np.mean([logp[j - 1, row[j]] for j in range(n_ctx, len(row))]))
        preds.append(int(np.argmin(mean_nll)))
    return preds


def test_numpy_gpt_matches_reference_scoring():
    examples = random_examples(5, seed=4, max_ctx=8, max_end=5)
    preds = reference_predictions(examples)
    for world in (1, 2):
        for shift, expected in ((0, 1.0), (1, 0.0)):  # labels = the reference's choice, then never it
            relabelled = [Example((p + shift) % 4, ex.context, ex.endings) for ex, p in zip(examples, preds)]
            acc = 0.0
            for rank in range(world):
                model, backend = tiny_model(8, 16)  # 2 examples per batch: 5 examples take 3 (or 2) batches
                acc += evaluate_hellaswag(model, backend, relabelled, FakeComm(rank, world))
            assert acc == pytest.approx(expected)


# ---- validation loss ----------------------------------------------------------------------------------
def test_val_loss_is_the_mean_over_batches_from_the_start(tmp_path):
    from gpt2cu.data import DataLoader, write_shard
    write_shard(str(tmp_path / "val.bin"), np.random.default_rng(0).integers(0, 500, 4 * 8 * 5 + 1))
    loader = DataLoader(str(tmp_path / "val.bin"), 4, 8)
    assert loader.num_batches_per_epoch == 5
    model, backend = tiny_model(4, 8)
    expected = []
    for _ in range(5):
        x, y = loader.next_batch()
        model.forward(model.ops.set_batch(x, y))
        expected.append(float(model.acts["losses"].mean()))
    loader.next_batch()  # leave the loader mid-epoch: evaluation must start from the beginning anyway
    assert evaluate_val_loss(model, backend, loader, 2, FakeComm()) == pytest.approx(np.mean(expected[:2]))
    assert evaluate_val_loss(model, backend, loader, -1, FakeComm()) == pytest.approx(np.mean(expected))
    assert evaluate_val_loss(model, backend, loader, 100, FakeComm()) == pytest.approx(np.mean(expected))
    # two ranks: each contributes its mean / world_size through the summing all-reduce
    halves = evaluate_val_loss(model, backend, loader, -1, FakeComm(0, 2))
    assert halves == pytest.approx(np.mean(expected) / 2)
    with pytest.raises(ValueError, match="-1"):
        evaluate_val_loss(model, backend, loader, 0, FakeComm())


# ---- dev/data/hellaswag.py ----------------------------------------------------------------------------
def test_dev_script_tokenizes_like_llmc(tmp_path):
    spec = importlib.util.spec_from_file_location("hellaswag_dev", os.path.join(REPO, "dev", "data", "hellaswag.py"))
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    from gpt2cu.tokenizer import encode
    items = [{"ctx": "A man is sitting on a roof. he", "label": 3,
              "endings": ["is using wrap to wrap a pair of skis.", "is ripping level tiles off.",
                          "is holding a rubik's cube.", "starts pulling up roofing on a roof."]},
             {"ctx": "Then", "label": "1", "endings": ["a", "b", "c", "d"]}]
    src, out = tmp_path / "val.jsonl", tmp_path / "out" / "val.bin"
    src.write_text("".join(json.dumps(i) + "\n" for i in items))
    assert script.main(["--input", str(src), "--output", str(out)]) == 0
    got = read_eval_file(str(out))
    assert [e.label for e in got] == [3, 1]
    assert got[0].context == tuple(encode(items[0]["ctx"]))
    assert got[0].endings == tuple(tuple(encode(" " + e)) for e in items[0]["endings"])
    src.write_text('{"ctx": "x"}\n')
    with pytest.raises(SystemExit, match="val.jsonl:1"):
        script.main(["--input", str(src), "--output", str(out)])
