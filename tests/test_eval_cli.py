"""``polyprune eval``: perplexity and lm-eval tasks per language into one JSON file."""

import json

import pytest

from polyprune.cli import main
from polyprune.eval.perplexity import perplexity
from polyprune.models import load_model


def cli(*args):
    try:
        return main([str(a) for a in args])
    except SystemExit as e:
        return e.code


def test_eval_writes_ppl_and_task_scores_and_lists_unavailable_tasks(tmp_path, capsys):
    pytest.importorskip("lm_eval")
    out = tmp_path / "eval.json"
    tasks = "ppl,nextsent,belebele"
    args = ["eval", "--model", "demo", "--langs", "de,sw", "--tasks", tasks, "--seqlen", "64",
            "--max-tokens", "256", "--limit", "4", "--out", out, "-q"]  # fmt: skip
    assert cli(*args) == 0
    report = json.loads(out.read_text())
    got = {(r["task"], r["lang"], r["metric"]): r["value"] for r in report["results"]}
    metrics = (("ppl", "ppl"), ("nextsent", "acc"), ("nextsent", "acc_norm"))
    assert set(got) == {(t, lang, m) for lang in ("de", "sw") for t, m in metrics}
    demo = load_model("demo")
    direct = perplexity(demo.model, demo.tokenizer, ["sw"], seqlen=64, max_tokens=256,
                        progress=False)  # fmt: skip
    assert got[("ppl", "sw", "ppl")] == pytest.approx(direct["sw"].ppl, rel=1e-6)
    assert [(u["task"], u["lang"]) for u in report["unavailable"]] == [
        ("belebele", "de"),
        ("belebele", "sw"),
    ]
    assert report["command"].startswith("polyprune eval --model demo")
    assert "written to" in capsys.readouterr().out
    assert [p.name for p in tmp_path.iterdir()] == ["eval.json"]  # no temporary file left

    assert cli(*args) == 2  # never overwritten without --overwrite
    assert "--overwrite" in capsys.readouterr().err


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--tasks", "ppl,squad"], "unknown task 'squad'"),
        (["--langs", "de,xx"], "unknown language 'xx'"),
        (["--model", "./missing"], "does not exist"),
        (["--limit", "0"], "limit must be >= 1"),
    ],
)
def test_eval_bad_input_is_one_line_and_exit_2(tmp_path, capsys, extra, message):
    base = {"--model": "demo", "--langs": "de", "--tasks": "ppl", "--out": tmp_path / "x.json"}
    for flag, value in zip(extra[::2], extra[1::2], strict=True):
        base[flag] = value
    args = ["eval", *[str(x) for kv in base.items() for x in kv], "-q"]
    assert cli(*args) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert not (tmp_path / "x.json").exists()
