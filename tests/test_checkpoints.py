import errno
import io
import itertools
import multiprocessing
import os
import random
import shutil
import tempfile
import time
from pathlib import Path

import pytest
import torch

import toklip
from toklip.checkpoints import (
    NUMPY_SCALARS,
    CheckpointError,
    read_checkpoint,
    remove_stale_temporaries,
    save_safetensors,
    verify_checksum,
    write_atomically,
)
from toklip.tasks import resume_checkpoint


def test_malicious_pickle_is_refused_without_running(tmp_path, malicious_payload):
    payload, marker = malicious_payload
    torch.save({"model": {"w": torch.zeros(1)}, "payload": payload}, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError, match=r"refusing to load .*evil\.pt.*(posix|os)\.system"):
        toklip.build_tokenizer("llamagen_tiny", checkpoint=tmp_path / "evil.pt")
    assert not marker.exists()


def test_missing_file_names_path_and_config_key(tmp_path):
    with pytest.raises(CheckpointError, match=r"not found: .*nowhere\.pt \(from tokenizer\.checkpoint\)"):
        toklip.build_tokenizer("llamagen_tiny", checkpoint=tmp_path / "nowhere.pt", source="tokenizer.checkpoint")
    from toklip.comprehension import load_comprehension
    from toklip.generation import load_generator

    for load in (load_comprehension, load_generator):  # an export read with its sidecar: missing, not "no sidecar"
        with pytest.raises(CheckpointError, match=r"checkpoint not found: .*nowhere\.safetensors"):
            load(tmp_path / "nowhere.safetensors")
    (tmp_path / "g.safetensors").write_bytes(b"weights")  # a sidecar missing, then damaged: one line each, not a traceback
    with pytest.raises(CheckpointError, match=r"g\.safetensors: no g\.json beside it recording its generator"):
        load_generator(tmp_path / "g.safetensors")
    (tmp_path / "g.json").write_text('{"generator": "')
    with pytest.raises(CheckpointError, match=r"g\.json: not JSON"):
        load_generator(tmp_path / "g.safetensors")


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


def rename_fails_for(target: Path, monkeypatch) -> None:
    """`os.replace` onto `target` fails, as for a writer killed before its rename; onto any other file it works."""
    real_replace = os.replace

    def replace(source, destination):
        if Path(destination) == target:
            raise OSError("killed mid-rename")
        real_replace(source, destination)

    monkeypatch.setattr("os.replace", replace)


def test_safetensors_write_is_atomic_and_round_trips(tmp_path, monkeypatch):
    tensors = {"a": torch.arange(6.0).view(2, 3).t(), "b": torch.ones(2)}  # a non-contiguous view
    path = save_safetensors(tensors, tmp_path / "out" / "w.safetensors", metadata={"preset": "tiny_64"})
    assert sorted(p.name for p in path.parent.iterdir()) == ["w.safetensors", "w.safetensors.sha256"]  # no temporary left
    loaded = read_checkpoint(path)
    assert torch.equal(loaded["a"], tensors["a"]) and torch.equal(loaded["b"], tensors["b"])
    rename_fails_for(path, monkeypatch)
    with pytest.raises(OSError, match="killed"):  # a second write that dies before its rename
        save_safetensors({"a": torch.zeros(3)}, path)
    monkeypatch.undo()
    assert torch.equal(read_checkpoint(path)["a"], tensors["a"])  # the first, whole


def test_a_failed_write_leaves_the_previous_file_whole(tmp_path, monkeypatch):
    path = write_atomically(tmp_path / "last.ckpt", b"old checkpoint")
    rename_fails_for(path, monkeypatch)
    with pytest.raises(OSError, match="killed"):
        write_atomically(path, b"new checkpoint")
    monkeypatch.undo()
    assert read_checkpoint_bytes(path) == b"old checkpoint" and not list(tmp_path.glob(".*.tmp-*"))  # whole, checksum too


def test_a_full_disk_is_named_and_costs_nothing_written_before(tmp_path, monkeypatch):
    path = write_atomically(tmp_path / "last.ckpt", b"old checkpoint")
    monkeypatch.setattr("os.fsync", lambda fd: (_ for _ in ()).throw(OSError(errno.ENOSPC, "No space left on device")))
    with pytest.raises(CheckpointError, match=r"no space left to write .*last.ckpt.sha256 \(\d+ bytes\)"):
        write_atomically(path, b"new checkpoint, larger")
    monkeypatch.undo()
    assert read_checkpoint_bytes(path) == b"old checkpoint" and not list(tmp_path.glob(".*.tmp-*"))


def read_checkpoint_bytes(path: Path) -> bytes:
    verify_checksum(path, str(path))
    return path.read_bytes()


def test_bit_rot_reads_as_damage_not_as_weights(tmp_path):
    path = save_safetensors({"w": torch.ones(64)}, tmp_path / "export.safetensors")
    data = bytearray(path.read_bytes())
    data[-20] ^= 0xFF  # a flipped byte inside the tensor data: still a valid safetensors file
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"export.safetensors does not match its checksum"):
        read_checkpoint(path)


def test_a_kill_between_the_data_and_its_checksum_leaves_a_readable_file(tmp_path, monkeypatch):
    path = write_atomically(tmp_path / "last.ckpt", b"old checkpoint")
    real_replace = os.replace

    def killed_after_the_data(source, target):
        if Path(target).name == "last.ckpt.sha256" and path.read_bytes() == b"new checkpoint":
            raise KeyboardInterrupt  # the process dies before the checksum's final rewrite
        real_replace(source, target)

    monkeypatch.setattr("os.replace", killed_after_the_data)
    with pytest.raises(KeyboardInterrupt):
        write_atomically(path, b"new checkpoint")
    monkeypatch.undo()
    assert read_checkpoint_bytes(path) == b"new checkpoint"


def _training_checkpoint(path: Path, step: int) -> Path:
    buffer = io.BytesIO()
    torch.save({"global_step": step, "state_dict": {"w": torch.full((4,), float(step))}}, buffer)
    return write_atomically(path, buffer.getvalue())


def test_resume_latest_takes_the_newest_checkpoint_that_reads_back_whole(tmp_path, caplog):
    run = tmp_path / "run"
    _training_checkpoint(run / "checkpoints" / "step00000004.ckpt", 4)
    rotten = _training_checkpoint(run / "checkpoints" / "step00000006.ckpt", 6)
    data = bytearray(rotten.read_bytes())
    data[len(data) // 2] ^= 0xFF
    rotten.write_bytes(bytes(data))
    last = _training_checkpoint(run / "checkpoints" / "last.ckpt", 8)
    last.write_bytes(last.read_bytes()[:100])  # killed mid-write by a writer without toklip's rename
    cfg = toklip.compose_config("train", ["resume=latest", f"paths.output_dir={run}"])
    with caplog.at_level("WARNING"):
        assert resume_checkpoint(cfg) == str(run / "checkpoints" / "step00000004.ckpt")
    assert "last.ckpt" in caplog.text and "step00000006.ckpt" in caplog.text and "damaged" in caplog.text
    _training_checkpoint(run / "hpc_ckpt_1.ckpt", 7)  # SLURM's requeue checkpoint counts by its step too
    _training_checkpoint(run / "checkpoints" / "step00000005.ckpt", 5)  # written last, but an earlier step
    assert resume_checkpoint(cfg) == str(run / "hpc_ckpt_1.ckpt")
    for path in run.glob("**/*.ckpt"):
        path.write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"resume=latest in .*run: no checkpoint reads back whole: .*last.ckpt"):
        resume_checkpoint(cfg)


def test_stale_temporaries_of_killed_writers_are_removed(tmp_path):
    dead = tmp_path / ".last.ckpt.tmp-999999999"
    alive = tmp_path / f".last.ckpt.tmp-{os.getpid()}"
    dead.write_bytes(b"partial"), alive.write_bytes(b"being written")
    assert remove_stale_temporaries(tmp_path) == [dead] and alive.exists() and not dead.exists()


def _rewrite_forever(path: Path, tmpdir: Path, writes) -> None:
    """The kill test's writer: rewrites `path` with its four versions in turn, counting finished writes."""
    os.environ["TMPDIR"] = str(tmpdir)
    tempfile.tempdir = None  # forget the directory the parent process chose
    for value in itertools.cycle(range(4)):
        write_atomically(path, bytes([value]) * (4 << 20))
        writes.value += 1


def test_kill_9_while_rewriting_a_checkpoint_leaves_the_old_or_the_new_one(tmp_path):
    # A writer rewrites last.ckpt over and over, its TMPDIR on another filesystem (the tmpfs /dev/shm) than
    # the run directory, as on a cluster; it is SIGKILLed at random moments after its first write while a
    # reader polls the file. The writer is a fork of this process: it writes at once, where a fresh
    # interpreter would spend the seconds of its imports (longer than any kill window) before its first write.
    shm = Path("/dev/shm")
    tmpdir = Path(tempfile.mkdtemp(dir=shm)) if shm.is_dir() else tmp_path / "tmp"
    tmpdir.mkdir(exist_ok=True)
    path = tmp_path / "checkpoints" / "last.ckpt"
    versions = {bytes([value]) * (4 << 20) for value in range(4)}  # 4 MB each: a write takes a while
    write_atomically(path, min(versions))
    fork, rng = multiprocessing.get_context("fork"), random.Random(0)
    writes, kills_mid_write = fork.RawValue("i", 0), 0  # no lock: a writer killed holding one would leave it held
    try:
        for _ in range(10):
            writes_before, kill_at = writes.value, None
            writer = fork.Process(target=_rewrite_forever, args=(path, tmpdir, writes))
            writer.start()
            while kill_at is None or time.monotonic() < kill_at:  # every read sees a whole version (its checksum may lag)
                assert path.read_bytes() in versions
                assert writer.is_alive(), f"the writer failed (exit code {writer.exitcode})"
                if kill_at is None and writes.value > writes_before:
                    kill_at = time.monotonic() + rng.uniform(0, 0.5)
            writer.kill()  # SIGKILL
            writer.join()
            assert read_checkpoint_bytes(path) in versions
            kills_mid_write += bool(remove_stale_temporaries(path.parent))  # what the kill left; the next start removes it
        assert writes.value >= 10 and kills_mid_write > 0, (writes.value, kills_mid_write)  # the test saw what it is about
        assert sorted(p.name for p in path.parent.iterdir()) == ["last.ckpt", "last.ckpt.sha256"]
        assert not list(tmpdir.iterdir())  # nothing was ever written to TMPDIR
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)
