"""Per-language statistics (compress/langstats.py): a mix's statistic is the statistic of the
single run the module docstring names, to fp32 rounding; a single-language mix bit for bit."""

from __future__ import annotations

import pytest
import torch

from polyprune.compress.langstats import LanguageStats, equivalent_run, mix_shares
from polyprune.compress.stats import InputStats
from polyprune.data.mix import build_calibration_set
from polyprune.errors import InputError

SEQLEN, DIM, BATCH = 16, 24, 3
KINDS = ["hessian", "colsq"]


def activations(ids: torch.Tensor) -> torch.Tensor:
    """Deterministic stand-in for a block's inputs: a fixed random embedding of the tokens
    plus a token-position term, (N, T, DIM); the statistic then depends on the windows."""
    g = torch.Generator().manual_seed(7)
    table = torch.randn(512, DIM, generator=g)
    pos = torch.randn(ids.shape[1], DIM, generator=g) * 0.1
    return table[ids] + pos


def run_stats(x: torch.Tensor, kind: str, batch: int = BATCH) -> InputStats:
    """The statistic a plain run accumulates: its windows in order, ``batch`` at a time."""
    st = InputStats(kind, DIM)
    for a in range(0, x.shape[0], batch):
        st.update(x[a : a + batch])
    return st


def stat(st: InputStats) -> torch.Tensor:
    return st.H if st.kind == "hessian" else st.colsq


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def language_stats(pools: dict[str, torch.Tensor], kind: str, **kw) -> LanguageStats:
    ls = LanguageStats(kind, DIM, tuple(pools), **kw)
    for lang, x in pools.items():  # each pool batched from its start, as a run batches it
        for a in range(0, x.shape[0], BATCH):
            ls.update(lang, x[a : a + BATCH])
    return ls


@pytest.fixture(scope="module")
def pools(tokenizer):
    """Pools of 6 (de), 6 (en), 2 (sw) windows, each what a run gives that language."""
    sizes = {"de": 6, "en": 6, "sw": 2}
    return {
        lang: build_calibration_set(lang, tokenizer, nsamples=n, seqlen=SEQLEN, use_cache=False)
        for lang, n in sizes.items()
    }


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(
    "weights", [{"de": 1, "en": 1}, {"de": 3, "sw": 1}, {"de": 1, "en": 1, "sw": 1 / 3}]
)
def test_weighted_mix_equals_the_run_over_the_concatenated_windows(tokenizer, pools, kind, weights):
    sizes = {lang: s.nsamples for lang, s in pools.items()}
    spec, nsamples = equivalent_run(weights, sizes)
    run = build_calibration_set(spec, tokenizer, nsamples=nsamples, seqlen=SEQLEN, use_cache=False)
    # the run's windows are the pools of its languages, concatenated in mix order
    assert torch.equal(run.input_ids, torch.cat([pools[lang].input_ids for lang in run.counts]))
    ls = language_stats({lang: activations(s.input_ids) for lang, s in pools.items()}, kind)
    # the run batches across language boundaries (6 + 2 windows in batches of 3)
    expected = run_stats(activations(run.input_ids), kind)
    got = ls.mix(weights)
    assert rel_err(stat(got), stat(expected)) < 1e-5
    torch.testing.assert_close(
        stat(got), stat(expected), rtol=1e-5, atol=1e-5 * float(stat(expected).abs().max())
    )
    assert got.n == expected.n


def test_weights_not_proportional_to_the_pools_have_no_equivalent_run():
    assert equivalent_run({"de": 3, "en": 1}, {"de": 6, "en": 6}) is None
    assert equivalent_run({"de": 1, "en": 1}, {"de": 6, "en": 6}) == ("de,en", 12)
    assert equivalent_run({"de": 3, "en": 1, "sw": 0}, {"de": 6, "en": 2, "sw": 6}) == (
        "de:3,en",
        8,
    )
    assert equivalent_run({"sw": 5}, {"de": 6, "sw": 2}) == ("sw", 2)


def test_a_pool_is_not_a_prefix_of_a_larger_pool(tokenizer):
    """Why a pool stands for one run only: fewer windows of a language are other windows."""
    big = build_calibration_set("de", tokenizer, nsamples=8, seqlen=32, use_cache=False).input_ids
    small = build_calibration_set("de", tokenizer, nsamples=4, seqlen=32, use_cache=False).input_ids
    assert not torch.equal(big[:4], small)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("storage", ["device", "cpu", "disk"])
def test_single_language_mix_is_bit_for_bit_that_language_alone(pools, kind, storage):
    xs = {lang: activations(s.input_ids) for lang, s in pools.items()}
    ls = language_stats(xs, kind, storage=storage)
    alone = run_stats(xs["en"], kind)  # the run --calib en --nsamples 6
    for weights in ({"en": 1.0}, {"de": 0.0, "en": 0.25, "sw": 0.0}):
        got = ls.mix(weights)
        assert torch.equal(stat(got), stat(alone)) and got.n == alone.n
    assert torch.equal(stat(ls.get("en")), stat(alone))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("storage", ["cpu", "disk"])
def test_off_device_storage_gives_the_same_bits_as_device_storage(pools, kind, storage):
    xs = {lang: activations(s.input_ids) for lang, s in pools.items()}
    on = language_stats(xs, kind)
    off = LanguageStats(kind, DIM, tuple(xs), storage=storage)
    # interleaved languages: each switch parks one language and loads another
    for a in range(0, 6, BATCH):
        for lang, x in xs.items():
            if a < x.shape[0]:
                off.update(lang, x[a : a + BATCH])
    for weights in ({"de": 1, "en": 2, "sw": 1}, {"sw": 1}):
        assert torch.equal(stat(off.mix(weights)), stat(on.mix(weights)))
    assert off.nbytes()["device"] * 3 == off.nbytes()["off_device"]


def test_disk_storage_keeps_parked_languages_in_a_memory_map(pools):
    ls = LanguageStats("hessian", DIM, ("de", "en"), storage="disk")
    ls.update("de", activations(pools["de"].input_ids))
    ls.update("en", activations(pools["en"].input_ids))  # parks de
    parked = ls._parked["de"]
    assert parked.device.type == "cpu"
    expected = run_stats(activations(pools["de"].input_ids), "hessian", batch=6)
    assert torch.equal(torch.triu(parked), torch.triu(expected.H_upper))


def test_update_rows_routes_each_row_to_its_language(pools):
    xs = {lang: activations(s.input_ids) for lang, s in pools.items()}
    labels = ["de"] * 6 + ["sw"] * 2
    batch = torch.cat([xs["de"], xs["sw"]])
    ls = LanguageStats("hessian", DIM, ("de", "sw"))
    for a in range(0, 8, 4):  # batches of 4: the second holds de and sw rows
        ls.update_rows(batch[a : a + 4], labels[a : a + 4])
    assert ls.n == {"de": 6 * SEQLEN, "sw": 2 * SEQLEN}
    for lang in ("de", "sw"):
        assert rel_err(ls.get(lang).H, run_stats(xs[lang], "hessian").H) < 1e-6


@pytest.mark.parametrize(
    "weights,match",
    [({"fr": 1}, "fr, which has no statistics"), ({"de": 0}, "weight > 0"),
     ({"de": -1}, "must be a finite number >= 0"), ({"de": float("nan")}, "finite")],
)  # fmt: skip
def test_bad_mix_is_input_error(weights, match):
    with pytest.raises(InputError, match=match):
        mix_shares(weights, ("de", "en"))


def test_mix_of_a_language_never_seen_is_input_error():
    ls = LanguageStats("colsq", DIM, ("de", "en"))
    ls.update("de", torch.randn(2, 4, DIM))
    with pytest.raises(InputError, match="no activations seen for en"):
        ls.mix({"de": 1, "en": 1})
    with pytest.raises(InputError, match="no statistics for fr"):
        ls.update("fr", torch.randn(2, 4, DIM))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (the Triton Hessian path)")
@pytest.mark.parametrize("storage", ["device", "cpu", "disk"])
def test_on_cuda_every_storage_gives_the_device_bits_and_the_cpu_values(pools, storage):
    xs = {lang: activations(s.input_ids) for lang, s in pools.items()}
    on = language_stats({k: x.cuda() for k, x in xs.items()}, "hessian", device="cuda")
    ls = language_stats({k: x.cuda() for k, x in xs.items()}, "hessian", device="cuda",
                        storage=storage)  # fmt: skip
    cpu = language_stats(xs, "hessian")
    weights = {"de": 1, "en": 2, "sw": 1}
    assert torch.equal(ls.mix(weights).H, on.mix(weights).H)
    assert torch.equal(ls.mix({"sw": 1}).H, on.get("sw").H)
    assert rel_err(ls.mix(weights).H.cpu(), cpu.mix(weights).H) < 1e-5
