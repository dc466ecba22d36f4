"""StepProgressBar: one bar of optimizer steps out of max_steps in a run bounded by steps, Lightning's per-epoch
bar otherwise; added by the CLI only where no bar is configured and the bar is on."""

import lightning as L
from lightning.pytorch.callbacks import RichProgressBar, TQDMProgressBar
from lightning.pytorch.demos.boring_classes import BoringModel

from recipes.callbacks.progress import StepProgressBar


class Watch(L.Callback):
    """Records the training bar's (n, total, description) after each batch, as the bar left them."""

    def __init__(self, bar: StepProgressBar) -> None:
        self.bar, self.seen = bar, []

    def on_train_batch_end(self, trainer, *args) -> None:
        train = self.bar.train_progress_bar
        self.seen.append((train.n, train.total, train.desc.removesuffix(": ")))


def _fit(tmp_path, **kwargs) -> list:
    bar = StepProgressBar()
    watch = Watch(bar)  # after the bar in the list: its hook runs once the bar has updated
    # BoringModel: 64 batches an epoch
    trainer = L.Trainer(callbacks=[bar, watch], logger=False, enable_checkpointing=False, enable_model_summary=False,
                        limit_val_batches=0, default_root_dir=tmp_path, accelerator="cpu", **kwargs)
    trainer.fit(BoringModel())
    return watch.seen


def test_by_steps_one_bar_counts_global_step_out_of_max_steps(tmp_path):
    seen = _fit(tmp_path, max_steps=70, limit_train_batches=30)  # three epochs of 30, 30, 10 batches
    assert [n for n, _, _ in seen] == list(range(1, 71))  # global_step, across the epoch boundaries
    assert {total for _, total, _ in seen} == {70}
    assert [desc for _, _, desc in seen][::30] == ["Epoch 0, steps", "Epoch 1, steps", "Epoch 2, steps"]
    assert not any("/-" in desc for _, _, desc in seen)


def test_by_epochs_the_bar_is_lightnings_per_epoch_bar(tmp_path):
    seen = _fit(tmp_path, max_epochs=2, limit_train_batches=5)
    assert [(n, total) for n, total, _ in seen] == [(i, 5) for i in range(1, 6)] * 2
    assert [desc for _, _, desc in seen][::5] == ["Epoch 0", "Epoch 1"]


def test_added_only_where_no_bar_is_configured_and_the_bar_is_on():
    assert [type(c) for c in StepProgressBar.unless_configured({}, [])] == [StepProgressBar]
    assert StepProgressBar.unless_configured({"enable_progress_bar": False}, []) == []
    for given in ([TQDMProgressBar()], RichProgressBar()):  # the Trainer's callbacks: a list or one callback
        assert StepProgressBar.unless_configured({"callbacks": given}, []) == []
