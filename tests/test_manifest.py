"""RunManifest: the typed polyprune.json, written and read back unchanged; old manifests with
fields missing or unknown are read explicitly (defaults, kept extras, or one clear error)."""

import json

import pytest

from polyprune.compress.manifest import MANIFEST, QuantizationRecord, RunManifest
from polyprune.errors import InputError


def full_manifest() -> RunManifest:
    return RunManifest(
        method="sparsegpt", kind="prune", model="/models/demo", version="0.1.0",
        command="polyprune prune ...", source=None,
        settings={"true_sequential": False, "sparsity": 0.5, "pattern": "unstructured"},
        quantization=QuantizationRecord(4, 128, False, False, False, "gptq", "gptq_v2"),
        calibration={"mix": "de,en", "seed": 0, "counts": {"de": 4, "en": 4}},
        achieved_sparsity=0.5, layers={"model.layers.0.mlp.up_proj": {"loss": 1.0}},
        seconds={"total": 1.5}, environment={"python": "3.12"},
    )  # fmt: skip


def test_a_manifest_round_trips_through_its_directory(tmp_path):
    m = full_manifest()
    m.write(tmp_path)
    assert RunManifest.from_dir(tmp_path) == m


def test_the_file_keeps_the_field_order_and_names_of_earlier_versions(tmp_path):
    full_manifest().write(tmp_path)
    raw = json.loads((tmp_path / MANIFEST).read_text())
    assert list(raw) == [
        "tool", "version", "command", "model", "source", "kind", "method", "settings",
        "quantization", "calibration", "achieved_sparsity", "layers", "seconds", "environment",
    ]  # fmt: skip
    assert raw["quantization"] == {"bits": 4, "group_size": 128, "sym": False,
                                   "act_order": False, "static_groups": False,
                                   "format": "gptq", "checkpoint_format": "gptq_v2"}  # fmt: skip


def test_unknown_fields_of_an_old_manifest_are_kept_and_written_back(tmp_path):
    raw = full_manifest().to_dict() | {"hardware": {"gpu": "none"}}
    raw["quantization"]["packer"] = "v0"
    (tmp_path / MANIFEST).write_text(json.dumps(raw))
    m = RunManifest.from_dir(tmp_path)
    assert m.extra == {"hardware": {"gpu": "none"}}
    assert m.quantization.extra == {"packer": "v0"}
    assert m.to_dict() == raw


def test_missing_optional_fields_get_their_defaults(tmp_path):
    (tmp_path / MANIFEST).write_text(json.dumps({"method": "rtn", "settings": {}}))
    m = RunManifest.from_dir(tmp_path)
    assert m.kind == "quantize"  # from the method registry: manifests before "kind"
    assert (m.model, m.quantization, m.calibration, m.layers) == (None, None, None, {})


def test_a_manifest_without_a_method_is_a_clear_input_error(tmp_path):
    (tmp_path / MANIFEST).write_text(json.dumps({"kind": "prune"}))
    with pytest.raises(InputError, match="polyprune.json lacks the field 'method'"):
        RunManifest.from_dir(tmp_path)


def test_a_field_of_the_wrong_type_is_a_clear_input_error(tmp_path):
    (tmp_path / MANIFEST).write_text(json.dumps({"method": "wanda", "settings": [1, 2]}))
    with pytest.raises(InputError, match=r"field 'settings' is \[1, 2\], not dict"):
        RunManifest.from_dir(tmp_path)


def test_a_directory_without_a_manifest_is_not_a_polyprune_output(tmp_path):
    with pytest.raises(InputError, match="is not a polyprune output"):
        RunManifest.from_dir(tmp_path)
