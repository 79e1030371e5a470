import gzip
import json

import pytest

from polyprune.data.sources import (
    BundledSource,
    DirectorySource,
    Mc4Source,
    get_source,
    split_documents,
)
from polyprune.errors import InputError

PAPER = ["ar", "de", "en", "es", "ru", "sw", "zh"]


def test_bundled_serves_the_paper_languages_in_iso_639_1():
    langs = BundledSource().languages()
    assert set(PAPER) <= set(langs)
    assert all(len(code) == 2 for code in langs)


@pytest.mark.parametrize("lang", PAPER)
def test_bundled_split_is_disjoint_and_every_tenth_document_is_held_out(lang):
    src = BundledSource()
    calib, held = src.documents(lang, "calib"), src.documents(lang, "heldout")
    assert calib and held
    assert not set(calib) & set(held)
    assert len(held) == (len(calib) + len(held)) // 10


def test_split_rule():
    docs = [str(i) for i in range(25)]
    assert split_documents(docs, "heldout") == ["9", "19"]
    assert "9" not in split_documents(docs, "calib") and len(split_documents(docs, "calib")) == 23


def test_unknown_language_lists_what_the_source_has():
    with pytest.raises(InputError, match="unknown language 'xx'.*it has: ar, "):
        BundledSource().documents("xx")


def test_directory_source_reads_txt_paragraphs_and_jsonl(tmp_path):
    (tmp_path / "de.txt").write_text("\n\n".join(f"Absatz {i}." for i in range(20)))
    with open(tmp_path / "sw.jsonl", "w") as f:
        for i in range(20):
            f.write(json.dumps({"text": f"hati {i}", "id": i}) + "\n")
    src = get_source(str(tmp_path))
    assert isinstance(src, DirectorySource)
    assert src.languages() == ["de", "sw"]
    assert src.documents("de", "heldout") == ["Absatz 9.", "Absatz 19."]
    assert src.documents("sw")[0] == "hati 0" and len(src.documents("sw")) == 18


def test_directory_jsonl_without_text_field_is_input_error(tmp_path):
    (tmp_path / "de.jsonl").write_text('{"body": "x"}\n')
    with pytest.raises(InputError, match="'text' field"):
        get_source(str(tmp_path)).documents("de")


def test_missing_directory_is_input_error(tmp_path):
    with pytest.raises(InputError, match="neither 'bundled', 'mc4' nor an existing directory"):
        get_source(str(tmp_path / "nope"))


def write_shard(path, texts):
    path.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(path, "wt", encoding="utf-8") as f:
        for t in texts:
            f.write(json.dumps({"text": t, "timestamp": "2020-01-01T00:00:00Z", "url": "u"}) + "\n")


def test_mc4_reads_train_shards_for_calibration_and_validation_for_heldout(tmp_path):
    ml = tmp_path / "multilingual"
    write_shard(ml / "c4-sw.tfrecord-00000-of-00032.json.gz", ["habari ya asubuhi", "karibu"])
    write_shard(ml / "c4-sw-validation.tfrecord-00000-of-00001.json.gz", ["kwaheri"])
    src = Mc4Source(root=str(tmp_path))
    assert src.shard_files("sw", "calib") == [str(ml / "c4-sw.tfrecord-00000-of-00032.json.gz")]
    assert src.documents("sw", "calib") == ["habari ya asubuhi", "karibu"]
    assert src.documents("sw", "heldout") == ["kwaheri"]


def test_mc4_maps_hebrew_and_names_hub_files():
    src = Mc4Source()
    assert src.shard_files("he", "calib") == [
        "hf://datasets/allenai/c4/multilingual/c4-iw.tfrecord-00000-of-01024.json.gz"
    ]
    assert "allenai--c4" not in src.shard_files("de", "heldout")[0]
    assert set(PAPER) <= set(src.languages())


def test_mc4_unreachable_fails_with_one_line_suggesting_bundled(tmp_path):
    src = Mc4Source(root=str(tmp_path / "offline"))
    with pytest.raises(InputError, match="--source bundled") as e:
        src.documents("de")
    assert "\n" not in str(e.value)
