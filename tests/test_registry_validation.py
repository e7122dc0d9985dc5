"""validate_adapter_files: real PEFT adapters (tiny demo model) are accepted, and every malformed class is
refused before anything is stored, with the right error and `param`. Nothing here is ever unpickled."""
from __future__ import annotations

import io
import json
import math
import pickle

import pytest
import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from loraplex.engine.lora_weights import read_adapter
from loraplex.registry.adapter_config import CONFIG_FILE, WEIGHTS_FILE
from loraplex.registry.errors import AdapterTooLarge, InvalidAdapterFile
from loraplex.registry.validation import module_shapes_from_hf_config, validate_adapter_files

MAX_RANK = 16
MAX_BYTES = 10 << 20
Q_A = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
Q_B = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"


@pytest.fixture(scope="module")
def module_shapes(demo_model_dir):
    return module_shapes_from_hf_config(json.loads((demo_model_dir / "config.json").read_text()))


@pytest.fixture(scope="module")
def adapter_files(make_adapter) -> tuple[bytes, bytes]:
    """q/v/down_proj at r=8, v_proj at r=4 through rank_pattern."""
    directory = make_adapter("validation/good", r=8, target_modules=("q_proj", "v_proj", "down_proj"), rank_pattern={"v_proj": 4})
    return (directory / CONFIG_FILE).read_bytes(), (directory / WEIGHTS_FILE).read_bytes()


def validate(config: bytes, weights: bytes, shapes, max_rank: int = MAX_RANK, max_bytes: int = MAX_BYTES):
    return validate_adapter_files(config, weights, shapes, max_rank=max_rank, max_bytes=max_bytes, adapter_id="acme/sql")


def edited_config(config: bytes, **fields) -> bytes:
    return json.dumps({**json.loads(config), **fields}).encode()


def edited_tensors(weights: bytes, edit) -> bytes:
    tensors = load_safetensors(weights)
    edit(tensors)
    return save_safetensors(tensors)


def edited_header(weights: bytes, edit) -> bytes:
    """Rewrite the JSON header, keep the data section: for lies a writer library would never produce."""
    header_len = int.from_bytes(weights[:8], "little")
    header = json.loads(weights[8 : 8 + header_len])
    edit(header)
    raw = json.dumps(header).encode()
    return len(raw).to_bytes(8, "little") + raw + weights[8 + header_len :]


def refused(config: bytes, weights: bytes, shapes, match: str, param: str = WEIGHTS_FILE, **limits) -> InvalidAdapterFile:
    with pytest.raises(InvalidAdapterFile, match=match) as caught:
        validate(config, weights, shapes, **limits)
    assert caught.value.param == param and caught.value.adapter_id == "acme/sql"
    return caught.value


# --- accepted ----------------------------------------------------------------------------------------


def test_real_adapter_is_accepted_and_described(adapter_files, module_shapes):
    config, weights = adapter_files
    result = validate(config, weights, module_shapes)
    assert (result.rank, result.alpha, result.use_rslora) == (8, 16.0, False)
    assert result.target_modules == ("down_proj", "q_proj", "v_proj") and result.layers == (0, 1, 2, 3)
    assert result.num_bytes == len(config) + len(weights) and len(result.sha256) == 64
    assert result.sha256 != result.weights_sha256  # covers the config too


def test_config_only_change_changes_the_digest(adapter_files, module_shapes):
    config, weights = adapter_files
    before = validate(config, weights, module_shapes)
    after = validate(edited_config(config, lora_alpha=32), weights, module_shapes)
    assert after.weights_sha256 == before.weights_sha256 and after.sha256 != before.sha256


def test_what_is_accepted_the_engine_reads(adapter_files, module_shapes, tmp_path):
    config, weights = adapter_files
    validate(config, weights, module_shapes)
    (tmp_path / CONFIG_FILE).write_bytes(config)
    (tmp_path / WEIGHTS_FILE).write_bytes(weights)
    host = read_adapter("k", str(tmp_path), MAX_RANK, dict(module_shapes), torch.float32)
    assert host.max_rank == 8 and len(host.weights) == 3 * 4


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_is_accepted(adapter_files, module_shapes, dtype):
    config, weights = adapter_files
    halved = edited_tensors(weights, lambda t: t.update({k: v.to(dtype) for k, v in t.items()}))
    assert validate(config, halved, module_shapes).rank == 8


def test_module_shapes_follow_the_model_config():
    shapes = module_shapes_from_hf_config({"hidden_size": 64, "intermediate_size": 100, "num_hidden_layers": 2,
                                           "num_attention_heads": 4, "num_key_value_heads": 1})
    assert shapes[(1, "k_proj")] == (16, 64) and shapes[(0, "down_proj")] == (64, 100) and len(shapes) == 14


# --- refused: not safetensors ------------------------------------------------------------------------


def test_pickle_is_refused_by_magic_bytes(adapter_files, module_shapes, monkeypatch):
    monkeypatch.setattr(pickle, "loads", lambda *a, **k: pytest.fail("unpickled"))
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("torch.load called"))
    refused(adapter_files[0], pickle.dumps({Q_A: [1.0]}, protocol=4), module_shapes, "pickle")


def test_torch_zip_checkpoint_is_refused(adapter_files, module_shapes):
    buffer = io.BytesIO()
    torch.save({Q_A: torch.zeros(8, 128)}, buffer)
    refused(adapter_files[0], buffer.getvalue(), module_shapes, "torch zip checkpoint")


@pytest.mark.parametrize("cut", [0, 5, 20, -100])
def test_truncated_file_is_refused(adapter_files, module_shapes, cut):
    config, weights = adapter_files
    refused(config, weights[:cut], module_shapes, "truncated|outside|not a safetensors")


@pytest.mark.parametrize("delta", [+10, -5, 1 << 40])
def test_header_length_that_lies_is_refused(adapter_files, module_shapes, delta):
    config, weights = adapter_files
    lying = (int.from_bytes(weights[:8], "little") + delta).to_bytes(8, "little") + weights[8:]
    refused(config, lying, module_shapes, "header")


def test_overlapping_offsets_are_refused(adapter_files, module_shapes):
    def alias_b_onto_a(header):
        header[Q_B]["data_offsets"] = header[Q_A]["data_offsets"]
        header[Q_B]["shape"] = header[Q_A]["shape"][::-1]

    refused(adapter_files[0], edited_header(adapter_files[1], alias_b_onto_a), module_shapes, "overlaps")


def test_trailing_bytes_are_refused(adapter_files, module_shapes):
    refused(adapter_files[0], adapter_files[1] + b"\0" * 4, module_shapes, "after the last tensor")


def test_span_that_does_not_match_shape_is_refused(adapter_files, module_shapes):
    def grow(header):
        header[Q_A]["shape"] = [9, 128]

    refused(adapter_files[0], edited_header(adapter_files[1], grow), module_shapes, "do not hold")


def test_unsupported_dtype_is_refused(adapter_files, module_shapes):
    weights = edited_tensors(adapter_files[1], lambda t: t.update({Q_A: t[Q_A].double()}))
    refused(adapter_files[0], weights, module_shapes, "F64")


# --- refused: tensors --------------------------------------------------------------------------------


@pytest.mark.parametrize("name", [
    "base_model.model.lm_head.lora_A.weight",
    "base_model.model.model.layers.9.self_attn.q_proj.lora_A.weight",  # the model has 4 layers
    "base_model.model.model.layers.0.mlp.q_proj.lora_A.weight",  # q_proj lives in self_attn
    "base_model.model.model.layers.00.self_attn.q_proj.lora_A.weight",
])
def test_unknown_tensor_name_is_refused(adapter_files, module_shapes, name):
    weights = edited_tensors(adapter_files[1], lambda t: t.update({name: torch.zeros(8, 128)}))
    refused(adapter_files[0], weights, module_shapes, "not a LoRA weight|names no module")


def test_missing_lora_b_is_refused(adapter_files, module_shapes):
    refused(adapter_files[0], edited_tensors(adapter_files[1], lambda t: t.pop(Q_B)), module_shapes, "no lora_B")


def test_wrong_shape_is_refused(adapter_files, module_shapes):
    weights = edited_tensors(adapter_files[1], lambda t: t.update({Q_A: t[Q_A].T.contiguous()}))  # [d_in, r]
    refused(adapter_files[0], weights, module_shapes, "do not fit")


def test_adapter_for_another_model_is_refused(adapter_files, module_shapes):
    other = {**module_shapes, (0, "q_proj"): (128, 256)}
    refused(*adapter_files, other, "do not fit")


@pytest.mark.parametrize("value", [math.nan, math.inf])
def test_nan_or_inf_is_refused(adapter_files, module_shapes, value):
    def poison(tensors):
        tensors[Q_B][3, 1] = value

    refused(adapter_files[0], edited_tensors(adapter_files[1], poison), module_shapes, "NaN or inf")


def test_empty_adapter_is_refused(adapter_files, module_shapes):
    refused(adapter_files[0], save_safetensors({}), module_shapes, "no LoRA weights")


# --- refused: config ---------------------------------------------------------------------------------


def test_rank_above_max_is_refused(adapter_files, module_shapes):
    refused(*adapter_files, module_shapes, "max_lora_rank", param=CONFIG_FILE, max_rank=4)


def test_rank_inconsistent_with_config_is_refused(adapter_files, module_shapes):
    config = edited_config(adapter_files[0], rank_pattern={})  # v_proj tensors are r=4, config now says 8
    refused(config, adapter_files[1], module_shapes, "rank 4, config says 8", param="r")


@pytest.mark.parametrize(("fields", "match", "param"), [
    ({"use_dora": True}, "DoRA", "use_dora"),  # no magnitude vectors in the weights
    ({"peft_type": "LOHA"}, "peft_type 'LOHA' is not supported: LoHa", "peft_type"),
    ({"bias": "all"}, "biases", "bias"),
    ({"modules_to_save": ["lm_head"]}, "modules_to_save", "modules_to_save"),
    ({"target_modules": ["q_proj"]}, "not listed", CONFIG_FILE),
])
def test_unservable_config_is_refused(adapter_files, module_shapes, fields, match, param):
    refused(edited_config(adapter_files[0], **fields), adapter_files[1], module_shapes, match, param=param)


@pytest.mark.parametrize("config", [b"{not json", b"\xff\xfe", b"[1, 2]", b""])
def test_bad_json_is_refused(adapter_files, module_shapes, config):
    refused(config, adapter_files[1], module_shapes, "JSON", param=CONFIG_FILE)


def test_oversized_adapter_is_refused_first(adapter_files, module_shapes):
    bad_config, weights = b"{not json", adapter_files[1]
    limit = len(bad_config) + len(weights) - 1
    with pytest.raises(AdapterTooLarge) as caught:  # before the config is even parsed
        validate(bad_config, weights, module_shapes, max_bytes=limit)
    assert caught.value.status == 413 and caught.value.max_bytes == limit
