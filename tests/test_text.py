"""Text data, tokenizers and text models, piece by piece (the end-to-end runs are in test_text_e2e.py).

    .venv/bin/pytest tests/test_text.py -q
"""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing here may reach the network

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import builtin_models

from nnforge.config import TextTrainConfig
from nnforge.data.images import DataError
from nnforge.data.inputs import InputError, build_input
from nnforge.data.tables import detect_encoding
from nnforge.data.text import TextData, TokenBatches, read_file, read_labelled_texts
from nnforge.data.tokenizer import load_tokenizer, pad_batch, train_tokenizer
from nnforge.models import create_model, get_entry
from nnforge.models import text as text_models

TEXT_MODELS = builtin_models("text")
SCRATCH_MODELS = [m for m in TEXT_MODELS if m not in text_models.PRETRAINED_ENCODERS]
GOOD = "brilliant moving superb funny charming".split()
BAD = "dull tedious awful clumsy boring".split()
FILL = "the film story cast plot was quite a and really".split()


def review(i: int, label: str) -> str:
    rng = np.random.default_rng(i)
    words = list(rng.choice(FILL, 4)) + list(rng.choice(GOOD if label == "pos" else BAD, 2))
    rng.shuffle(words)
    return " ".join(words)


def write_csv(path: Path, n: int = 40, encoding: str = "utf-8", extra: list[str] | None = None) -> Path:
    lines = ["text,label"] + [f'"{review(i, lab)}",{lab}' for i in range(n) for lab in [("pos", "neg")[i % 2]]]
    path.write_bytes(("\n".join(lines + (extra or [])) + "\n").encode(encoding))
    return path


def cfg_for(data: Path, **kw) -> TextTrainConfig:
    return TextTrainConfig(data=str(data), **{"batch_size": 8, "vocab_size": 300, **kw})


def quiet(*_):
    pass


# ----------------------------------------------------------------------------------------------------------
# reading files


def test_bom_is_detected_and_the_header_is_clean(tmp_path):
    path = write_csv(tmp_path / "bom.csv", encoding="utf-8-sig")
    assert path.read_bytes().startswith(b"\xef\xbb\xbf")
    rows, skipped, enc = read_file(path, "text", "label")
    assert enc == "utf-8-sig" and not skipped and len(rows) == 40  # the BOM did not end up in the 'text' column


def test_latin1_and_windows_1252_files_read_as_written(tmp_path):
    p1 = tmp_path / "latin1.csv"
    p1.write_bytes("text,label\ncafé crème brûlée,pos\nnaïve façade,neg\n".encode("latin-1"))
    rows, _, enc = read_file(p1, "text", "label")
    assert enc == "latin-1" and [r.text for r in rows] == ["café crème brûlée", "naïve façade"]
    p2 = tmp_path / "cp1252.csv"
    p2.write_bytes("text,label\n\u201cquoted\u201d \u2014 dash,pos\n".encode("cp1252"))
    rows, _, enc = read_file(p2, "text", "label")
    assert enc == "cp1252" and rows[0].text == "\u201cquoted\u201d \u2014 dash"
    assert detect_encoding(b"plain ascii") == "utf-8"
    assert detect_encoding("x".encode("utf-16")) == "utf-16"


def test_bad_rows_are_skipped_with_their_line_numbers_and_the_file_is_untouched(tmp_path):
    path = tmp_path / "messy.csv"
    content = ('text,label\n'
               '"fine text",pos\n'
               'too,many,fields\n'
               '"",neg\n'
               '"   ",neg\n'
               '"no label here",\n'
               '\n'
               '"a quoted text\nthat spans two lines",neg\n'
               'lonely\n'
               '"last good one",pos\n')
    path.write_text(content, encoding="utf-8")
    before = path.read_bytes()
    rows, skipped, _ = read_file(path, "text", "label")
    assert [r.text for r in rows] == ["fine text", "a quoted text\nthat spans two lines", "last good one"]
    assert [r.where for r in rows] == [f"{path}:2", f"{path}:8", f"{path}:11"]
    reasons = {s["path"].rsplit(":", 1)[1]: s["reason"] for s in skipped}
    assert reasons == {"3": "expected 2 fields, got 3 (a comma inside a text needs quotes)", "4": "empty text",
                       "5": "empty text", "6": "missing label", "10": "expected 2 fields, got 1"}
    assert path.read_bytes() == before


def test_tsv_and_jsonl_with_malformed_lines(tmp_path):
    tsv = tmp_path / "d.tsv"
    tsv.write_text("label\ttext\npos\tgood, with a comma\nneg\n", encoding="utf-8")
    rows, skipped, _ = read_file(tsv, "text", "label")
    assert [(r.text, r.label) for r in rows] == [("good, with a comma", "pos")]
    assert skipped == [{"path": f"{tsv}:3", "reason": "expected 2 fields, got 1"}]
    jl = tmp_path / "d.jsonl"
    jl.write_text('{"text": "fine", "label": 1}\n{"text": "broken",\n["a list"]\n{"text": "x"}\n'
                  '{"text": 5, "label": "a"}\n\n{"text": "ok too", "label": "b"}\n', encoding="utf-8")
    rows, skipped, _ = read_file(jl, "text", "label")
    assert [(r.text, r.label) for r in rows] == [("fine", "1"), ("ok too", "b")]
    assert [s["path"] for s in skipped] == [f"{jl}:{n}" for n in (2, 3, 4, 5)]
    assert "malformed JSON" in skipped[0]["reason"] and "JSON object" in skipped[1]["reason"]
    assert skipped[2]["reason"] == "missing label" and "string" in skipped[3]["reason"]


def test_errors_name_the_file_and_what_was_expected(tmp_path):
    path = write_csv(tmp_path / "d.csv")
    with pytest.raises(DataError, match=r"no column 'body'.*\['text', 'label'\].*--text-col"):
        TextData.load(cfg_for(path, text_col="body"), log=quiet)
    one = tmp_path / "one.csv"
    one.write_text("text,label\na,x\nb,x\n")
    with pytest.raises(DataError, match="at least 2 classes"):
        TextData.load(cfg_for(one), log=quiet)
    txt = tmp_path / "d.txt"
    txt.write_text("text,label\n")
    with pytest.raises(DataError, match="unsupported file type '.txt'"):
        TextData.load(cfg_for(txt), log=quiet)
    empty = tmp_path / "folder"
    empty.mkdir()
    with pytest.raises(DataError, match="no train file"):
        TextData.load(cfg_for(empty), log=quiet)


def test_single_example_label_and_unknown_test_label_fail(tmp_path):
    # the same rule as for images (data/rules.py): a class with one training example is refused, with where it is
    path = write_csv(tmp_path / "d.csv", extra=['"a lone example",rare'])
    with pytest.raises(DataError, match=rf"at least 2 usable training examples; too few for 'rare' \(1, e\.g\. {path}"):
        TextData.load(cfg_for(path), log=quiet)
    folder = tmp_path / "splits"
    folder.mkdir()
    write_csv(folder / "train.csv")
    (folder / "test.csv").write_text("text,label\nsomething new,other\n")
    with pytest.raises(DataError, match=r"\['other'\] appear in val/test.*test.csv:2"):
        TextData.load(cfg_for(folder), log=quiet)


# ----------------------------------------------------------------------------------------------------------
# splits and batches


def test_split_is_stratified_seeded_and_keeps_duplicates_together(tmp_path):
    dup = '"the very same text",pos'
    path = write_csv(tmp_path / "d.csv", n=60, extra=[dup, dup, '"THE very  same text",pos'])
    a = TextData.load(cfg_for(path, seed=1), log=quiet)
    b = TextData.load(cfg_for(path, seed=1), log=quiet)
    c = TextData.load(cfg_for(path, seed=2), log=quiet)
    assert a.split_record() == b.split_record() and a.split_record() != c.split_record()
    counts = a.report["counts"]
    assert counts["val"] == counts["test"] == {"neg": 3, "pos": 3}  # 10% of each class (30 + 30)
    group = [d for d in a.report["duplicates"] if "the very same text" in " ".join(a.items(d["splits"][0]))]
    assert len(group) == 1 and len(group[0]["paths"]) == 3 and group[0]["leak"] is False
    assert len(a.items("train")) + len(a.items("val")) + len(a.items("test")) == 63


def test_group_col_puts_whole_groups_in_val_and_test_and_joins_groups_sharing_a_text(tmp_path, capsys):
    # 30 speakers x 4 texts; speaker 0 and speaker 1 share one text, so they must land in the same split
    rows = [(f"{review(10 * g + k, ('pos', 'neg')[g % 2])} number {g} {k}", ("pos", "neg")[g % 2], f"sp{g}")
            for g in range(30) for k in range(4)]
    rows.append(("a line both say", "pos", "sp0"))
    rows.append(("A line  both say", "neg", "sp1"))
    rows.append(("no speaker here", "pos", ""))
    path = tmp_path / "g.csv"
    path.write_text("text,label,speaker\n" + "".join(f'"{t}",{y},{g}\n' for t, y, g in rows))
    data = TextData.load(cfg_for(path, group_col="speaker", seed=3), log=print)
    split_of = {r.where: r.split for r in data.rows}
    by_group: dict[str, set[str]] = {}
    for r in data.rows:
        by_group.setdefault(r.group or r.where, set()).add(r.split)
    assert all(len(s) == 1 for s in by_group.values()), by_group  # no group in two splits
    assert by_group["sp0"] == by_group["sp1"]
    assert set().union(*by_group.values()) == {"train", "val", "test"}
    out = capsys.readouterr().out
    assert "31 values of 'speaker'" not in out and "30 values of 'speaker'" in out
    assert f"1 row(s) without a group, each its own (e.g. {path}:124)" in out
    assert len(split_of) == 123
    # without it, a speaker's texts are spread over the splits
    plain = TextData.load(cfg_for(path, seed=3), log=quiet)
    spread = {}
    for r, p in zip(data.rows, plain.rows, strict=True):
        spread.setdefault(r.group, set()).add(p.split)
    assert any(len(s) > 1 for g, s in spread.items() if g)
    with pytest.raises(DataError, match="--group-col"):
        TextData.load(cfg_for(path, group_col="speech"), log=quiet)


def test_given_split_files_are_used_and_leaks_reported(tmp_path):
    folder = tmp_path / "d"
    folder.mkdir()
    write_csv(folder / "train.csv", n=30)
    (folder / "Test.jsonl").write_text(json.dumps({"text": review(0, "pos"), "label": "pos"}) + "\n")
    data = TextData.load(cfg_for(folder, val_split=0.2), log=quiet)
    assert data.items("test") == [review(0, "pos")]
    assert sum(data.report["counts"]["val"].values()) == 6  # val carved from train, test given
    assert any(d["leak"] and "test" in d["splits"] for d in data.report["duplicates"])
    assert read_labelled_texts(folder, {"text_col": "text", "label_col": "label"}) == [[review(0, "pos"), "pos"]]


def test_batches_are_padded_to_the_longest_and_repeat_by_seed_epoch_and_batch(tmp_path):
    extra = [f'"{" ".join(["long"] * 30)} {i}",neg' for i in range(3)]
    data = TextData.load(cfg_for(write_csv(tmp_path / "d.csv", n=50, extra=extra), batch_size=8), log=quiet)
    src = data.train_source(torch.device("cpu"))
    n = len(data.items("train"))
    assert len(src) == -(-n // 8)
    first = list(src.epoch(0))
    again = list(src.epoch(0))
    assert all(torch.equal(x1, x2) and torch.equal(y1, y2) for (x1, y1), (x2, y2) in zip(first, again, strict=True))
    assert not all(torch.equal(x1, x2) for (x1, _), (x2, _) in zip(first, src.epoch(1), strict=False))
    resumed = list(src.epoch(0, start=3))
    assert all(torch.equal(a[0], b[0]) for a, b in zip(first[3:], resumed, strict=True))
    seen = torch.cat([y for _, y in first])
    assert sorted(seen.tolist()) == sorted(data.labels("train").tolist())  # each example once per epoch
    for x, _ in first:
        assert x.dtype == torch.int64
        lengths = (x != 0).sum(1)
        assert lengths.max() == x.shape[1] and (x[:, 0] != 0).all()  # padded to the longest, on the right
        assert all((row[n:] == 0).all() for row, n in zip(x, lengths, strict=True))


def test_balanced_sampler_draws_classes_equally():
    labels = torch.tensor([0] * 90 + [1] * 10)
    ids = torch.ones(100, 3, dtype=torch.int32)
    src = TokenBatches(ids, torch.full((100,), 3), labels, 10, 0, "balanced", torch.device("cpu"))
    drawn = torch.cat([y for e in range(20) for _, y in src.epoch(e)])
    assert 0.4 < drawn.float().mean().item() < 0.6


# ----------------------------------------------------------------------------------------------------------
# tokenizers and the preprocessor


@pytest.mark.parametrize("kind", ["bpe", "wordpiece"])
def test_tokenizer_training_repeats_and_survives_a_save(tmp_path, kind):
    texts = [review(i, ("pos", "neg")[i % 2]) for i in range(200)] + ["Crème Brûlée, naïve!"]
    a = train_tokenizer(texts, kind, vocab_size=200)
    b = train_tokenizer(texts, kind, vocab_size=200)
    assert a.to_str() == b.to_str()  # a resumed run re-trains the very same tokenizer
    assert a.token_to_id("[PAD]") == 0 and a.token_to_id("[UNK]") == 1
    a.save(str(tmp_path / "tok.json"))
    c = load_tokenizer(tmp_path / "tok.json", max_len=5)
    text = "The cast was Brilliant, really brilliant."
    assert c.encode(text).ids == a.encode(text).ids[:5]
    if kind == "bpe":  # byte-level BPE loses nothing but case
        assert a.decode(a.encode("Crème Brûlée — ok!").ids).strip() == "crème brûlée — ok!"
    with pytest.raises(ValueError, match="bpe"):
        train_tokenizer(texts, "chars")


def test_pad_batch():
    out = pad_batch([np.array([5, 6, 7]), np.array([9])], pad_id=0)
    assert out.dtype == np.int64 and out.tolist() == [[5, 6, 7], [9, 0, 0]]


def test_preprocessor_round_trip_and_bad_inputs(tmp_path):
    data = TextData.load(cfg_for(write_csv(tmp_path / "d.csv"), max_len=6), log=quiet)
    data.save_artifacts(tmp_path)
    pre = build_input(data.spec, tmp_path)
    text = data.items("train")[0]
    ids = pre.decode(text)
    assert ids.dtype == np.int64 and ids.tolist() == data.ids[data.rows.index(
        next(r for r in data.rows if r.text == text))].tolist()
    assert len(pre.decode("word " * 100)) == 6  # truncated at max_len
    assert np.array_equal(pre.decode(text.encode("utf-8")), ids) and np.array_equal(pre.load(text), ids)
    for bad, why in (("", "empty"), ("  \n", "empty"), (b"\xff\xfe\xfa", "UTF-8"), (3, "expected a text")):
        with pytest.raises(InputError, match=why):
            pre.decode(bad)
    batch = pre.batch([pre.decode("a b c d e f g"), pre.decode("a")])
    assert batch.shape == (2, 6) and batch.dtype == np.int64 and (batch[1, 1:] == 0).all()
    ex = pre.example(2)
    assert ex.shape[0] == 2 and ex.shape[1] != 2 and (ex != 0).all()


# ----------------------------------------------------------------------------------------------------------
# models


@functools.lru_cache(maxsize=1)
def minilm_config() -> dict:
    return text_models.encoder_config(str(text_models.packaged_minilm_dir()))


def build(name: str, **kw) -> torch.nn.Module:
    """A 3-class model over a 50-id vocabulary. minilm: the packaged architecture cut to one narrow layer and
    randomly initialised, so the wrapper (masking, pooling, head, freezing) is tested in a fraction of a second;
    the real weights are checked in test_minilm_is_the_packaged_sentence_encoder."""
    if name == "minilm":
        small = {**minilm_config(), "vocab_size": 50, "hidden_size": 32, "num_hidden_layers": 1,
                 "num_attention_heads": 2, "intermediate_size": 64}
        return create_model("minilm", num_classes=3, vocab_size=50, max_len=32, encoder_config=small, **kw)
    return create_model(name, num_classes=3, vocab_size=50, max_len=32, **kw)


def random_ids(vocab: int, lengths: list[int], seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    ids = torch.zeros(len(lengths), max(lengths), dtype=torch.long)
    for i, n in enumerate(lengths):
        ids[i, :n] = torch.randint(1, vocab, (n,), generator=g)
    return ids


def test_the_text_models_are_registered():
    assert set(TEXT_MODELS) == {"lstm", "gru", "bigru", "textcnn", "transformer", "minilm", "fasttext"}
    for name in TEXT_MODELS:
        assert get_entry(name).input == "text" and get_entry(name).head == "head"


@pytest.mark.parametrize("name", TEXT_MODELS)
def test_forward_backward_reaches_every_parameter(name):
    torch.manual_seed(0)
    model = build(name).train()
    ids = random_ids(50, [7, 3, 1])
    logits = model(ids)
    assert logits.shape == (3, 3) and torch.isfinite(logits).all()
    F.cross_entropy(logits, torch.tensor([0, 1, 2])).backward()
    for pname, p in model.named_parameters():
        if pname in ("embed.weight", "encoder.embeddings.word_embeddings.weight"):
            continue  # an embedding table only gets gradient on the rows in the batch; checked below
        assert p.grad is not None and torch.isfinite(p.grad).all(), f"{name}: {pname} got no gradient"
    emb = model.encoder.get_input_embeddings() if name == "minilm" else model.embed
    assert emb.weight.grad[ids[0, 0]].abs().sum() > 0
    assert isinstance(model.get_submodule("head"), torch.nn.Linear) and model.head.out_features == 3


@pytest.mark.parametrize("name", TEXT_MODELS)
def test_features_are_what_the_head_reads(name):
    torch.manual_seed(0)
    model = build(name).eval()
    ids = random_ids(50, [5, 2])
    with torch.no_grad():
        feats = model.forward_features(ids)
        assert feats.shape == (2, model.head.in_features)
        torch.testing.assert_close(model.head(feats), model(ids))


@pytest.mark.parametrize("name", TEXT_MODELS)
def test_padding_does_not_change_a_texts_logits(name):
    # A text must get the same answer alone as in a batch padded for a longer neighbour: a model that lets
    # padding leak in (a backward RNN over trailing pads, an unmasked mean) fails here.
    torch.manual_seed(0)
    model = build(name).eval()
    ids = random_ids(50, [4, 11, 1], seed=1)
    with torch.no_grad():
        batched = model(ids)
        alone = torch.cat([model(ids[i:i + 1, :n]) for i, n in enumerate([4, 11, 1])])
    torch.testing.assert_close(batched, alone, atol=1e-5, rtol=1e-4)


def test_bigru_backward_direction_reads_each_text_from_its_end():
    x = torch.arange(1, 7).view(1, 6, 1).repeat(2, 1, 1).float()  # (2, 6, 1): 1..6
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]], dtype=torch.bool)
    rev = text_models.reverse_within_length(x, mask).squeeze(-1)
    assert rev.tolist() == [[4, 3, 2, 1, 5, 6], [6, 5, 4, 3, 2, 1]]
    assert torch.equal(text_models.reverse_within_length(rev.unsqueeze(-1), mask).squeeze(-1), x.squeeze(-1))


def test_minilm_is_the_packaged_sentence_encoder(tmp_path):
    # The packaged tokenizer pads with id 0, and the pretrained encoder (not random weights) puts paraphrases
    # closer than unrelated sentences.
    from nnforge.data.tokenizer import pretrained_tokenizer

    tok = pretrained_tokenizer(text_models.packaged_minilm_dir())
    assert tok.token_to_id("[PAD]") == 0
    model = create_model("minilm", num_classes=3, vocab_size=30522, pretrained=True).eval()
    sents = ["A man is playing a guitar.", "Someone plays an instrument.", "The stock market fell sharply today."]
    ids = torch.from_numpy(pad_batch([np.array(tok.encode(s).ids) for s in sents]))
    with torch.no_grad():
        h = model.encoder(input_ids=ids, attention_mask=(ids != 0).long()).last_hidden_state
        emb = F.normalize(text_models.masked_mean(h, ids != 0), dim=1)
    sim = emb @ emb.T
    assert sim[0, 1] > sim[0, 2] + 0.2 and sim[0, 1] > sim[1, 2] + 0.2
    # Rebuilt from its config alone (how a run reloads it, with no package needed) it has the same shapes.
    again = create_model("minilm", num_classes=3, vocab_size=30522, encoder_config=minilm_config())
    assert {k: v.shape for k, v in again.state_dict().items()} == {k: v.shape for k, v in model.state_dict().items()}


def test_minilm_frozen_encoder_gets_no_gradient():
    model = build("minilm", freeze_encoder=True).train()
    assert not model.encoder.training  # no dropout inside a frozen encoder
    F.cross_entropy(model(random_ids(50, [5, 3])), torch.tensor([0, 1])).backward()
    assert model.head.weight.grad is not None
    assert all(p.grad is None for p in model.encoder.parameters())


def test_encoder_option_is_refused_for_models_trained_from_scratch():
    with pytest.raises(ValueError, match="--encoder applies to pretrained encoder models"):
        text_models.encoder_source("bigru", "bert-base-uncased")
    assert text_models.encoder_source("bigru") is None
    assert text_models.encoder_source("minilm") == str(text_models.packaged_minilm_dir())
