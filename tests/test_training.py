"""TokLIPModule: gradients, DDP and FSDP2 on CPU, optimisation, schedule, checkpoints, resume, export."""

import dataclasses
import os
import signal
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import webdataset as wds
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.utilities.exceptions import SIGTERMException
from torch.utils.data import DataLoader

import toklip
from toklip.checkpoints import NUMPY_SCALARS, CheckpointError, read_checkpoint
from toklip.data import DataQualityError
from toklip.distributed import end_process_group
from toklip.losses import MAX_LOGIT_SCALE, LossSettings, SigLipLoss
from toklip.training import AdamWCosine, CheckpointOnPreemption, ExportModel, TokLIPModule, param_groups, warmup_cosine
from toklip.training.checkpointing import AtomicCheckpointIO

OPTIM_KEYS = {f.name for f in dataclasses.fields(AdamWCosine)}
LOSS_KEYS = {f.name for f in dataclasses.fields(LossSettings)}


def module(teacher, tokenizer_checkpoint=None, **options) -> TokLIPModule:
    """The tiny preset; `options` are optimiser or loss keys (sorted into their groups) or module arguments."""
    torch.manual_seed(0)
    optim = {"lr": 1e-3, "warmup_steps": 2, "total_steps": 100, **{k: options.pop(k) for k in OPTIM_KEYS & set(options)}}
    loss = {k: options.pop(k) for k in LOSS_KEYS & set(options)}
    return TokLIPModule(
        "tiny_64", tokenizer={"checkpoint": tokenizer_checkpoint}, teacher={"checkpoint": str(teacher)}, optim=optim, loss=loss, **options
    )


def random_batch(n=8, seed=0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"image": torch.rand(n, 3, 64, 64, generator=g) * 2 - 1, "text": torch.randint(1, 49000, (n, 32), generator=g)}


def fixed_batches(batches: list[dict]) -> DataLoader:
    return DataLoader(batches, batch_size=None)


def trainer(**options) -> L.Trainer:
    defaults = dict(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    return L.Trainer(**{**defaults, **options})


def datamodule(synthetic, **options) -> toklip.TokLIPDataModule:
    defaults = dict(
        text_tokenizer=toklip.get_text_tokenizer("tiny_64"), image_size=64, train_num_samples=256, batch_size_per_device=8, num_workers=0
    )
    return toklip.TokLIPDataModule(synthetic.train_urls, **{**defaults, **options})


class LossRecorder(Callback):
    def __init__(self):
        self.losses = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(float(outputs["loss"]))


def test_only_trainable_parameters_get_gradients(tiny_teacher_checkpoint):
    m = module(tiny_teacher_checkpoint)
    sum(m.compute_losses(random_batch()).values()).backward()
    trainable = set(m.model.trainable_parameters())
    for name, param in m.named_parameters():
        short = name.removeprefix("model.")
        if short in trainable:
            assert param.grad is not None and param.grad.abs().sum() > 0, name
        else:
            assert param.grad is None and not param.requires_grad, name
    assert any(n.startswith("teacher.") for n, _ in m.named_parameters())
    assert not any(p.requires_grad for p in m.model.text.parameters())


def test_student_starts_from_the_teacher(tiny_teacher_checkpoint):
    m = module(tiny_teacher_checkpoint)
    teacher_block = m.teacher.visual.trunk.blocks[0].attn.qkv.weight
    assert torch.equal(m.model.visual.trunk.blocks[0].attn.qkv.weight, teacher_block)
    assert m.contrastive.__class__.__name__ == "ClipLoss" and m.distill.weight == 1000.0


def test_missing_teacher_weights_name_the_key(tmp_path):
    with pytest.raises(CheckpointError, match="teacher.checkpoint"):
        TokLIPModule("tiny_64", teacher={"checkpoint": str(tmp_path / "missing.safetensors")})


def test_parameter_groups_follow_the_release_rule(tiny_teacher_checkpoint):
    m = module(tiny_teacher_checkpoint)
    named = [(n, p) for n, p in m.model.named_parameters() if p.requires_grad]
    no_decay, decay = param_groups(named, 0.1)
    names = {id(p): n for n, p in named}
    no_decay_names = {names[id(p)] for p in no_decay["params"]}
    assert {"logit_scale", "visual.trunk.vq_table.bias", "visual.trunk.norm.weight"} <= no_decay_names
    assert {"visual.trunk.pos_embed", "visual.trunk.attn_pool.latent", "visual.trunk.vq_table.weight"} <= {
        names[id(p)] for p in decay["params"]
    }
    assert no_decay["weight_decay"] == 0.0 and decay["weight_decay"] == 0.1
    assert len(no_decay["params"]) + len(decay["params"]) == len(named)
    timm_no_decay = {names[id(p)] for p in param_groups(named, 0.1, rule="timm")[0]["params"]}
    assert {"visual.trunk.pos_embed", "visual.trunk.attn_pool.latent"} <= timm_no_decay


def test_schedule_is_the_release_formula():
    factor = warmup_cosine(warmup_steps=4, total_steps=14)
    assert [factor(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert factor(4) == 1.0  # cosine starts at the top
    assert factor(9) == pytest.approx(0.5)  # halfway through the 10 cosine steps
    assert factor(13) == pytest.approx(0.5 * (1 + torch.cos(torch.tensor(torch.pi * 9 / 10)).item()))


def test_trainer_applies_schedule_and_clamps_the_logit_scale(tiny_teacher_checkpoint):
    m = module(tiny_teacher_checkpoint, warmup_steps=4, total_steps=10, lr=1.0)
    with torch.no_grad():
        m.model.logit_scale.fill_(4.6)  # just under ln 100
    lrs = []

    class PushTheScaleUp(Callback):  # a gradient that asks for a larger scale: each AdamW step adds about lr (0.25 and up)
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            lrs.append(trainer.optimizers[0].param_groups[0]["lr"])

        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            pl_module.model.logit_scale.grad.fill_(-1.0)

    trainer(max_steps=3, callbacks=[PushTheScaleUp()]).fit(m, fixed_batches([random_batch(4, s) for s in range(3)]))
    assert lrs == pytest.approx([0.25, 0.5, 0.75])
    assert m.model.logit_scale.item() == pytest.approx(MAX_LOGIT_SCALE)  # unclamped, it would be past 6


def test_accumulating_the_distillation_term_equals_the_big_batch(tiny_teacher_checkpoint):
    batch = random_batch(8)
    halves = [{k: v[:4] for k, v in batch.items()}, {k: v[4:] for k, v in batch.items()}]

    def grads(batches):
        m = module(tiny_teacher_checkpoint)
        for b in batches:
            (m.compute_losses(b)["distill"] / len(batches)).backward()
        return {n: p.grad.clone() for n, p in m.model.named_parameters() if p.grad is not None}

    big, accumulated = grads([batch]), grads(halves)
    assert big.keys() == accumulated.keys() and len(big) > 10
    for name in big:
        assert torch.allclose(big[name], accumulated[name], atol=1e-6, rtol=1e-4), name


def test_accumulate_grad_batches_runs(tiny_teacher_checkpoint):
    m = module(tiny_teacher_checkpoint)
    t = trainer(max_steps=2, accumulate_grad_batches=2)
    t.fit(m, fixed_batches([random_batch(4, s) for s in range(4)]))
    assert t.global_step == 2


class _LossesOf(torch.nn.Module):
    """DDP needs a forward to wrap: this one is the module's losses."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, batch):
        return self.inner.compute_losses(batch)


def _ddp_step(rank, world, port, teacher, options, out):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    m = module(teacher, **options)
    ddp = torch.nn.parallel.DistributedDataParallel(_LossesOf(m))
    batch = random_batch(8)
    per_rank = 8 // world
    total = sum(ddp({k: v[rank * per_rank : (rank + 1) * per_rank] for k, v in batch.items()}).values())
    total.backward()
    loss = total.detach().clone()
    dist.all_reduce(loss, op=dist.ReduceOp.AVG)
    if rank == 0:
        grads = {n: p.grad for n, p in m.model.named_parameters() if p.grad is not None}
        torch.save({"loss": loss, "grads": grads}, out)
    end_process_group()  # not destroy alone: gloo can abort the exit (toklip.distributed)


def _two_processes_and_one(teacher, tmp_path, port, options) -> tuple[dict, dict]:
    """One step over the global batch of 8 on two DDP processes and on one: the processes' loss and
    gradients (rank 0's), and the single process's gradients; the two losses must agree."""
    out = tmp_path / "ddp.pt"
    mp.spawn(_ddp_step, args=(2, port, str(teacher), options, str(out)), nprocs=2, join=True)
    ddp = torch.load(out, weights_only=True)
    m = module(teacher, **options)
    total = sum(m.compute_losses(random_batch(8)).values())
    total.backward()
    assert ddp["loss"].item() == pytest.approx(total.item(), abs=1e-5)
    single = {n: p.grad for n, p in m.model.named_parameters() if p.grad is not None}
    assert single.keys() == ddp["grads"].keys()
    return ddp, single


@pytest.mark.parametrize(
    "options",
    [{}, {"local_loss": True, "gather_with_grad": True}, {"contrastive": "siglip"}],
    ids=["gathered-no-grad", "local-loss", "siglip"],
)
def test_two_process_ddp_step_equals_one_process_over_the_global_batch(tiny_teacher_checkpoint, tmp_path, free_port, options):
    ddp, single = _two_processes_and_one(tiny_teacher_checkpoint, tmp_path, free_port, options)
    for name, grad in single.items():
        assert torch.allclose(ddp["grads"][name], grad, atol=1e-5), name


def test_the_reference_gradient_scale_gives_features_one_world_th_of_the_single_process_gradient(
    tiny_teacher_checkpoint, tmp_path, free_port
):
    """`match_single_process=False`, the reference's DDP: a rank's features get the gradient of its own rows
    only, which DDP then averages; the logit scale, in every rank's whole loss, keeps its gradient. With
    the contrastive loss alone, on two ranks: half the single-process gradient, the logit scale's whole."""
    options = {"match_single_process": False, "distill_weight": 0.0}
    ddp, single = _two_processes_and_one(tiny_teacher_checkpoint, tmp_path, free_port, options)
    assert "logit_scale" in single
    for name, grad in single.items():
        expected = grad if name == "logit_scale" else grad / 2
        assert torch.allclose(ddp["grads"][name], expected, atol=1e-5), name
        assert name == "logit_scale" or not torch.allclose(ddp["grads"][name], grad, atol=1e-5), name


def test_fsdp_starts_every_rank_from_rank_zeros_weights():
    """FSDP1 broadcasts rank 0's weights before sharding (as `shard_with_fsdp2` does for FSDP2, tested on
    two ranks in test_distributed); FSDP1 refuses it on CPU, so only the option is checked here."""
    from toklip.training.strategies import fsdp

    assert fsdp().kwargs["sync_module_states"] is True


def test_fsdp2_runs_two_steps_on_cpu(tiny_teacher_checkpoint, synthetic_set, tmp_path, run_on_two_ranks):
    stdout, ranks = run_on_two_ranks(f"""
        import lightning as L, toklip
        from lightning.pytorch.callbacks import ModelCheckpoint
        from torch.distributed.tensor import DTensor
        from toklip.training.checkpointing import AtomicCheckpointIO
        from toklip.training.strategies import fsdp2
        def sums():  # each trainable weight's sum, whole (gathered from the shards)
            return {{n: float((p.full_tensor() if isinstance(p, DTensor) else p).detach().double().sum())
                    for n, p in m.model.named_parameters() if p.requires_grad}}
        dm = toklip.TokLIPDataModule({synthetic_set.train_urls!r}, text_tokenizer=toklip.get_text_tokenizer("tiny_64"),
                                     image_size=64, train_num_samples=64, batch_size_per_device=4, num_workers=0)
        m = toklip.TokLIPModule("tiny_64", teacher={{"checkpoint": {str(tiny_teacher_checkpoint)!r}}}, optim={{"lr": 1e-3, "warmup_steps": 1, "total_steps": 2}})
        before = sums()
        t = L.Trainer(max_steps=2, accelerator="cpu", devices=2, strategy=fsdp2(data_parallel_size=2), plugins=[AtomicCheckpointIO()],
                      logger=False, enable_progress_bar=False,
                      callbacks=[toklip.training.ExportModel({str(tmp_path)!r}, "fsdp2.safetensors"),
                                 ModelCheckpoint({str(tmp_path / "checkpoints")!r}, save_last=True)])
        t.fit(m, dm)
        print(f"rank {{t.global_rank}} steps {{t.global_step}} sharded {{type(m.model.visual.trunk.blocks[0].attn.qkv.weight).__name__}}")
        report = {{"before": before, "after": sums()}}  # a collective: every rank gathers
    """)
    assert "rank 0 steps 2 sharded DTensor" in stdout and "rank 1 steps 2 sharded DTensor" in stdout
    # The ranks end with one model (a weight left out of the shards would drift apart), and every weight trained.
    assert ranks[0]["after"] == ranks[1]["after"]
    before, after = ranks[0]["before"], ranks[0]["after"]
    assert after.keys() == before.keys() and [n for n in after if after[n] == before[n]] == []
    exported = toklip.load_toklip(tmp_path / "fsdp2.safetensors")
    assert exported.visual.trunk.blocks[0].attn.qkv.weight.shape == (384, 128)
    exported_sums = {n: float(p.double().sum()) for n, p in exported.named_parameters() if n in after}
    assert exported_sums.keys() == after.keys() and exported_sums == pytest.approx(after, rel=1e-6, abs=1e-6)
    # One file, gathered from the shards and written whole with its checksum: what resume=latest reads.
    last = read_checkpoint(tmp_path / "checkpoints" / "last.ckpt", allowed_globals=NUMPY_SCALARS)
    assert last["global_step"] == 2 and (tmp_path / "checkpoints" / "last.ckpt.sha256").is_file()
    assert last["state_dict"]["model.visual.trunk.blocks.0.attn.qkv.weight"].shape == (384, 128)


def test_tiny_model_overfits_a_small_batch(tiny_teacher_checkpoint, synthetic_set):
    dm = datamodule(synthetic_set, sample_shuffle=(0, 0), shard_shuffle=(0, 0))
    batch = next(iter(dm.train_loader()))
    batch.pop("stream")
    m = module(tiny_teacher_checkpoint, distill_weight=0.0, lr=5e-4, warmup_steps=5, total_steps=80, weight_decay=0.0)
    recorder = LossRecorder()
    trainer(max_steps=80, callbacks=[recorder]).fit(m, fixed_batches([batch] * 80))
    first, last = recorder.losses[0], sum(recorder.losses[-5:]) / 5
    assert first > 1.8 and last < 0.25 * first, (first, last)  # ln 8 = 2.08: chance at the start


def _fit(synthetic, teacher, root, max_steps, ckpt_path=None, callbacks=()):
    m = module(teacher, total_steps=6)
    recorder = LossRecorder()
    checkpoints = ModelCheckpoint(dirpath=root, every_n_train_steps=3, save_last=True, save_top_k=-1)
    t = trainer(
        max_steps=max_steps, enable_checkpointing=True, callbacks=[recorder, checkpoints, *callbacks], plugins=[AtomicCheckpointIO()]
    )  # checkpoints written as every trainer config writes them
    t.fit(m, datamodule(synthetic), ckpt_path=ckpt_path, weights_only=True)
    return m, recorder.losses


def test_resume_continues_the_same_loss_trajectory(tiny_teacher_checkpoint, synthetic_set, tmp_path):
    _, uninterrupted = _fit(synthetic_set, tiny_teacher_checkpoint, tmp_path / "a", max_steps=6)
    _, head = _fit(synthetic_set, tiny_teacher_checkpoint, tmp_path / "b", max_steps=3)
    resumed, tail = _fit(synthetic_set, tiny_teacher_checkpoint, tmp_path / "b", max_steps=6, ckpt_path=str(tmp_path / "b" / "last.ckpt"))
    assert len(uninterrupted) == 6 and len(head) == 3 and len(tail) == 3
    assert head + tail == pytest.approx(uninterrupted, abs=1e-6)
    saved = torch.load(tmp_path / "b" / "last.ckpt", weights_only=True)
    trainable = {f"model.{n}" for n in resumed.model.trainable_parameters()}
    random_vq = {k for k in resumed.state_dict() if k.startswith("model.visual.trunk.vq.")}  # no file to re-read it from
    assert set(saved["state_dict"]) == trainable | random_vq
    assert "TokLIPDataModule" in saved and saved["toklip"]["preset"] == "tiny_64"


def test_a_crash_while_writing_leaves_the_last_checkpoint_intact(tiny_teacher_checkpoint, synthetic_set, tmp_path, monkeypatch):
    _fit(synthetic_set, tiny_teacher_checkpoint, tmp_path, max_steps=3)
    from test_checkpoints import rename_fails_for

    last = tmp_path / "last.ckpt"
    before = last.read_bytes()
    rename_fails_for(last, monkeypatch)  # the writer dies with the new checkpoint written beside the old one
    with pytest.raises(OSError, match="killed mid-rename"):
        _fit(synthetic_set, tiny_teacher_checkpoint, tmp_path, max_steps=6, ckpt_path=str(last))
    assert list(tmp_path.glob("*step=6.ckpt"))  # the step's own checkpoint was written; last.ckpt's rewrite failed
    assert last.read_bytes() == before and read_checkpoint(last)["global_step"] == 3  # the old one, whole and verified
    assert not list(tmp_path.glob(".*.tmp-*"))


def test_checkpoint_of_another_model_is_refused(tiny_teacher_checkpoint, synthetic_set, tmp_path):
    _fit(synthetic_set, tiny_teacher_checkpoint, tmp_path, max_steps=3)
    saved = torch.load(tmp_path / "last.ckpt", weights_only=True)
    saved["state_dict"].pop("model.logit_scale")
    saved["state_dict"]["model.surprise"] = torch.zeros(1)
    torch.save(saved, tmp_path / "other.ckpt")
    with pytest.raises(CheckpointError, match=r"missing \['model.logit_scale'\], unexpected \['model.surprise'\]"):
        _fit(synthetic_set, tiny_teacher_checkpoint, tmp_path / "x", max_steps=6, ckpt_path=str(tmp_path / "other.ckpt"))


def test_export_writes_a_model_load_toklip_reads(tiny_teacher_checkpoint, synthetic_set, tmp_path):
    trained, _ = _fit(synthetic_set, tiny_teacher_checkpoint, tmp_path, max_steps=2, callbacks=[ExportModel(tmp_path / "export")])
    loaded = toklip.load_toklip(tmp_path / "export" / "toklip.safetensors")
    images = random_batch(2)["image"]
    assert torch.equal(loaded.encode_image(images), trained.model.eval().encode_image(images))


def test_validation_logs_zeroshot_and_retrieval_metrics(tiny_teacher_checkpoint, synthetic_set):
    eval_sets = {
        "colours": {"kind": "zeroshot", "root": str(synthetic_set.zeroshot)},
        "scenes": {"kind": "retrieval", "captions": str(synthetic_set.retrieval_captions), "images": str(synthetic_set.retrieval_images)},
    }
    t = trainer(max_steps=1, val_check_interval=1, num_sanity_val_steps=0)
    t.fit(module(tiny_teacher_checkpoint), datamodule(synthetic_set, eval_sets=eval_sets))
    metrics = t.callback_metrics
    assert {"val/colours/top1", "val/colours/top5", "val/scenes/i2t_R@1", "val/scenes/t2i_R@10"} <= set(metrics)
    assert metrics["val/scenes/t2i_R@10"] >= metrics["val/scenes/t2i_R@1"]
    assert {"data/skipped_corrupt_image", "train/loss_contrastive", "train/loss_distill", "train/logit_scale", "train/lr"} <= set(metrics)


def test_token_distillation_and_siglip_options(tiny_teacher_checkpoint):
    m = module(tiny_teacher_checkpoint, token_distill_weight=10.0, contrastive="siglip", distill_form="cosine")
    assert isinstance(m.contrastive, SigLipLoss) and (m.distill.form, m.distill.token_weight) == ("cosine", 10.0)  # what was asked
    losses = m.compute_losses(random_batch(4))
    assert set(losses) == {"contrastive", "distill", "token_distill"}
    sum(losses.values()).backward()
    assert m.model.logit_bias is not None and m.model.logit_bias.grad is not None
    with pytest.raises(ValueError, match="loss.contrastive='softmax'"):
        module(tiny_teacher_checkpoint, contrastive="softmax")


def test_checkpoints_leave_out_frozen_parts_that_have_a_source(tiny_teacher_checkpoint, tmp_path):
    vq = toklip.build_tokenizer("llamagen_tiny")
    vq_file = toklip.checkpoints.save_safetensors(vq.state_dict(), tmp_path / "vq.safetensors")
    m = module(tiny_teacher_checkpoint, tokenizer_checkpoint=str(vq_file))
    written = ModelCheckpoint(dirpath=tmp_path / "run", save_last=True)
    trainer(max_steps=1, enable_checkpointing=True, callbacks=[written], plugins=[AtomicCheckpointIO()]).fit(
        m, fixed_batches([random_batch(4)])
    )
    saved = torch.load(tmp_path / "run" / "last.ckpt", weights_only=True)["state_dict"]
    assert set(saved) == {f"model.{n}" for n in m.model.trainable_parameters()}  # no VQ, teacher or text tower: files give them


def test_a_run_on_data_that_delivers_nothing_fails_and_exports_nothing(tiny_teacher_checkpoint, tmp_path):
    (tmp_path / "shards").mkdir()
    with wds.TarWriter(str(tmp_path / "shards" / "0.tar")) as sink:
        for i in range(16):
            sink.write({"__key__": f"{i:04d}", "jpg": b"\xff\xd8 not a jpeg", "txt": f"caption {i}"})
    dm = toklip.TokLIPDataModule(
        str(tmp_path / "shards" / "0.tar"), text_tokenizer=toklip.get_text_tokenizer("tiny_64"), image_size=64,
        train_num_samples=16, batch_size_per_device=4, num_workers=0,
    )  # fmt: skip
    t = trainer(max_steps=4, callbacks=[ExportModel(tmp_path / "export")])
    with pytest.raises(DataQualityError, match=r"delivered no training batch of 4 samples \(corrupt_image=16\)"):
        t.fit(module(tiny_teacher_checkpoint), dm)
    assert not (tmp_path / "export").exists()


class SignalAtStep(Callback):
    """Sends `signum` after training step `step`, as a cluster would: to this process, or (`group`) to its
    whole process group, loader workers included."""

    def __init__(self, step: int, signum: int = signal.SIGTERM, group: bool = False):
        self.step, self.signum, self.group = step, signum, group

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.step:
            os.killpg(os.getpgid(0), self.signum) if self.group else os.kill(os.getpid(), self.signum)


class RecordStartingStep(Callback):
    """Appends the step each fit starts at to the file `record` (each run builds its own instance)."""

    def __init__(self, record: str):
        self.record = Path(record)

    def on_train_start(self, trainer, pl_module):
        with self.record.open("a") as lines:
            lines.write(f"{trainer.global_step}\n")


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGUSR1], ids=["SIGTERM", "SIGUSR1"])
def test_a_preemption_signal_checkpoints_the_step_reached_and_the_run_resumes_exactly(
    tiny_teacher_checkpoint, synthetic_set, tmp_path, signum
):
    _, uninterrupted = _fit(synthetic_set, tiny_teacher_checkpoint, tmp_path / "a", max_steps=6)
    preempted = [CheckpointOnPreemption(tmp_path / "b" / "preempted"), SignalAtStep(2, signum)]
    with pytest.raises(SIGTERMException):  # Lightning stops at the step boundary; toklip.train turns it into RunPreempted
        _fit(synthetic_set, tiny_teacher_checkpoint, tmp_path / "b", max_steps=6, callbacks=preempted)
    last = tmp_path / "b" / "preempted" / "preempted-step00000002.ckpt"
    assert torch.load(last, weights_only=True)["global_step"] == 2
    _, tail = _fit(synthetic_set, tiny_teacher_checkpoint, tmp_path / "c", max_steps=6, ckpt_path=str(last))
    assert tail == pytest.approx(uninterrupted[2:], abs=1e-6)
