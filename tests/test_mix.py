import pytest
import torch

from polyprune.data.cache import cache_dir
from polyprune.data.mix import CalibrationMix, build_calibration_set, largest_remainder
from polyprune.errors import InputError

PAPER = ["ar", "de", "en", "es", "ru", "sw", "zh"]


def test_two_languages_split_128_into_64_64():
    assert CalibrationMix.parse("de,en").counts(128) == {"de": 64, "en": 64}


def test_seven_languages_split_128_evenly():
    counts = CalibrationMix.parse(",".join(PAPER)).counts(128)
    assert sum(counts.values()) == 128
    assert max(counts.values()) - min(counts.values()) <= 1
    assert list(counts) == PAPER


def test_weights_split_by_largest_remainder():
    assert CalibrationMix.parse("de:3,en:1").counts(128) == {"de": 96, "en": 32}
    assert largest_remainder([1, 1, 1], 10) == [4, 3, 3]  # tie: earlier entry first
    assert largest_remainder([0.5, 0.3, 0.2], 7) == [4, 2, 1]  # quotas 3.5, 2.1, 1.4


def test_mix_round_trips_to_string():
    assert str(CalibrationMix.parse(" de:2 , en ")) == "de:2,en"


@pytest.mark.parametrize(
    "spec,match",
    [("", "empty"), ("de,,en", "not LANG"), ("de;en", "not LANG"), ("DE", "not LANG"),
     ("de:x", "not a number"), ("de:0", "must be > 0"), ("de:-1", "must be > 0"),
     ("de:nan", "must be > 0"), ("de,de", "twice")],
)  # fmt: skip
def test_bad_mix_is_input_error(spec, match):
    with pytest.raises(InputError, match=match):
        CalibrationMix.parse(spec)


def test_budget_too_small_for_mix_is_input_error():
    with pytest.raises(InputError, match="no sample"):
        CalibrationMix.parse(",".join(PAPER)).counts(5)


@pytest.mark.parametrize("mode", ["concat", "window"])
def test_same_seed_same_windows_other_seed_other_windows(tokenizer, mode):
    kw = dict(nsamples=6, seqlen=32 if mode == "concat" else 8, mode=mode, use_cache=False)
    a = build_calibration_set("de,en", tokenizer, seed=0, **kw)
    b = build_calibration_set("de,en", tokenizer, seed=0, **kw)
    c = build_calibration_set("de,en", tokenizer, seed=1, **kw)
    assert a.input_ids.shape == (6, kw["seqlen"])
    assert torch.equal(a.input_ids, b.input_ids) and a.fingerprint == b.fingerprint
    assert not torch.equal(a.input_ids, c.input_ids) and a.fingerprint != c.fingerprint
    assert a.langs == ["de"] * 3 + ["en"] * 3


def test_language_windows_do_not_depend_on_the_rest_of_the_mix(tokenizer):
    a = build_calibration_set("de,en", tokenizer, nsamples=8, seqlen=32, use_cache=False)
    b = build_calibration_set("de,ru", tokenizer, nsamples=8, seqlen=32, use_cache=False)
    assert torch.equal(a.input_ids[:4], b.input_ids[:4])


def test_concat_windows_are_distinct_slices_of_the_text(tokenizer):
    s = build_calibration_set("sw", tokenizer, nsamples=20, seqlen=64, use_cache=False)
    rows = {tuple(r.tolist()) for r in s.input_ids}
    assert len(rows) == 20


def test_windows_come_from_calibration_text_only(tokenizer):
    from polyprune.data.sources import BundledSource

    held = " ".join(BundledSource().documents("de", "heldout"))
    s = build_calibration_set("de", tokenizer, nsamples=4, seqlen=64, use_cache=False)
    for row in s.input_ids:
        assert tokenizer.decode(row[10:40]) not in held


def test_too_little_text_names_how_much_there_is(tokenizer):
    with pytest.raises(InputError, match=r"too little text in sw: [\d,]+ calibration tokens"):
        build_calibration_set("sw", tokenizer, nsamples=1000, seqlen=2048, use_cache=False)


def test_window_mode_needs_documents_longer_than_seqlen(tokenizer):
    with pytest.raises(InputError, match="use --sampling concat"):
        build_calibration_set("de", tokenizer, nsamples=2, seqlen=4000, mode="window",
                              use_cache=False)  # fmt: skip


def test_windows_are_cached_on_disk(tokenizer):
    a = build_calibration_set("es", tokenizer, nsamples=4, seqlen=32, seed=3)
    files = list((cache_dir() / "calib").glob("*.pt"))
    assert files
    b = build_calibration_set("es", tokenizer, nsamples=4, seqlen=32, seed=3)
    assert torch.equal(a.input_ids, b.input_ids)


def test_manifest_has_mode_counts_and_fingerprint(tokenizer):
    s = build_calibration_set("de:1,en:3", tokenizer, nsamples=8, seqlen=16, use_cache=False)
    m = s.manifest()
    assert m["counts"] == {"de": 2, "en": 6}
    assert m["sampling"] == "concat" and len(m["fingerprint"]) == 16 and m["mix"] == "de,en:3"
