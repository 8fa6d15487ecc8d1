"""Bad checkpoints fail loudly, naming the file and the tensor; saving round-trips."""
import json
import re

import pytest
import torch
from safetensors.torch import save_file

from srlm_engine.config import ConfigError
from srlm_engine.model.llama import Llama
from srlm_engine.model.weights import WeightsError, load_model, save_model


@pytest.fixture
def ckpt(tmp_path, tiny_writer):
    tiny_writer(tmp_path, "gqa_untied")
    return tmp_path


def test_missing_weights_file(ckpt):
    (ckpt / "model.safetensors").unlink()
    with pytest.raises(WeightsError, match=r"model\.safetensors: weights file not found"):
        load_model(ckpt)


def test_pickle_weights_refused(ckpt):
    (ckpt / "model.safetensors").unlink()
    (ckpt / "pytorch_model.bin").write_bytes(b"\x80\x04")
    with pytest.raises(WeightsError, match="safetensors only"):
        load_model(ckpt)


def test_missing_model_directory(tmp_path):
    with pytest.raises(WeightsError, match="model directory not found"):
        load_model(tmp_path / "nope")


def test_truncated_file_names_the_tensor(ckpt):
    f = ckpt / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) - 1000])
    with pytest.raises(WeightsError, match=r"model\.safetensors: truncated: tensor '[\w.]+'"):
        load_model(ckpt)


def test_truncated_header(ckpt):
    f = ckpt / "model.safetensors"
    f.write_bytes(f.read_bytes()[:100])
    with pytest.raises(WeightsError, match=r"model\.safetensors: truncated safetensors file"):
        load_model(ckpt)


def _rewrite_header(f, edit):
    import struct

    raw = f.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = edit(json.loads(raw[8:8 + n]))
    new = json.dumps(header).encode()
    f.write_bytes(struct.pack("<Q", len(new)) + new + raw[8 + n:])


def _first_tensor(header):
    return next(k for k in header if k != "__metadata__")


@pytest.mark.parametrize("case", ["shape", "offsets", "entry", "not an object"])
def test_corrupt_header_names_the_tensor(ckpt, case):
    f = ckpt / "model.safetensors"
    name = {}

    def edit(h):
        name["t"] = t = _first_tensor(h)
        if case == "shape":  # the bytes no longer hold the shape it claims
            h[t]["shape"] = [d + 1 for d in h[t]["shape"]]
        elif case == "offsets":
            h[t]["data_offsets"] = h[t]["data_offsets"][::-1]
        elif case == "entry":
            del h[t]["data_offsets"]
        else:
            return [h]
        return h

    _rewrite_header(f, edit)
    want = ("corrupt safetensors header (not a JSON object)" if case == "not an object" else
            f"tensor '{name['t']}': data_offsets" if case in ("shape", "offsets") else
            f"corrupt safetensors header entry for tensor '{name['t']}'")
    with pytest.raises(WeightsError, match=re.escape(f"model.safetensors: {want}")):
        load_model(ckpt)


def _rewrite(ckpt, edit):
    from safetensors.torch import load_file
    sd = load_file(ckpt / "model.safetensors")
    edit(sd)
    save_file(sd, ckpt / "model.safetensors")


def test_missing_tensor_named(ckpt):
    _rewrite(ckpt, lambda sd: sd.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(WeightsError, match=r"missing tensor\(s\) model\.layers\.1\.mlp\.up_proj\.weight"):
        load_model(ckpt)


def test_wrong_shape_names_tensor_and_file(ckpt):
    def edit(sd):
        sd["model.layers.0.self_attn.k_proj.weight"] = torch.zeros(7, 48)
    _rewrite(ckpt, edit)
    with pytest.raises(WeightsError, match=r"model\.safetensors: tensor 'model\.layers\.0\.self_attn\.k_proj\.weight' "
                                           r"has shape \(7, 48\), config\.json implies \(16, 48\)"):
        load_model(ckpt)


def test_unexpected_tensor_named(ckpt):
    _rewrite(ckpt, lambda sd: sd.update({"model.layers.9.mlp.up_proj.weight": torch.zeros(2)}))
    with pytest.raises(WeightsError, match=r"unexpected tensor 'model\.layers\.9\.mlp\.up_proj\.weight'"):
        load_model(ckpt)


def test_config_missing_field(ckpt):
    cfg = json.loads((ckpt / "config.json").read_text())
    del cfg["hidden_size"]
    (ckpt / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match=r"config\.json: missing field 'hidden_size'"):
        load_model(ckpt)


def test_config_invalid_field(ckpt):
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["num_key_value_heads"] = 4  # 6 query heads cannot share 4 kv heads
    (ckpt / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match=r"config\.json: num_attention_heads \(6\) must be a multiple"):
        load_model(ckpt)


@pytest.mark.parametrize("field, value, msg", [
    ("tie_word_embeddings", "false", r"tie_word_embeddings must be true or false, got 'false'"),  # not truthy
    ("rms_norm_eps", "1e-5", r"rms_norm_eps must be a number, got '1e-5'"),
    ("eos_token_id", [2, "3"], r"eos_token_id must be an integer or a list of integers or unset"),
    ("rope_scaling", "llama3", r"rope_scaling must be an object or null, got 'llama3'"),
    ("rope_scaling", {"rope_type": "llama3", "factor": None, "low_freq_factor": 1, "high_freq_factor": 4,
                      "original_max_position_embeddings": 64}, r"rope_scaling's factor, .* must be numbers"),
    # values that would load and compute garbage (infinite inv_freq) or divide by zero
    ("rope_theta", 0, r"rope_theta must be a finite number > 0, got 0"),
    ("rope_theta", -1.0, r"rope_theta must be a finite number > 0"),
    ("rms_norm_eps", float("inf"), r"rms_norm_eps must be a finite number > 0, got inf"),
    ("rope_scaling", {"rope_type": "llama3", "factor": 0, "low_freq_factor": 1, "high_freq_factor": 4,
                      "original_max_position_embeddings": 64}, r"rope_scaling needs factor > 0"),
    ("rope_scaling", {"rope_type": "llama3", "factor": 8, "low_freq_factor": 4, "high_freq_factor": 4,
                      "original_max_position_embeddings": 64}, r"rope_scaling needs .* 0 < low_freq_factor < high_freq_factor"),
    ("rope_scaling", {"rope_type": "llama3", "factor": 8, "low_freq_factor": 1, "high_freq_factor": 4,
                      "original_max_position_embeddings": 0}, r"rope_scaling needs .* original_max_position_embeddings > 0"),
    ("rope_scaling", {"factor": 8.0}, r"rope_scaling has settings but no rope_type"),
    ("rope_parameters", [1], r"rope_parameters must be an object or null, got \[1\]"),
])
def test_config_field_of_the_wrong_type_named(ckpt, field, value, msg):
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg[field] = value
    (ckpt / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match=r"config\.json: " + msg):
        load_model(ckpt)


def test_tied_config_with_a_different_lm_head_is_refused(tmp_path, tiny_writer):
    tiny_writer(tmp_path, "gqa_untied")  # lm_head.weight differs from the embedding
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["tie_word_embeddings"] = True  # edited by hand: loading would silently drop the trained head
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(WeightsError, match=r"model\.safetensors: config\.json ties the embeddings .* "
                                           r"'lm_head\.weight' differs from 'model\.embed_tokens\.weight'"):
        load_model(tmp_path)


def test_tied_config_with_an_equal_lm_head_copy_loads(tmp_path, tiny_writer):
    from safetensors.torch import load_file
    tiny_writer(tmp_path, "mha_tied")
    sd = load_file(tmp_path / "model.safetensors")
    sd["lm_head.weight"] = sd["model.embed_tokens.weight"].clone()  # as some exporters write it
    save_file(sd, tmp_path / "model.safetensors")
    m = load_model(tmp_path)
    assert m.lm_head.weight is m.embed_tokens.weight


def test_integer_weights_are_refused(ckpt):
    from safetensors.torch import load_file
    sd = load_file(ckpt / "model.safetensors")
    sd["model.norm.weight"] = sd["model.norm.weight"].to(torch.int32)
    save_file(sd, ckpt / "model.safetensors")
    with pytest.raises(WeightsError, match=r"model\.safetensors: tensor 'model\.norm\.weight' has dtype I32; "
                                           r"weights must be floating point"):
        load_model(ckpt)


def test_safetensors_errors_name_the_file(ckpt):
    f = ckpt / "model.safetensors"
    f.write_bytes(f.read_bytes() + b"\0" * 16)  # data the header does not account for
    with pytest.raises(WeightsError, match=r"model\.safetensors: corrupt safetensors file: .*"):
        load_model(ckpt)


def test_missing_shard(tmp_path, tiny_writer):
    tiny_writer(tmp_path, "mha_tied", max_shard_bytes=20_000)
    shard = sorted(tmp_path.glob("model-*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(WeightsError, match=f"{shard.name}: shard listed in"):
        load_model(tmp_path)


@pytest.mark.parametrize("shard", ["../other/model.safetensors", "/abs/model.safetensors", "sub/x.safetensors", ".."])
def test_shard_outside_the_model_folder_is_refused(tmp_path, tiny_writer, shard):
    """The index's weight_map names files of the model folder only; following '../other/model.safetensors'
    would load another folder's weights (here: a whole valid model, nothing else wrong)."""
    tiny_writer(tmp_path / "other", "mha_tied")
    model = tmp_path / "m"
    tiny_writer(model, "mha_tied", max_shard_bytes=20_000)
    index = json.loads((model / "model.safetensors.index.json").read_text())
    index["weight_map"] = {k: shard for k in index["weight_map"]}
    (model / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(WeightsError, match=rf"index\.json: weight_map names '{re.escape(shard)}'; a shard must be a file"):
        load_model(model)


def test_two_names_for_one_tensor_are_refused(ckpt):
    """'model.norm.weight' and 'norm.weight' both map to the final norm: the second one won, silently."""
    _rewrite(ckpt, lambda sd: sd.update({"norm.weight": sd["model.norm.weight"] * 2}))
    with pytest.raises(WeightsError, match=r"model\.safetensors: tensors '(model\.)?norm\.weight' and "
                                           r"'(model\.)?norm\.weight' are both 'model\.norm\.weight'"):
        load_model(ckpt)


def test_save_roundtrip_single_and_sharded(tmp_path, tiny_config_of):
    model = Llama(tiny_config_of("mha_tied")).init_weights(3)
    for sub, shard in (("one", 10**9), ("many", 30_000)):
        save_model(model, tmp_path / sub, max_shard_bytes=shard)
        back = load_model(tmp_path / sub)
        sd, sd2 = model.state_dict(), back.state_dict()
        assert sd.keys() == sd2.keys() and all(torch.equal(sd[k], sd2[k]) for k in sd)
        assert back.lm_head.weight is back.embed_tokens.weight  # still tied after loading
    assert len(list((tmp_path / "many").glob("model-*-of-*.safetensors"))) > 1
    assert not (tmp_path / "one" / "model.safetensors.index.json").exists()
    # Re-saving into the sharded folder unsharded removes the old shards and their index.
    save_model(model, tmp_path / "many", max_shard_bytes=10**9)
    assert sorted(p.name for p in (tmp_path / "many").iterdir()) == ["config.json", "model.safetensors"]


def test_save_removes_only_its_own_stale_layout(tmp_path, tiny_config_of):
    model = Llama(tiny_config_of("mha_tied")).init_weights(seed=0)
    save_model(model, tmp_path, max_shard_bytes=20_000)  # shards
    (tmp_path / "model_backup_v1.safetensors").write_bytes(b"the user's")
    save_model(model, tmp_path)  # one file now: the shards go, the user's file stays
    assert sorted(p.name for p in tmp_path.glob("*.safetensors")) == ["model.safetensors", "model_backup_v1.safetensors"]
    assert not (tmp_path / "model.safetensors.index.json").exists()


def test_a_save_killed_midway_leaves_the_old_weights_loading(tmp_path, tiny_config_of, monkeypatch):
    """Re-saving a sharded model with the same shard count must not overwrite model-00001-of-0000N in
    place: a save killed after the first shard would leave old and new shards that load together,
    without an error. New shards take names the live index does not list, and the new index commits
    them."""
    from srlm_engine.model import weights
    old, new = (Llama(tiny_config_of("mha_tied")).init_weights(seed=s) for s in (0, 1))
    save_model(old, tmp_path, max_shard_bytes=20_000)
    first = sorted(p.name for p in tmp_path.glob("model-*.safetensors"))
    assert len(first) > 2 and all(not n.endswith(".b.safetensors") for n in first)
    real, calls = weights.save_file, []

    def killed_after_one(*a, **kw):
        if calls:
            raise KeyboardInterrupt("killed")
        calls.append(1)
        return real(*a, **kw)
    monkeypatch.setattr(weights, "save_file", killed_after_one)
    with pytest.raises(KeyboardInterrupt):
        save_model(new, tmp_path, max_shard_bytes=20_000)
    sd, back = old.state_dict(), load_model(tmp_path).state_dict()
    assert all(torch.equal(sd[k], back[k]) for k in sd)  # the old model, whole
    monkeypatch.setattr(weights, "save_file", real)
    for model, b_names in ((new, True), (old, False)):  # the names alternate
        save_model(model, tmp_path, max_shard_bytes=20_000)
        sd, back = model.state_dict(), load_model(tmp_path).state_dict()
        assert all(torch.equal(sd[k], back[k]) for k in sd)
        names = sorted(p.name for p in tmp_path.glob("model*.safetensors"))
        assert len(names) == len(first) and all(n.endswith(".b.safetensors") == b_names for n in names)  # no stale
        assert not list(tmp_path.glob(".*"))  # no temporary file either


def test_saved_files_have_the_usual_mode(tmp_path, tiny_config_of):
    # safetensors' save_file writes 0600 files; ours must be readable as the JSON beside them
    import os

    umask = os.umask(0)
    os.umask(umask)
    model = Llama(tiny_config_of("mha_tied")).init_weights(3)
    for sub, shard in (("one", 10**9), ("many", 30_000)):
        save_model(model, tmp_path / sub, max_shard_bytes=shard)
        modes = {p.name: p.stat().st_mode & 0o777 for p in (tmp_path / sub).iterdir()}
        assert set(modes.values()) == {0o666 & ~umask}, modes


def test_config_without_rms_norm_eps_takes_the_transformers_default(ckpt):
    cfg = json.loads((ckpt / "config.json").read_text())
    del cfg["rms_norm_eps"]
    (ckpt / "config.json").write_text(json.dumps(cfg))
    assert load_model(ckpt).config.rms_norm_eps == 1e-6
