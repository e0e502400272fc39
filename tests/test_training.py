"""train-adapter on a tiny random Llama (hidden 64, 2 layers) with the default model's tokenizer."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from peftserve.adapters import bottleneck as bn
from peftserve.adapters.training import cli
from peftserve.adapters.training.data import IGNORE_INDEX, DataError, encode, read_examples
from peftserve.adapters.training.evaluate import eval_loss
from peftserve.adapters.training.methods import METHODS, MethodOptions
from tests.tiny import default_tokenizer, save_tiny_model_dir, tiny_base
from peftserve.adapters.training.trainer import TrainArgs, Trainer

ROWS = [{"prompt": f"Is {w} a fruit?\nAnswer:", "completion": f" {a}"}
        for w, a in [("apple", "yes"), ("chair", "no"), ("pear", "yes"), ("stone", "no"), ("plum", "yes"),
                     ("lamp", "no"), ("mango", "yes"), ("cloud", "no"), ("kiwi", "yes"), ("spoon", "no")]]


@pytest.fixture(scope="module")
def tok_dir():
    return default_tokenizer()


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    return path


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return save_tiny_model_dir(tmp_path_factory.mktemp("tiny"))


def _args(data, out, method="lora", **kw):
    base = dict(method=method, data=str(data), eval_data=str(data), output=str(out), max_steps=6, batch_size=4,
                eval_every=3, progress=False, eval_max_examples=4, max_new_tokens=3, eval_batch_size=8,
                options=MethodOptions(num_virtual_tokens=4, reduction_factor=4, r=4))
    base.update(kw)
    return TrainArgs(**base)


def _fresh(tok_dir):
    return tiny_base(0, tok_dir[0], tok_dir[1])


# ----------------------------------------------------------------------------- every method


@pytest.mark.parametrize("method", METHODS)
def test_method_trains_saves_and_reloads(method, tok_dir, data_file, tmp_path):
    trainer = Trainer(_args(data_file, tmp_path, method), base=_fresh(tok_dir))
    before = eval_loss(trainer.model, trainer.eval_rows, trainer.pad_id, 8, "cpu")
    report = trainer.run()
    assert report["eval"]["loss"] < before, "training did not reduce the loss"
    assert 0 < report["params"]["trainable"] < report["params"]["total"]
    for name in ("adapter_config.json", "adapter_model.safetensors", "training_report.json", "loss_curve.png",
                 "best/adapter_model.safetensors", "last/trainer_state.json", "last/optimizer.safetensors"):
        assert (tmp_path / name).is_file(), name
    assert json.loads((tmp_path / "training_report.json").read_text())["eval"]["exact_match"] is not None

    ids = torch.tensor([trainer.train_rows[0].input_ids])
    live = trainer._unwrapped().eval()
    with torch.no_grad():
        expected = live(input_ids=ids).logits
    fresh = _fresh(tok_dir)[0]
    if method == "bottleneck":
        cfg, weights = bn.read_bottleneck(tmp_path, fresh)
        bn.attach_bottleneck(fresh, cfg, weights)
        loaded = fresh
    else:
        from peft import PeftModel

        loaded = PeftModel.from_pretrained(fresh, str(tmp_path)).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, expected, rtol=1e-5, atol=1e-5)


PROMPT_LEARNING = ("prompt-tuning", "p-tuning", "prefix-tuning", "p-tuning-v2")


@pytest.mark.parametrize("method", PROMPT_LEARNING)
def test_prompt_learning_adapter_is_alive_in_peft_trainer_and_server(method, tok_dir, data_file, tmp_path):
    """A few training steps give an adapter that changes the model's output (logits at every
    prompt position); PEFT's no-cache forward, the trainer's exact-match decoder and our server
    produce the same greedy tokens."""
    from peft import PeftModel

    from peftserve.adapters.training.evaluate import greedy_no_cache
    from peftserve.server.engine.config import EngineConfig
    from peftserve.server.build import build_engine
    from peftserve.server.engine.request import SamplingParams
    from tests.oracle import forward_oracle

    Trainer(_args(data_file, tmp_path / "out", method, max_steps=4), base=_fresh(tok_dir)).run()
    tok = tok_dir[0]
    prompts = [tok(r["prompt"]).input_ids for r in ROWS[:3]]
    base_model = _fresh(tok_dir)[0]
    base = [forward_oracle(base_model, p, 4) for p in prompts]
    peft_model = PeftModel.from_pretrained(_fresh(tok_dir)[0], str(tmp_path / "out")).eval()
    ref = [forward_oracle(peft_model, p, 4) for p in prompts]
    with torch.no_grad():
        for p in prompts:
            ids = torch.tensor([p])
            delta = (peft_model(input_ids=ids, use_cache=False).logits[:, -len(p):] - base_model(input_ids=ids).logits)
            assert delta.abs().max() > 1e-3, f"{method}: the trained adapter does not change the output"
    assert ref != base or method == "p-tuning", "the tiny model's argmax is too flat for a token-level check"
    assert greedy_no_cache(peft_model, prompts, max_new_tokens=4, eos_id=None, pad_id=tok.eos_token_id,
                           device="cpu") == ref  # the trainer's exact-match decoding, batched + padded
    serving = build_engine(_fresh(tok_dir)[0], tok, EngineConfig(max_batch_size=4, max_model_len=128),
                            store=tmp_path / "store")
    serving.registry.import_dir(tmp_path / "out", "trained")
    handle = serving.registry.resolve("trained")
    seqs = serving.engine.generate(prompts, SamplingParams(max_new_tokens=4, ignore_eos=True),
                                   adapters=[handle] * len(prompts))
    assert [s.output_ids for s in seqs] == ref


def test_trainer_refuses_a_prefix_that_never_reaches_the_model(tok_dir, data_file, tmp_path, monkeypatch):
    """Simulates a transformers release that drops the cache kwarg PEFT passes prefixes in."""
    from transformers import LlamaForCausalLM

    from peftserve.adapters.training.trainer import TrainingSetupError

    forward = LlamaForCausalLM.forward

    def deaf(self, *args, past_key_values=None, cache=None, **kw):
        return forward(self, *args, **kw)

    monkeypatch.setattr(LlamaForCausalLM, "forward", deaf)
    with pytest.raises(TrainingSetupError, match="does not reach the model's forward"):
        Trainer(_args(data_file, tmp_path, "prefix-tuning"), base=_fresh(tok_dir))


# ----------------------------------------------------------------------------- resume / Ctrl-C


def _interrupt_at(step):
    def hook(s, _loss):
        if s == step:
            raise KeyboardInterrupt

    return hook


def test_interrupt_then_resume_matches_uninterrupted_run(tok_dir, data_file, tmp_path):
    straight = Trainer(_args(data_file, tmp_path / "a", max_steps=4), base=_fresh(tok_dir))
    straight.run()
    expected = {k: v.detach().clone() for k, v in straight.trainable.trainable_state().items()}

    out = tmp_path / "b"
    report = Trainer(_args(data_file, out, max_steps=4), base=_fresh(tok_dir), on_step=_interrupt_at(2)).run()
    assert report["interrupted"] and report["step"] == 2
    state = json.loads((out / "last" / "trainer_state.json").read_text())
    assert state["step"] == 2 and len(state["history"]["train"]) == 2
    assert (out / "last" / "adapter_model.safetensors").is_file()
    assert not (out / "adapter_model.safetensors").exists()  # no final adapter from an interrupted run

    resumed = Trainer(_args(data_file, out, max_steps=4, resume=True), base=_fresh(tok_dir))
    assert resumed.step == 2
    report = resumed.run()
    assert report["step"] == 4 and not report["interrupted"]
    assert [s for s, _ in report["history"]["train"]] == [1, 2, 3, 4]
    for name, value in resumed.trainable.trainable_state().items():
        torch.testing.assert_close(value, expected[name], rtol=1e-5, atol=1e-6)


def test_sigint_stops_at_step_boundary(tok_dir, data_file, tmp_path):
    def hook(step, _loss):
        if step == 1:
            os.kill(os.getpid(), signal.SIGINT)  # a real Ctrl-C: only sets the stop flag

    previous = signal.getsignal(signal.SIGINT)
    report = Trainer(_args(data_file, tmp_path, method="bottleneck"), base=_fresh(tok_dir), on_step=hook).run()
    assert report["interrupted"] and report["step"] == 1
    assert json.loads((tmp_path / "last" / "trainer_state.json").read_text())["step"] == 1
    assert signal.getsignal(signal.SIGINT) is previous
    bn.read_bottleneck(tmp_path / "last", _fresh(tok_dir)[0])  # the checkpoint's adapter is valid


def test_existing_checkpoint_needs_resume_or_overwrite(tok_dir, data_file, tmp_path):
    from peftserve.adapters.training.trainer import TrainingSetupError

    Trainer(_args(data_file, tmp_path, max_steps=1), base=_fresh(tok_dir)).run()
    with pytest.raises(TrainingSetupError):
        Trainer(_args(data_file, tmp_path, max_steps=1), base=_fresh(tok_dir))
    with pytest.raises(Exception, match="method"):  # resuming with another method is refused
        Trainer(_args(data_file, tmp_path, method="ia3", max_steps=2, resume=True), base=_fresh(tok_dir))


# ----------------------------------------------------------------------------- data


def test_formats_and_completion_only_labels(tok_dir, tmp_path):
    tok = tok_dir[0]
    path = tmp_path / "mixed.jsonl"
    rows = [{"prompt": "2+2=", "completion": " 4"},
            {"instruction": "Say hi", "input": "", "output": "hi"},
            {"instruction": "Translate", "input": "chat", "output": "cat"},
            {"messages": [{"role": "user", "content": "ping"}, {"role": "assistant", "content": "pong"}]}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")  # blank lines are skipped
    examples = read_examples(path, tok)
    assert [e.completion for e in examples] == [" 4", "hi", "cat", "pong"]
    assert "### Input:\nchat" in examples[2].prompt and "### Input" not in examples[1].prompt
    assert examples[3].chat and examples[3].prompt.endswith("<|im_start|>assistant\n")
    for enc in encode(examples, tok, max_length=128):
        n_prompt = len(enc.prompt_ids)
        assert enc.labels[:n_prompt] == [IGNORE_INDEX] * n_prompt
        assert enc.labels[n_prompt:] == enc.input_ids[n_prompt:] and enc.labels[-1] == tok.eos_token_id


@pytest.mark.parametrize("content, line, message", [
    ("", None, "empty file"),
    ('{"prompt": "a", "completion": "b"}\n\n{"prompt": "a", "completion": \n', 3, "invalid JSON"),
    ('{"prompt": "a"}\n', 1, "missing field 'completion'"),
    ('{"prompt": "a", "completion": 5}\n', 1, "must be a string"),
    ('[1, 2]\n', 1, "JSON object"),
    ('{"text": "a"}\n', 1, "expected fields"),
    ('{"prompt": "a", "completion": "  "}\n', 1, "completion is empty"),
    ('{"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]}\n', 1, "assistant"),
    ('{"prompt": "a", "completion": "b"}\n{"prompt": "' + "word " * 80 + '", "completion": "b"}\n', 2,
     "max-length"),
])
def test_bad_data_names_file_and_line(tok_dir, tmp_path, content, line, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(content)
    with pytest.raises(DataError) as err:
        encode(read_examples(path, tok_dir[0]), tok_dir[0], max_length=32)
    assert err.value.line == line and message in str(err.value)
    assert str(err.value).startswith(f"{path}:{line}:" if line else f"{path}:")


# ----------------------------------------------------------------------------- CLI, torchrun, upload


def test_cli_ok_and_bad_data_exit_code(tiny_dir, data_file, tmp_path, capsys):
    common = ["--model", str(tiny_dir), "--max-steps", "2", "--batch-size", "4", "--no-progress",
              "--eval-max-examples", "2", "--max-new-tokens", "2"]
    out = tmp_path / "ok"
    assert cli.main(["--method", "bottleneck", "--data", str(data_file), "--eval-split", "0.2",
                     "--output", str(out), *common]) == 0
    report = json.loads((out / "training_report.json").read_text())
    assert report["data"]["n_eval"] == 2 and report["step"] == 2
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "a"}\n')
    assert cli.main(["--method", "lora", "--data", str(bad), "--output", str(tmp_path / "x"), *common]) == 2
    err = capsys.readouterr().err
    assert f"{bad}:2: missing field 'completion'" in err and "Traceback" not in err


@pytest.mark.timeout(90)  # ~15 s on an idle 2-core machine, ~30 s under heavy load
def test_torchrun_two_cpu_processes(tiny_dir, data_file, tmp_path):
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "peftserve.adapters.training.cli", "--method", "lora", "--model", str(tiny_dir),
           "--data", str(data_file), "--eval-data", str(data_file), "--max-steps", "3", "--batch-size", "2",
           "--output", str(out), "--cpu", "--no-progress", "--eval-max-examples", "2", "--max-new-tokens", "2"]
    env = dict(os.environ, OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME=os.environ.get("GLOO_SOCKET_IFNAME", "lo"))
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=85, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((out / "training_report.json").read_text())
    assert report["hyperparameters"]["world_size"] == 2 and report["step"] == 3
    assert (out / "adapter_model.safetensors").is_file()


def test_upload_goes_through_the_client(tmp_path, monkeypatch):
    """`train-adapter --upload` is the client's upload (one implementation): multipart parts,
    Bearer admin key, the server's error code in the message."""
    import httpx

    from peftserve.adapters.training.upload import UploadError, upload_adapter

    (tmp_path / "adapter_config.json").write_text("{}")
    (tmp_path / "adapter_model.safetensors").write_bytes(b"\0")
    seen, answers = [], [httpx.Response(201, json={"name": "sent", "version": "abc123", "kind": "LORA",
                                                   "warnings": ["trained on another base"]}),
                         httpx.Response(422, json={"error": {"code": "invalid_safetensors", "message": "bad"}})]

    def handler(request):
        seen.append((str(request.url), request.headers.get("authorization"), request.content))
        return answers.pop(0)

    real = httpx.Client
    monkeypatch.setattr(httpx, "Client", lambda **kw: real(**{**kw, "transport": httpx.MockTransport(handler)}))
    msg = upload_adapter(tmp_path, "http://srv:8000/", name="sent", admin_key="k")
    url, auth, body = seen[0]
    assert url == "http://srv:8000/adapters" and auth == "Bearer k"
    for part in (b'name="name"', b'name="adapter_config"', b'name="adapter_model"'):
        assert part in body
    assert "'sent' version abc123" in msg and "trained on another base" in msg
    with pytest.raises(UploadError, match="invalid_safetensors"):
        upload_adapter(tmp_path, "http://srv:8000", name="sent", admin_key="k")


def test_demo_tasks_are_reproducible(tmp_path):
    from peftserve.adapters.training.tasks.generate import TASKS, TASKS_DIR, write_task

    for name in TASKS:
        write_task(name, tmp_path)
        for split in ("train.jsonl", "eval.jsonl"):
            assert (tmp_path / name / split).read_text() == (TASKS_DIR / name / split).read_text()
        train = {json.loads(x)["prompt"] for x in (tmp_path / name / "train.jsonl").read_text().splitlines()}
        evals = {json.loads(x)["prompt"] for x in (tmp_path / name / "eval.jsonl").read_text().splitlines()}
        assert len(train) == 320 and len(evals) == 80 and not train & evals


def test_compare_table_row():
    from peftserve.adapters.training.compare import COLUMNS, table_row

    report = {"params": {"total": 1000, "trainable": 10, "trainable_percent": 1.0},
              "speed": {"steps_per_s": 2.0, "tokens_per_s": 100.0}, "memory": {"peak_rss_mb": 500.0},
              "eval": {"loss": 0.5, "exact_match": 0.75, "eval_examples_per_s": 3.0, "generate_examples_per_s": 1.0}}
    row = table_row("lora", report)
    assert len(row) == len(COLUMNS) and row[1] == "1,000" and row[-1] == "0.750"
    assert table_row("ia3", None)[1] == "failed"
    assert Path(cli.__file__).name == "cli.py"
