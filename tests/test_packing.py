"""Packed documents (data/packing.py): windows with EOS separators and segment ids, positions restarting per
document, attention and loss kept inside each document: a packed batch scores every document as if alone."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from llmopt_jax.data.packing import (
    PackedBatches, load_documents, pack_documents, segment_positions, split_documents, target_weights,
)
from llmopt_jax.errors import ConfigError, DataError
from llmopt_jax.models.decoder import Decoder
from llmopt_jax.train.step import loss_fn, token_nll

EOS = 63


def test_pack_documents_layout():
    tokens, segments = pack_documents([[1, 2], [3, 4, 5], [6]], window=4, eos_id=EOS)
    # stream: 1 2 E 3 | 4 5 E 6 | E (dropped)
    np.testing.assert_array_equal(tokens, [[1, 2, EOS, 3], [4, 5, EOS, 6]])
    np.testing.assert_array_equal(segments, [[1, 1, 1, 2], [1, 1, 1, 2]])
    np.testing.assert_array_equal(segment_positions(jnp.asarray(segments)), [[0, 1, 2, 0], [0, 1, 2, 0]])
    # A target counts only when it continues its input's document.
    np.testing.assert_array_equal(target_weights(jnp.asarray(segments)), [[1, 1, 0], [1, 1, 0]])
    with pytest.raises(DataError, match="fewer than one window"):
        pack_documents([[1]], window=4, eos_id=EOS)
    with pytest.raises(ConfigError, match="EOS"):
        pack_documents([[1]], window=4, eos_id=None)


def test_split_and_load_documents(tmp_path):
    assert split_documents(["a\n\nb\n\n\n", "c"], "paragraphs") == ["a", "b", "c"]
    assert split_documents(["a\n\nb", "c"], "files") == ["a\n\nb", "c"]
    with pytest.raises(ConfigError, match="data.documents"):
        split_documents(["a"], "sentences")
    (tmp_path / "x.txt").write_text("one\n\ntwo")
    (tmp_path / "y.txt").write_text("three")
    paths = f"{tmp_path / 'x.txt'},{tmp_path / 'y.txt'}"
    assert load_documents(paths, "files") == ["one\n\ntwo", "three"]
    assert load_documents(paths, "paragraphs") == ["one", "two", "three"]


def test_packed_batches_resume():
    docs = [list(range(1, 1 + n)) for n in (3, 7, 2, 9, 4, 6, 5, 8)] * 3
    a = PackedBatches(docs, seq_len=7, batch_size=2, seed=3, eos_id=EOS)
    first = [a.next() for _ in range(3)]
    assert set(first[0]) == {"tokens", "segment_ids"} and first[0]["tokens"].shape == (2, 8)
    b = PackedBatches(docs, seq_len=7, batch_size=2, seed=3, eos_id=EOS)
    b.next()
    position = b.position()
    c = PackedBatches(docs, seq_len=7, batch_size=2, seed=3, eos_id=EOS)
    c.restore(position)
    np.testing.assert_array_equal(c.next()["tokens"], first[1]["tokens"])


def test_packed_loss_equals_each_document_alone(tiny_cfg):
    graphdef, params = nnx.split(Decoder(tiny_cfg, rngs=nnx.Rngs(params=0)))
    rng = np.random.default_rng(0)
    # With EOS: 5 + 7 + 4 + 10 + 9 tokens in two windows of 17: window 1 ends with the first token of the
    # fourth document, whose rest opens window 2; the fifth document is cut at the end of window 2.
    docs = [rng.integers(0, EOS, size=n).tolist() for n in (4, 6, 3, 9, 8)]
    tokens, segments = pack_documents(docs, window=17, eos_id=EOS)
    assert tokens.shape == (2, 17) and segments.max(axis=1).tolist() == [4, 2]
    batch = {"tokens": jnp.asarray(tokens), "segment_ids": jnp.asarray(segments)}
    score = jax.jit(token_nll, static_argnums=1)
    nll, weights = (np.asarray(a) for a in score(params, graphdef, batch))

    # Each document piece alone: a plain (unpacked) window starting with it; causal attention makes what
    # follows the piece irrelevant to its own targets, so one batch of zero-padded windows scores every piece.
    pieces = [(w, np.flatnonzero(segments[w] == s)) for w in range(2) for s in np.unique(segments[w])]
    pieces = [(w, idx) for w, idx in pieces if len(idx) > 1]  # a one-token piece has no target
    alone = np.zeros((len(pieces), 17), np.int32)
    for row, (w, idx) in enumerate(pieces):
        alone[row, : len(idx)] = tokens[w, idx]
    alone_nll = np.asarray(score(params, graphdef, jnp.asarray(alone))[0])
    for row, (w, idx) in enumerate(pieces):
        targets = idx[:-1]  # the target of input j is token j + 1
        np.testing.assert_array_equal(weights[w, targets], 1.0)
        np.testing.assert_allclose(nll[w, targets], alone_nll[row, : len(idx) - 1], rtol=2e-5, atol=2e-5)
    # Not vacuous: without segment ids the second document of window 1 would see the first one.
    unpacked = np.asarray(score(params, graphdef, jnp.asarray(tokens))[0])
    w, idx = pieces[1]
    assert not np.allclose(unpacked[w, idx[:-1]], nll[w, idx[:-1]], atol=1e-4)
    # Exactly the targets inside a piece count: none across a document boundary.
    assert float(weights.sum()) == segments.size - sum(len(np.unique(s)) for s in segments)

    # The training loss is the mean over the counted targets.
    loss = jax.jit(loss_fn, static_argnums=1)(params, graphdef, batch)
    np.testing.assert_allclose(float(loss), float(np.sum(nll * weights) / np.sum(weights)), rtol=1e-6)


def test_training_batches_from_config(tmp_path):
    """``data.documents`` packs the files or paragraphs of ``data.text_files``; ``data.tokenizer`` takes a model
    name (its own BPE tokenizer, whose EOS separates the documents)."""
    from llmopt_jax.train.loop import make_tokenizer, training_batches
    from tests.conftest import load_config

    text = tmp_path / "t.txt"
    text.write_text("\n\n".join(f"paragraph {i}: " + "word " * (3 + i % 7) for i in range(60)))
    config = load_config("train", "tiny")
    config.data.text_files = str(text)
    assert type(training_batches(config, make_tokenizer("byte"), 32, 4)).__name__ == "WindowBatches"
    config.data.documents = "paragraphs"
    byte = make_tokenizer("byte")
    batch = training_batches(config, byte, 32, 4).next()
    assert batch["tokens"].shape == (4, 33) and (batch["tokens"] == byte.eos_id).any()
    assert batch["segment_ids"].max() > 1
    tokenizer = make_tokenizer("smollm2-135m")
    assert tokenizer.vocab_size == 49152 and tokenizer.eos_id is not None
    batch = training_batches(config, tokenizer, 16, 2).next()
    assert (batch["tokens"] == tokenizer.eos_id).any() and batch["tokens"].max() < tokenizer.vocab_size


@pytest.mark.slow
def test_train_cli_on_packed_paragraphs(tmp_path):
    import json

    from tests.conftest import run_cli

    proc = run_cli(["experiments.train", "--config=configs/train.py:tiny", f"--workdir={tmp_path / 'run'}",
                    "--config.data.documents=paragraphs", "--config.train.steps=3", "--config.train.progress=False"],
                   fast_compile=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["steps"] == 3 and np.isfinite(results["final_loss"])
