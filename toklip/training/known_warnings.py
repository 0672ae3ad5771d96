"""Warnings that every toklip run would print about choices it makes on purpose, silenced with the reason.

Each filter matches one message, as narrowly as its text allows; the warnings that point at a real
problem were fixed where they arose instead (the VQ stage trained in eval mode, unclosed shard files,
validation of no evaluation sets, per-rank validation logs).
"""

import warnings

from lightning.pytorch.utilities.warnings import PossibleUserWarning

# The frozen VQ, text tower and teacher (and the VQ stage's perceptual teacher) stay in eval mode by design.
warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode at the start of training", category=PossibleUserWarning)
# ShardStream splits its shards by rank and worker itself and caps each worker's batches, so its __len__ holds.
warnings.filterwarnings("ignore", message=r"Your `IterableDataset` has `__len__` defined", category=UserWarning)
# Each worker's closing report of its skips is an item the loader fetches and hides (`_EpochLoader`); torch
# counts it against that __len__ and warns of a length that is right.
warnings.filterwarnings("ignore", message=r"Length of IterableDataset <toklip\.data\.stream\.ShardStream ", category=UserWarning)
# The encode job's batches carry their parts and keys; its writer needs no sampler indices.
warnings.filterwarnings("ignore", message=r"Couldn't infer the batch indices fetched from your dataloader", category=UserWarning)
# The generator and comprehension modules are scored on their exports after training, not by a val loop;
# the data modules they share with TokLIP runs still offer theirs.
warnings.filterwarnings("ignore", message=r"You passed in a `val_dataloader` but have no `validation_step`")
# A mid-epoch resume is exact: the data modules' state_dict / load_state_dict carry their position
# (TokLIPDataModule's in its streams, ConversationDataModule's in its epoch's shuffle).
warnings.filterwarnings(
    "ignore", message=r"You're resuming from a checkpoint that ended before the epoch ended", category=PossibleUserWarning
)
# Lightning <= 2.6.6 calls torch's deprecated LeafSpec check (Lightning-AI/pytorch-lightning#21326): not ours to fix.
warnings.filterwarnings(
    "ignore",
    message=r"`isinstance\(treespec, LeafSpec\)` is deprecated",
    category=FutureWarning,
    module=r"lightning\.pytorch\.utilities\._pytree",
)
