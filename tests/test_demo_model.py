"""The bundled demo model: loads offline, tokenises every script, and knows its languages."""

import importlib.util
import math
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from polyprune.data.sources import BundledSource
from polyprune.eval.perplexity import heldout_stream, stream_perplexity
from polyprune.models import DEMO_MODEL_DIR, load_model, resolve_model_path

ROOT = Path(__file__).resolve().parents[1]
SLICE = 1024  # held-out tokens per language: seconds on CPU


def train_script():
    spec = importlib.util.spec_from_file_location("tdm", ROOT / "scripts/train_demo_model.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def demo():
    model = AutoModelForCausalLM.from_pretrained(DEMO_MODEL_DIR, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(DEMO_MODEL_DIR)
    return model.eval(), tok


def test_demo_resolves_inside_the_package_and_meets_the_size_bounds():
    assert Path(resolve_model_path("demo")) == DEMO_MODEL_DIR
    cfg = load_model("demo", tokenizer=False).model.config
    assert cfg.num_hidden_layers >= 6 and cfg.hidden_size >= 256
    assert cfg.model_type == "llama" and cfg.hidden_act == "silu"
    size = sum(f.stat().st_size for f in DEMO_MODEL_DIR.iterdir())
    assert size <= 25 * 2**20
    assert (DEMO_MODEL_DIR / "README.md").read_text().count("| sw") == 1


def test_demo_is_package_data():
    text = (ROOT / "pyproject.toml").read_text()
    assert '"assets/demo/*"' in text


@pytest.mark.parametrize(
    "text",
    ["مرحبا بالعالم، هذا اختبار.", "Привет, мир! Это тест.", "你好，世界。这是一个测试。",
     "Grüße aus Köln: ¿qué tal?", "Habari ya dunia."],
)  # fmt: skip
def test_tokenizer_round_trips_every_script(demo, text):
    _, tok = demo
    assert tok.decode(tok(text, add_special_tokens=False)["input_ids"]) == text


def test_heldout_perplexity_beats_unigram_by_3x_and_swahili_is_clearly_worst(demo):
    model, tok = demo
    tdm = train_script()
    texts = tdm.training_text(BundledSource())
    train = torch.cat([tdm.token_stream(tok, docs) for docs in texts.values()])
    ppl, uni = {}, {}
    for lang in tdm.PAPER_LANGS:
        stream = heldout_stream(tok, lang, max_tokens=SLICE)
        ppl[lang], _, _ = stream_perplexity(model, stream, seqlen=512)
        uni[lang] = tdm.unigram_ppl(train, stream, len(tok))
    for lang in tdm.TRAIN_LANGS:
        assert ppl[lang] <= uni[lang] / 3, (lang, ppl[lang], uni[lang])
    worst_trained = max(ppl[lang] for lang in tdm.TRAIN_LANGS)
    assert ppl["sw"] > 2 * worst_trained, (ppl["sw"], worst_trained)
    assert all(math.isfinite(v) for v in ppl.values())
