"""The recommender: data layouts, the split and metrics of recommender research, models that beat popularity on a
planted structure, items added without retraining, exact resume, export and serving.

    .venv/bin/pytest tests/test_recsys.py -q

The synthetic data has a planted structure: three genres whose item texts say what they are about, and users who
each like one genre (six of its items and one stray item).
"""

from __future__ import annotations

import csv
import importlib.util
import math
import os
import signal
from pathlib import Path

import httpx
import numpy as np
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from conftest import serving_in_thread

import nnforge
from nnforge.cli import main
from nnforge.data.catalogue import Catalogue
from nnforge.data.history_input import HISTORY, USER
from nnforge.data.inputs import InputError
from nnforge.data.interaction_splits import COLD, TEST, TRAIN, VALID, split_interactions
from nnforge.data.interactions import read_interactions
from nnforge.engine.checkpoint import load_checkpoint
from nnforge.engine.errors import TrainingInterrupted
from nnforge.engine.run import Run
from nnforge.evaluation.ranking import ranking_metrics
from nnforge.models import create_model
from nnforge.models.recsys import ROW_HISTORY, ROW_USER
from nnforge.tasks import recsys as recsys_task

GENRES = {"scifi": "a science fiction adventure aboard a starship exploring alien planets and distant galaxies",
          "romance": "a romantic love story about two people falling in love at a wedding in Paris",
          "cooking": "a documentary about chefs cooking food and baking bread in a restaurant kitchen"}
ITEMS_PER_GENRE, USERS_PER_GENRE, LIKED = 10, 20, 6
FAST = dict(precision="fp32", epochs=12, batch_size=64, early_stop=None, max_history=20)


def genre_of(item_or_user: str) -> str:
    return item_or_user.split("-")[0]


@pytest.fixture(scope="module")
def planted(tmp_path_factory) -> dict:
    """interactions.csv and items.csv with the planted structure; a module-wide embedding cache, and no network (the
    packaged MiniLM is a local folder)."""
    root = tmp_path_factory.mktemp("planted")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("NNFORGE_CACHE", str(root / "cache"))
        mp.setenv("HF_HUB_OFFLINE", "1")
        yield _write_planted(root)


def _write_planted(root: Path) -> dict:
    rng = np.random.default_rng(0)
    items = [(f"{g}-{j}", f"{g.title()} film {j}", GENRES[g]) for g in GENRES for j in range(ITEMS_PER_GENRE)]
    with (root / "items.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["item", "title", "description"])
        w.writerows(items)
    rows, t = [], 0
    for g in GENRES:
        others = [i for i, _, _ in items if genre_of(i) != g]
        for u in range(USERS_PER_GENRE):
            liked = [f"{g}-{j}" for j in rng.choice(ITEMS_PER_GENRE, LIKED, replace=False)]
            for item in liked + [others[int(rng.integers(len(others)))]]:
                t += 1
                rows.append((f"{g}-u{u}", item, 5, 1_000_000 + t))
    with (root / "interactions.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["user", "item", "rating", "timestamp"])
        w.writerows(rows)
    return {"root": root, "data": str(root / "interactions.csv"), "items": str(root / "items.csv")}


def train(planted, tmp_path, name, **overrides):
    cfg = {**FAST, "data": planted["data"], "items": planted["items"], "out": str(tmp_path), "name": name,
           **overrides}
    return nnforge.train("recsys", **cfg)


# ----------------------------------------------------------------------------------------------------------------
# metrics and splits


def test_full_ranking_metrics_match_a_hand_computation():
    scores = torch.tensor([[0.9, 0.8, 0.7, 0.6, 0.5, 0.4],    # user 0: item 0 seen; positives 1 and 4
                           [0.1, 0.2, 0.3, 0.4, 0.5, 0.6],    # user 1: positive 0, ranked last
                           [0.5, 0.1, 0.9, 0.3, 0.8, 0.2],    # user 2: item 2 seen; positives 3, 4, 5
                           [0.3, 0.3, 0.3, 0.3, 0.3, 0.3]])   # user 3: no positives, so not counted
    positives = (np.array([0, 2, 3, 6, 6]), np.array([1, 4, 0, 3, 4, 5]))
    exclude = (np.array([0, 1, 1, 2, 2]), np.array([0, 2]))
    result = ranking_metrics(lambda users: scores[users], np.arange(4), positives, exclude, 6, ks=(2, 3))
    # by hand: ranks after removing seen items. user 0: 1, 2, 3, 4, 5 -> its positives at ranks 1 and 4;
    # user 1: 5, 4, 3, 2, 1, 0 -> rank 6; user 2: 4, 0, 3, 5, 1 -> positives at ranks 1, 3 and 4
    hit_ranks, n_pos = [[1, 4], [6], [1, 3, 4]], [2, 1, 3]

    def expected(k):
        out = {"recall": 0.0, "precision": 0.0, "hit": 0.0, "mrr": 0.0, "ndcg": 0.0}
        for ranks, n in zip(hit_ranks, n_pos, strict=True):
            top = [r for r in ranks if r <= k]
            out["recall"] += len(top) / n
            out["precision"] += len(top) / k
            out["hit"] += 1.0 if top else 0.0
            out["mrr"] += 1 / min(top) if top else 0.0
            ideal = sum(1 / math.log2(r + 1) for r in range(1, min(n, k) + 1))
            out["ndcg"] += sum(1 / math.log2(r + 1) for r in top) / ideal
        return {f"{m}@{k}": v / 3 for m, v in out.items()}

    assert result["users"] == 3
    for k in (2, 3):
        for name, value in expected(k).items():
            assert result[name] == pytest.approx(value, abs=1e-9), name
    # coverage: top-2 lists {1, 2}, {5, 4}, {4, 0} cover 5 of the 6 items; top-3 lists cover all
    assert result["coverage@2"] == pytest.approx(5 / 6) and result["coverage@3"] == pytest.approx(1.0)
    # only some items may be ranked (the cold-start slice among cold items): the others are never recommended
    allowed = np.array([True, False, False, True, True, False])
    only = ranking_metrics(lambda users: scores[users], np.arange(4), positives, exclude, 6, ks=(2,), allowed=allowed)
    assert only["coverage@2"] == pytest.approx(1.0)  # items 0, 3, 4: each in someone's top 2
    assert only["hit@2"] == pytest.approx(2 / 3)  # user 1's item 0 is 2nd of {4, 3, 0}; user 0's 4 is 1st of {4, 3}


def test_splits_follow_recbole_and_leave_last_out():
    sizes = [2, 5, 7, 10, 25]
    users = np.repeat(np.arange(len(sizes)), sizes)
    items = np.concatenate([np.arange(n) for n in sizes])
    times = np.concatenate([np.arange(n)[::-1] for n in sizes]).astype(float)  # each user's first row is its latest
    part, cold = split_interactions(users, items, times, "random", (0.8, 0.1, 0.1), seed=3)
    counts = [[int(((users == u) & (part == p)).sum()) for p in (TRAIN, VALID, TEST)] for u in range(len(sizes))]
    # floor(0.1 n) each, and a share below one row still gets one (test first) while train keeps more than one
    assert counts == [[1, 0, 1], [3, 1, 1], [5, 1, 1], [8, 1, 1], [21, 2, 2]] and len(cold) == 0
    again, _ = split_interactions(users, items, times, "random", (0.8, 0.1, 0.1), seed=3)
    assert (again == part).all()
    part, _ = split_interactions(users, items, times, "leave_last_out")
    first = np.r_[0, np.cumsum(sizes)[:-1]]
    assert (part[first] == TEST).all()  # the latest interaction, whatever its place in the file
    assert (part[first[1:] + 1] == VALID).all() and part[first[0] + 1] == TRAIN
    part, cold = split_interactions(users, items, None, "random", cold_frac=0.2, seed=0)
    assert len(cold) == 5 and (part[np.isin(items, cold)] == COLD).all() and not (part[~np.isin(items, cold)]
                                                                                  == COLD).any()


def test_three_layouts_and_bad_rows_reported_with_lines(tmp_path):
    spec = importlib.util.find_spec("recbole")
    ml = Path(spec.submodule_search_locations[0]) / "dataset_example" / "ml-100k"
    inter = read_interactions(ml, log=lambda m: None)
    assert (len(inter), len(inter.user_ids), len(inter.item_ids), inter.layout) == (100000, 943, 1682, "recbole")
    toy = inter.item_ids.index("1")
    assert inter.titles[toy] == "Toy Story" and inter.texts[toy] == "Toy Story. 1995. Animation Children's Comedy"

    lens = tmp_path / "ml"
    lens.mkdir()
    (lens / "u.data").write_text("1\t10\t4\t881250949\n1\t11\t2\t881250950\n2\t10\t5\t881250951\nbad line\n")
    genres = "0|" * 5 + "1|" + "0|" * 12 + "0"  # the sixth flag: Comedy
    (lens / "u.item").write_bytes(f"10|Caf\xe9 \"Noir\" (1995)|01-Jan-1995||http://x|{genres}\n"
                                  f"11|Other (1996)|01-Jan-1996||http://y|{genres}\n".encode("latin-1"))
    inter = read_interactions(lens, log=lambda m: None)
    assert inter.layout == "movielens" and len(inter) == 3 and inter.titles[0] == 'Café "Noir" (1995)'
    assert inter.texts[0] == 'Café "Noir" (1995). Comedy'
    assert inter.report["skipped"][0]["path"].endswith("u.data:4")

    (tmp_path / "inter.csv").write_text("userId,movieId,rating,timestamp\n"
                                        "a,x,5,100\n"       # line 2
                                        "a,x,4,101\n"       # line 3: the same pair again
                                        ",y,5,102\n"        # line 4: no user
                                        "b,y,five,103\n"    # line 5: a rating that is no number
                                        "b,zz,3,104\n"      # line 6: not in the item file
                                        "b,y,2,2021-03-04\n")
    (tmp_path / "items.csv").write_text("movieId,title,genres\nx,X Files,Drama\ny,Why,Comedy\n")
    inter = read_interactions(tmp_path / "inter.csv", tmp_path / "items.csv", log=lambda m: None)
    assert len(inter) == 2 and inter.texts == ["X Files. Drama", "Why. Comedy"]
    reasons = {r["path"].rsplit(":", 1)[1]: r["reason"] for r in inter.report["skipped"]}
    assert set(reasons) == {"3", "4", "5", "6"}
    assert "again (first on line 2)" in reasons["3"] and "empty user id" in reasons["4"]
    assert "'five' is not a number" in reasons["5"] and "'zz' is not in the item file" in reasons["6"]
    implicit = read_interactions(tmp_path / "inter.csv", tmp_path / "items.csv", min_rating=4, log=lambda m: None)
    assert len(implicit) == 1 and implicit.report["below_min_rating"] == 1
    with pytest.raises(ValueError, match=r"odd.csv: no user id column.*Name it with --user-col"):
        (tmp_path / "odd.csv").write_text("who,what\na,b\n")
        read_interactions(tmp_path / "odd.csv", log=lambda m: None)


def test_faiss_answers_as_exact_search_does(monkeypatch):
    """A large catalogue is searched with FAISS's HNSW graph (the recsys extra); on a small one it must agree with
    the exact search, exclusions included."""
    import nnforge.data.catalogue as catalogue

    rng = np.random.default_rng(0)
    n = 500
    cat = catalogue.Catalogue([str(i) for i in range(n)], [""] * n, rng.standard_normal((n, 16)).astype(np.float32),
                              np.zeros(n, np.float32), n)
    queries = rng.standard_normal((20, 16)).astype(np.float32)
    exclude = [rng.choice(n, 30, replace=False) for _ in range(20)]
    assert not cat.uses_faiss
    exact = cat.search(queries, 10, exclude)
    monkeypatch.setattr(catalogue, "FAISS_MIN_ITEMS", 100)
    assert cat.uses_faiss
    approx = cat.search(queries, 10, exclude)
    same = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(exact[0], approx[0], strict=True)])
    assert same >= 0.95 and all(not set(a) & set(ex) for a, ex in zip(approx[0], exclude, strict=True))


# ----------------------------------------------------------------------------------------------------------------
# models


@pytest.mark.parametrize(("name", "args"), [("bpr", {}), ("two_tower", {}), ("two_tower", {"user_tower": "attention"}),
                                            ("two_tower", {"text_dim": 0, "user_embedding": True}), ("sasrec", {})])
def test_every_recommender_forward_backward(name, args):
    torch.manual_seed(0)
    text_dim = args.pop("text_dim", 16)
    model = create_model(name, num_users=4, num_items=12, text_dim=text_dim, max_len=5, **args).train()
    if model.reads_text:
        model.text.normal_()
    rows = torch.tensor([[10, 0, 0, -1, -1, 3, 4, 5],     # known user 0
                         [10, 0, 1, 1, 2, 3, 4, 5],       # known user 1, a full history
                         [10, 2, -1, -1, -1, -1, 7, 8]])  # unknown user, a history
    users = model(rows)
    assert users.shape[0] == 3 and torch.isfinite(users).all()
    F.cross_entropy(users @ model.item_vectors().T, torch.tensor([6, 0, 9])).backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), f"{name}: {pname} got no gradient"
    model.eval()
    added = rows.clone()
    added[2, 3] = 20  # an item added to the run after training: left out of the history, not an error
    torch.testing.assert_close(model(added), model(rows))


def test_history_dropout_halves_long_histories_keeps_short_ones_and_is_off_in_eval():
    from nnforge.models import create_model
    from nnforge.models.recsys import DROPOUT_KEEPS

    m = create_model("two_tower", num_users=4, num_items=300).train()
    history = torch.full((4, 250), -1, dtype=torch.long)
    history[0, -200:] = torch.arange(200)  # long: about half dropped
    history[1, -DROPOUT_KEEPS:] = torch.arange(DROPOUT_KEEPS)  # short: left whole
    history[2, -3:] = torch.tensor([5, 6, 7])
    torch.manual_seed(0)
    kept = m._drop_history(history)
    real = (kept >= 0).sum(1)
    assert 70 <= real[0] <= 130 and real[1] == DROPOUT_KEEPS and real[2] == 3 and real[3] == 0
    assert set(kept[0][kept[0] >= 0].tolist()) <= set(range(200))  # only dropped, never changed
    u = torch.full((4,), -1)
    m.eval()
    assert torch.equal(m.user_vectors(u, history), m.user_vectors(u, history))  # no randomness when serving
    with pytest.raises(ValueError, match="history_dropout"):
        create_model("two_tower", num_users=4, num_items=300, history_dropout=1.0)


def test_a_fine_tuned_text_tower_trains_its_encoder_and_serves_from_its_cache():
    from transformers import BertConfig

    tiny = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                      intermediate_size=32, max_position_embeddings=16).to_dict()
    torch.manual_seed(0)
    model = create_model("two_tower", num_users=3, num_items=6, max_len=4, fine_tune_text=True, encoder_config=tiny,
                         text_len=5).train()
    model.tokens.copy_(torch.randint(1, 50, (6, 5)))
    model.tokens[:, 3:] = 0  # padding
    live = model.item_vectors(torch.arange(6), live=True)
    (live @ live.T).sum().backward()
    assert all(p.grad is not None for p in model.encoder.parameters() if p.requires_grad)
    model.eval()
    model.refresh_cache()
    torch.testing.assert_close(model.item_vectors(), model.item_vectors(torch.arange(6), live=True))
    with pytest.raises(ValueError, match="bpr reads no item text"):
        create_model("bpr", num_users=3, num_items=6, fine_tune_text=True, encoder_config=tiny)


# ----------------------------------------------------------------------------------------------------------------
# models on the planted structure


def test_bpr_and_two_tower_beat_popularity_and_text_places_new_items(planted, tmp_path):
    runs = {"popularity": train(planted, tmp_path, "pop", model="popularity", cold_items=0.1),
            "bpr": train(planted, tmp_path, "bpr", model="bpr", cold_items=0.1, lr=0.02, epochs=30),
            "two_tower": train(planted, tmp_path, "tt", cold_items=0.1, lr=0.01)}
    reports = {m: Run(r.path).read_json("eval/report.json") for m, r in runs.items()}
    pop = reports["popularity"]["slices"]["test"]["popularity"]
    for model in ("bpr", "two_tower"):
        ours = reports[model]["slices"]["test"][model]
        assert ours["ndcg@10"] > pop["ndcg@10"] + 0.1 and ours["recall@5"] > pop["recall@5"] + 0.1, (model, ours, pop)
        assert reports[model]["slices"]["test"]["popularity"] == pop  # the same split, side by side
    cold = reports["two_tower"]["slices"]["cold"]
    assert cold["two_tower"]["recall@10"] > cold["popularity"]["recall@10"] + 0.3  # only text can find them
    for model in ("bpr", "two_tower"):  # without the cold items in the lists, a test item can only rise
        warm, every = (reports[model]["slices"][s][model] for s in ("test_warm", "test"))
        assert every["ndcg@10"] <= warm["ndcg@10"] and every["recall@10"] <= warm["recall@10"], (model, warm, every)
    html = (runs["two_tower"].path / "report.html").read_text()
    assert "Ranking metrics" in html and "cold_only" in html and "data:image/png;base64" in html

    # a new item arrives with its text: no retraining, and the users of its genre get it first
    tt = runs["two_tower"].path
    added = nnforge.add_items(tt, [{"id": "scifi-new", "title": "Nebula Run", "text": GENRES["scifi"]}])
    assert added == {"added": 1, "items": 31, "ids": ["scifi-new"]}
    for g in GENRES:
        for u in range(USERS_PER_GENRE):
            ranked = nnforge.recommend(tt, user=f"{g}-u{u}", k=30, exclude_seen=True)["items"]
            at = ranked.index("scifi-new")
            if g == "scifi":  # among the science fiction the user has not seen yet, before anything else
                assert {genre_of(i) for i in ranked[:at]} <= {"scifi"}, (u, ranked)
            else:  # after every item of the user's own genre
                assert at >= sum(genre_of(i) == g for i in ranked) and genre_of(ranked[0]) == g, (g, u, ranked)
    with pytest.raises(ValueError, match="already in the catalogue"):
        nnforge.add_items(tt, [{"id": "scifi-new", "text": "again"}])
    before = Catalogue.open(tt)
    nnforge.evaluate(tt)  # rebuilds the index from the checkpoint: the added item stays, its text embedded again
    after = Catalogue.open(tt)
    assert after.ids == before.ids and after.trained == 30
    np.testing.assert_allclose(after.vectors, before.vectors, atol=1e-6)
    with pytest.raises(ValueError, match="reads no item text"):
        nnforge.add_items(runs["bpr"].path, [{"id": "x", "text": "some text"}])
    # more like this, a history, an unknown user, and k out of range
    like = nnforge.recommend(tt, item="romance-3", k=5)
    assert "romance-3" not in like["items"] and all(genre_of(i) == "romance" for i in like["items"])
    hist = nnforge.recommend(tt, history=["cooking-1", "cooking-2"], k=5, exclude_seen=True)
    assert all(genre_of(i) == "cooking" for i in hist["items"]) and "cooking-1" not in hist["items"]
    stranger = nnforge.recommend(tt, user="nobody", k=3)
    assert stranger["fallback"] == "popular" and len(stranger["items"]) == 3
    with pytest.raises(InputError, match=r'"k" must be a whole number from 1 to 30'):
        nnforge.recommend(tt, user="scifi-u1", k=0)
    # the command line: the same answer, one item per line
    assert main(["recommend", str(tt), "--user", "scifi-u1", "--k", "3"]) == 0


def test_resume_after_sigterm_is_bit_identical(planted, tmp_path, monkeypatch):
    stop_at: list[tuple[int, int]] = []
    original = recsys_task.HistoryBatches.epoch

    def epoch(self, epoch, start=0):  # the real signal, at a chosen batch, handled by the engine
        for b, batch in enumerate(original(self, epoch, start), start):
            if stop_at and (epoch, b) == stop_at[0]:
                os.kill(os.getpid(), signal.SIGTERM)
            yield batch

    monkeypatch.setattr(recsys_task.HistoryBatches, "epoch", epoch)
    common = dict(epochs=3, cold_items=0.0, lr=0.01)
    straight = train(planted, tmp_path, "straight", **common)
    stop_at.append((1, 2))
    with pytest.raises(TrainingInterrupted):
        train(planted, tmp_path, "stopped", **common)
    stop_at.clear()
    stopped = tmp_path / "recsys" / "stopped"
    state = load_checkpoint(stopped / "checkpoints" / "last.safetensors")[1]["state"]
    assert state["stopped"] == "interrupted" and (state["epoch"], state["batch_in_epoch"]) == (1, 3)
    nnforge.train("recsys", resume=str(stopped))
    a = load_checkpoint(straight.path / "checkpoints" / "last.safetensors")[0]
    b = load_checkpoint(stopped / "checkpoints" / "last.safetensors")[0]
    assert a.keys() == b.keys()
    for k in a:
        if not k.startswith("rng."):
            assert torch.equal(a[k], b[k]), k

    def metrics(path):
        return [{k: v for k, v in r.items() if k not in ("epoch_time_s", "elapsed_s", "examples_per_s")}
                for r in Run(path).read_metrics()]

    assert metrics(straight.path) == metrics(stopped)


# ----------------------------------------------------------------------------------------------------------------
# export and serving



def test_export_parity_and_the_server_answers_and_rejects_bad_input(planted, tmp_path):


    assert (USER, HISTORY) == (ROW_USER, ROW_HISTORY)  # the request row's layout, written and read in two places
    run = train(planted, tmp_path, "served", epochs=6, lr=0.01, model_args={"user_tower": "attention"})
    card = nnforge.export(run)
    assert card["parity"]["split"] == "recorded" and card["parity"]["max_abs_diff"] < 1e-4
    tower = card["graphs"]["item_tower"]
    assert tower["parity"]["max_abs_diff"] < 1e-4
    # the exported item tower places a new item as the PyTorch one does
    loaded = nnforge.load(run)
    emb = np.random.default_rng(1).standard_normal((3, 384)).astype(np.float32)
    session = ort.InferenceSession(str(run.path / tower["file"]), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(session.run(None, {"input": emb})[0],
                               loaded.model.text_vectors(torch.from_numpy(emb)).detach().numpy(), atol=1e-5)

    with serving_in_thread(str(run.path)) as url:
        info = httpx.get(url + "/v1/model").json()
        assert info["backend"] == "onnx" and info["verb"] == "recommend" and info["output"]["num_items"] == 30
        r = httpx.post(url + "/v1/recommend", json={"user": "scifi-u3", "k": 5, "exclude_seen": True})
        assert r.status_code == 200, r.text
        answer = r.json()["recommendations"][0]
        local = nnforge.recommend(run, user="scifi-u3", k=5, exclude_seen=True)
        assert answer["items"] == local["items"] and np.allclose(answer["scores"], local["scores"], atol=1e-3)
        assert answer["input"] == "user=scifi-u3" and answer["fallback"] is None
        r = httpx.post(url + "/v1/recommend", json={"history": ["romance-1", "romance-2"], "k": 3})
        assert r.status_code == 200 and all(genre_of(i) == "romance" for i in r.json()["recommendations"][0]["items"])
        r = httpx.post(url + "/v1/recommend", json={"user": 12345, "k": 4})
        unknown = r.json()["recommendations"][0]
        assert r.status_code == 200 and unknown["fallback"] == "popular" and len(unknown["items"]) == 4
        bad = {"k 0": ({"user": "scifi-u3", "k": 0}, '"k" must be a whole number from 1 to 30'),
               "k too large": ({"user": "scifi-u3", "k": 31}, "from 1 to 30"),
               "k not a number": ({"user": "scifi-u3", "k": "5"}, '"k" must be'),
               "two requests": ({"user": "scifi-u3", "item": "scifi-1"}, "exactly one of"),
               "unknown key": ({"user": "scifi-u3", "top": 3}, "unknown key(s) top"),
               "unknown item": ({"history": ["scifi-1", "nope"]}, "history[1]: unknown item 'nope'"),
               "not an id": ({"item": [1]}, "expected an id"),
               "not an object": ([1, 2], "expected a JSON object")}
        for case, (body, message) in bad.items():
            r = httpx.post(url + "/v1/recommend", json=body)
            assert r.status_code == 400 and message in r.json()["detail"], (case, r.status_code, r.text)
        r = httpx.post(url + "/v1/recommend", content=b"{not json", headers={"content-type": "application/json"})
        assert r.status_code == 400
        # an item added while the server runs is in its next answer (it reads items.safetensors again on a change)
        nnforge.add_items(run, [{"id": "cooking-new", "title": "Bread", "text": GENRES["cooking"]}])
        r = httpx.post(url + "/v1/recommend", json={"item": "cooking-new", "k": 3})
        assert r.status_code == 200 and all(genre_of(i) == "cooking" for i in r.json()["recommendations"][0]["items"])
        r = httpx.post(url + "/v1/recommend", json={"history": ["cooking-1", "cooking-new"], "k": 30})
        assert "cooking-new" in r.json()["recommendations"][0]["items"]
        r = httpx.post(url + "/v1/predict", json={"user": "scifi-u3"})
        assert r.status_code == 404 and "answers POST /v1/recommend" in r.json()["detail"]
        schema = httpx.get(url + "/openapi.json").json()["paths"]["/v1/recommend"]["post"]["requestBody"]
        props = schema["content"]["application/json"]["schema"]["properties"]
        assert props["k"]["maximum"] == 30 and set(props) == {"user", "history", "item", "k", "exclude_seen"}


def test_command_line_trains_with_no_other_flags(planted, tmp_path, capsys):
    assert main(["train", "recsys", "--data", planted["data"], "--model", "popularity", "--out", str(tmp_path)]) == 0
    run = Path(capsys.readouterr().out.strip().splitlines()[-1])
    assert (run / "items.safetensors").is_file() and (run / "report.html").is_file()
    assert main(["recommend", str(run), "--user", "cooking-u1", "--k", "2", "--json"]) == 0
    assert '"fallback": null' in capsys.readouterr().out
    assert main(["recommend", str(run), "--user", "cooking-u1", "--k", "0"]) == 2
    assert '"k" must be a whole number from 1 to 30' in capsys.readouterr().err
