"""Loading: the hub hint names `hf download`, a base-architecture checkpoint loads as itself."""

from __future__ import annotations

import logging

import pytest
import torch
import transformers as tf

import workbench as wb
from workbench.errors import ModelLoadError


def test_hub_hint_names_hf_download(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    with pytest.raises(ModelLoadError, match=r"\(hf download ID\)") as exc:
        wb.load_model("nobody-here/no-such-model")
    assert "huggingface-cli" not in str(exc.value)


def test_base_architecture_loads_as_itself(tmp_path, capfd, caplog):
    torch.manual_seed(0)
    cfg = tf.BertConfig(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=48, max_position_embeddings=64)
    tf.BertModel(cfg).save_pretrained(tmp_path)
    capfd.readouterr()
    with caplog.at_level(logging.WARNING):
        model = wb.load_model(tmp_path)
    out = capfd.readouterr()
    assert type(model).__name__ == "BertModel"
    report = out.out + out.err + caplog.text
    assert "LOAD REPORT" not in report and "MISSING" not in report and "newly initialized" not in report
