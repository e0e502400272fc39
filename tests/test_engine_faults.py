"""Engine-level fault handling around adapters (no HTTP): admission failures and version drops."""

from __future__ import annotations

import torch
from peft import LoraConfig, get_peft_model

from peftserve.adapters.config import AdapterKind
from peftserve.server.engine.config import EngineConfig
from peftserve.server.build import build_engine
from peftserve.server.engine.request import FinishReason, SamplingParams, Sequence, SeqStatus
from tests.test_lora_parity import StubTokenizer
from tests.tiny import tiny_llama


def _serving(tmp_path, names=("a", "b")):
    serving = build_engine(tiny_llama(0), StubTokenizer(), EngineConfig(max_batch_size=8, max_model_len=64),
                            store=tmp_path / "store")
    for i, name in enumerate(names):
        base = tiny_llama(0)  # seeds torch itself: seed the adapter afterwards
        torch.manual_seed(100 + i)
        get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False)
                       ).save_pretrained(tmp_path / name)
        serving.registry.import_dir(tmp_path / name, name)
    return serving


def _run(engine, seqs):
    for s in seqs:
        engine.add(s)
    while any(s.status is not SeqStatus.FINISHED for s in seqs):
        engine.step()


def test_adapter_install_failure_fails_only_that_request(tmp_path, monkeypatch):
    serving = _serving(tmp_path)
    bad = serving.registry.resolve("b")
    lora = serving.runtime.kinds[AdapterKind.LORA]
    real = lora.to_device

    def failing(ver, dtype, device):
        if ver.name == "b":
            raise MemoryError("simulated device OOM")
        return real(ver, dtype, device)

    monkeypatch.setattr(lora, "to_device", failing)
    params = SamplingParams(max_new_tokens=4, ignore_eos=True)
    seqs = [Sequence([1, 2, 3], params, lambda e: None, adapter=a) for a in (serving.registry.resolve("a"), bad, None)]
    serving.runtime._discard_staged()  # the uploads' staged copies dropped: activate copies (and fails) on the engine thread
    _run(serving.engine, seqs)
    assert [s.finish_reason for s in seqs] == [FinishReason.LENGTH, FinishReason.ERROR, FinishReason.LENGTH]
    assert serving.engine.snapshot().kv_blocks_requests == 0


def test_deleted_version_leaves_device_slot_when_its_last_request_ends(tmp_path):
    serving = _serving(tmp_path, names=("a",))
    ver = serving.registry.resolve("a")
    seq = Sequence([1, 2, 3], SamplingParams(max_new_tokens=6, ignore_eos=True), lambda e: None, adapter=ver)
    serving.engine.add(seq)
    serving.engine.step()  # admitted: the version now sits in a pinned device slot
    assert serving.runtime.resident == 1
    serving.registry.delete("a")  # pinned: stays until the running request is done
    assert serving.runtime.resident == 1
    while seq.status is not SeqStatus.FINISHED:
        serving.engine.step()
    assert seq.finish_reason is FinishReason.LENGTH and len(seq.output_ids) == 6
    assert serving.runtime.resident == 0
