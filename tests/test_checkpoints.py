import pytest
import torch

import toklip
from toklip.checkpoints import NUMPY_SCALARS, CheckpointError, read_checkpoint, save_safetensors


def test_malicious_pickle_is_refused_without_running(tmp_path, malicious_payload):
    payload, marker = malicious_payload
    torch.save({"model": {"w": torch.zeros(1)}, "payload": payload}, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError, match=r"refusing to load .*evil\.pt.*(posix|os)\.system"):
        toklip.build_tokenizer("llamagen_tiny", checkpoint=tmp_path / "evil.pt")
    assert not marker.exists()


def test_missing_file_names_path_and_config_key(tmp_path):
    with pytest.raises(CheckpointError, match=r"not found: .*nowhere\.pt \(from tokenizer\.checkpoint\)"):
        toklip.build_tokenizer("llamagen_tiny", checkpoint=tmp_path / "nowhere.pt", source="tokenizer.checkpoint")


def test_truncated_and_foreign_files(tmp_path):
    good = tmp_path / "good.pt"
    torch.save({"model": toklip.build_tokenizer("llamagen_tiny").state_dict()}, good)
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="truncated.pt is truncated, corrupt or not a checkpoint"):
        read_checkpoint(truncated)
    text = tmp_path / "notes.pt"
    text.write_text("these are not weights")
    with pytest.raises(CheckpointError, match="notes.pt"):
        read_checkpoint(text)
    safetensors = tmp_path / "cut.safetensors"
    save_safetensors({"w": torch.ones(1000)}, tmp_path / "whole.safetensors")
    safetensors.write_bytes((tmp_path / "whole.safetensors").read_bytes()[:200])
    with pytest.raises(CheckpointError, match="cut.safetensors is not a readable safetensors file"):
        read_checkpoint(safetensors)
    no_weights = tmp_path / "no_weights.pt"
    torch.save({"model": {"note": "x"}}, no_weights)
    with pytest.raises(CheckpointError, match="no state dict"):
        toklip.build_tokenizer("llamagen_tiny", checkpoint=no_weights)


def test_wrong_architecture_gives_a_full_report(tmp_path):
    torch.save({"model": toklip.build_tokenizer("taming_tiny").state_dict()}, tmp_path / "taming.pt")
    with pytest.raises(CheckpointError) as err:
        toklip.build_tokenizer("llamagen_tiny", checkpoint=tmp_path / "taming.pt")
    message = str(err.value)
    assert "missing from the checkpoint: quantize.codebook_used" in message
    assert "quantize.embedding.weight (model (1024, 8), checkpoint (256, 32))" in message


def test_numpy_scalars_need_the_allow_list(tmp_path):
    np = pytest.importorskip("numpy")
    path = tmp_path / "train.pt"
    torch.save({"state_dict": {"w": torch.ones(1)}, "optimizer": {"step": np.float64(3), "dtype": np.dtype("float32")}}, path)
    with pytest.raises(CheckpointError, match="numpy"):
        read_checkpoint(path)
    assert read_checkpoint(path, allowed_globals=NUMPY_SCALARS)["optimizer"]["step"] == 3


def test_safetensors_write_is_atomic_and_round_trips(tmp_path):
    tensors = {"a": torch.arange(6.0).view(2, 3).t(), "b": torch.ones(2)}  # a non-contiguous view
    path = save_safetensors(tensors, tmp_path / "out" / "w.safetensors", metadata={"preset": "tiny_64"})
    assert not list(path.parent.glob("*.partial"))
    loaded = read_checkpoint(path)
    assert torch.equal(loaded["a"], tensors["a"]) and torch.equal(loaded["b"], tensors["b"])
