import subprocess
import sys
from pathlib import Path

import torch

import toklip


def _toklip_convert(*overrides: str, cwd: Path) -> subprocess.CompletedProcess:
    script = Path(sys.executable).with_name("toklip-convert")
    return subprocess.run([str(script), *overrides], cwd=cwd, capture_output=True, text=True, timeout=120)


def test_toklip_convert_from_the_shell(tmp_path):
    model = toklip.build_toklip("tiny_64")
    torch.save({"epoch": 1, "state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}}, tmp_path / "rel.pt")
    done = _toklip_convert("checkpoint=rel.pt", "preset=tiny_64", "out=export/tiny.safetensors", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "wrote export/tiny.safetensors" in done.stdout
    images = torch.rand(1, 3, 64, 64) * 2 - 1
    assert torch.equal(toklip.load_toklip(tmp_path / "export" / "tiny.safetensors").encode_image(images), model.encode_image(images))


def test_toklip_convert_names_bad_input(tmp_path):
    missing_out = _toklip_convert("checkpoint=rel.pt", "preset=tiny_64", cwd=tmp_path)
    assert missing_out.returncode != 0 and "out" in missing_out.stderr
    no_file = _toklip_convert("checkpoint=nowhere.pt", "preset=tiny_64", "out=x.safetensors", cwd=tmp_path)
    assert no_file.returncode != 0 and "checkpoint not found: nowhere.pt (from checkpoint)" in no_file.stderr
