"""The bundled demo model: loads offline, tokenises every script, and knows its languages."""

import importlib.util
import math
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from polyprune.data.heldout import heldout_stream
from polyprune.data.sources import BundledSource
from polyprune.eval.perplexity import stream_perplexity
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


def test_prune_demo_end_to_end_keeps_it_a_language_model(tmp_path, demo):
    from polyprune.cli import main

    out = tmp_path / "demo-sgpt"
    args = ["prune", "--model", "demo", "--method", "sparsegpt", "--calib", "de,en",
            "--nsamples", "16", "--seqlen", "128", "--out", str(out), "-q"]  # fmt: skip
    assert main(args) == 0
    from safetensors import safe_open

    with safe_open(str(out / "model.safetensors"), "pt") as f:  # saved in the source dtype
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}  # noqa: SIM118
    pruned = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    layers = [m for n, m in pruned.named_modules() if n.startswith("model.layers.") and
              isinstance(m, torch.nn.Linear)]  # fmt: skip
    assert len(layers) == 6 * 7
    for m in layers:
        assert (m.weight == 0).float().mean().item() == pytest.approx(0.5, abs=1e-3)
    model, tok = demo
    stream = heldout_stream(tok, "de", max_tokens=SLICE)
    dense_ppl, _, _ = stream_perplexity(model, stream, seqlen=256)
    pruned_ppl, _, _ = stream_perplexity(pruned, stream, seqlen=256)
    # at 50% the calibration language stays close to dense (a broken solver explodes it)
    assert 0.8 * dense_ppl < pruned_ppl < 1.5 * dense_ppl


def test_gptq_on_the_demo_model_round_trips_through_the_packed_format(tmp_path):
    from polyprune.cli import main

    outs = {}
    for fmt in ("gptq", "dense"):
        outs[fmt] = tmp_path / fmt
        args = ["quantize", "--model", "demo", "--method", "gptq", "--bits", "4",
                "--group-size", "128", "--calib", "de,en", "--nsamples", "8", "--seqlen", "64",
                "--format", fmt, "--out", str(outs[fmt]), "-q"]  # fmt: skip
        assert main(args) == 0
    packed = load_model(outs["gptq"], tokenizer=False).model
    dense = load_model(outs["dense"], tokenizer=False).model
    for (name, p), q in zip(packed.named_parameters(), dense.parameters(), strict=True):
        assert torch.equal(p, q), name
    assert packed.lm_head.weight is packed.model.embed_tokens.weight  # ties restored
